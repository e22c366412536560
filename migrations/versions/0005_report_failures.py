"""failed report attempts of a study: count, back-off, reason and parking

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

``studies.report_attempts`` counts failed attempts to report a study since its last report or
arrival, ``report_retry_at`` holds the next attempt back (back-off), ``report_error`` says why the
last attempt failed (exception type and a scrubbed message: no header values) and
``report_parked_at`` is set once ``[study] report_max_attempts`` is reached (``fracture-node
reprocess`` takes it back). New columns with defaults: quick on any size of database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report_attempts", sa.Integer(), server_default="0",
                                      nullable=False))
        batch_op.add_column(sa.Column("report_retry_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("report_error", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("report_parked_at", sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("report_parked_at")
        batch_op.drop_column("report_error")
        batch_op.drop_column("report_retry_at")
        batch_op.drop_column("report_attempts")

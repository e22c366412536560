"""indexes for the audit questions and the spool purge

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Measured with benchmarks/audit_million.py (a year, a million instances; figures in
docs/operations.md): the 30-day audit windows on studies and deliveries scanned the whole table,
and the hourly spool purge walked every instance ever received. Plain CREATE INDEX: a few seconds
per million rows, during which writes wait (run `fracture-node db upgrade` with the node stopped).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UNPURGED = "spool_purged_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        # audit turnaround: studies by the day their first instance arrived
        batch_op.create_index(batch_op.f("ix_studies_first_received_at"), ["first_received_at"],
                              unique=False)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        # audit deliveries: deliveries created in the window
        batch_op.create_index(batch_op.f("ix_deliveries_created_at"), ["created_at"],
                              unique=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        # purge_spool: only instances whose file is still there (a small, recent part)
        batch_op.create_index("ix_instances_unpurged_received_at", ["received_at"], unique=False,
                              sqlite_where=sa.text(UNPURGED), postgresql_where=sa.text(UNPURGED))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_unpurged_received_at",
                            sqlite_where=sa.text(UNPURGED), postgresql_where=sa.text(UNPURGED))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_created_at"))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_first_received_at"))

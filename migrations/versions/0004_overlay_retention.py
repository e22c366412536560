"""when housekeeping deleted an overlay file (retention of the reports folder)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

``report_objects.purged_at`` (NULL: the file is still there) is set by the ``purge_overlays``
housekeeping job when it deletes an overlay file past ``[storage] retention_days``; the row stays.
A partial index on the overlays not purged yet lets the hourly job walk only those. A new nullable
column and an index on a small table (a few hundred rows a day): quick on any size of database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNPURGED = "purged_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        # purge_overlays: only overlays whose file is still there
        batch_op.create_index("ix_report_objects_unpurged_created_at", ["created_at"],
                              unique=False, sqlite_where=sa.text(UNPURGED),
                              postgresql_where=sa.text(UNPURGED))


def downgrade() -> None:
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        batch_op.drop_index("ix_report_objects_unpurged_created_at",
                            sqlite_where=sa.text(UNPURGED), postgresql_where=sa.text(UNPURGED))
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        batch_op.drop_column("purged_at")

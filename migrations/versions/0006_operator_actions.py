"""operator actions: the audit trail of the web console and the API

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

``operator_actions`` records what a user of the console or the JSON API did (retry a dead
delivery, re-process a study) or saw (a page with patient data): who, with which role, how
authenticated, from which address, when, on what (a delivery id or a Study Instance UID) and how
many rows it changed. A new table: quick on any size of database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operator_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("affected", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_actions")),
    )
    op.create_index(op.f("ix_operator_actions_at"), "operator_actions", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_operator_actions_at"), table_name="operator_actions")
    op.drop_table("operator_actions")

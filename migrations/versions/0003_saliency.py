"""saliency with each result; overlay objects and what each delivery carries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

``results.saliency`` (JSON text, NULL for results made before) holds where the model looked.
``report_objects`` lists the overlays (Secondary Capture, GSPS) made with a report;
``delivery_objects`` the ones each delivery carries besides the SR, each with its own outcome;
``deliveries.report_delivered_at`` when the SR itself was stored (copied from ``delivered_at``
for deliveries finished before, which carried the SR only). New nullable columns and new tables
only: quick on any size of database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("saliency", sa.Text(), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report_delivered_at", sa.DateTime(timezone=True),
                                      nullable=True))
    op.execute("UPDATE deliveries SET report_delivered_at = delivered_at "
               "WHERE delivered_at IS NOT NULL")

    op.create_table(
        "report_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("source_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name=op.f("fk_report_objects_report_id_reports")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_objects")),
        sa.UniqueConstraint(
            "report_id", "sop_instance_uid",
            name=op.f("uq_report_objects_report_id_sop_instance_uid"),
        ),
    )
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_report_objects_sop_instance_uid"), ["sop_instance_uid"], unique=False
        )

    op.create_table(
        "delivery_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("object_id", sa.Integer(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"],
            name=op.f("fk_delivery_objects_delivery_id_deliveries"),
        ),
        sa.ForeignKeyConstraint(
            ["object_id"], ["report_objects.id"],
            name=op.f("fk_delivery_objects_object_id_report_objects"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_objects")),
        sa.UniqueConstraint(
            "delivery_id", "object_id", name=op.f("uq_delivery_objects_delivery_id_object_id")
        ),
    )
    with op.batch_alter_table("delivery_objects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivery_objects_object_id"), ["object_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_objects_object_id"))
    op.drop_table("delivery_objects")
    with op.batch_alter_table("report_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_objects_sop_instance_uid"))
    op.drop_table("report_objects")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("report_delivered_at")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("saliency")

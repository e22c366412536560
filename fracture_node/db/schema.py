"""The SQL schema (SQLAlchemy 2.0 declarative models): the queue and the audit trail at once.

Tables
------
``associations``   every DICOM association: who called, from where, when, how it ended.
``instances``      every received object: UIDs, transfer syntax, size, spool path, state.
``store_failures`` every C-STORE answered with a failure status, with the reason.
``studies``        one row per Study Instance UID: arrival times and whether a report is due.
``results``        one row per processed instance: probability, label, model identity, timings,
                   and where the model looked (``saliency``, JSON).
``reports``        every Structured Report produced (one row per version).
``report_objects`` the saliency overlays made with a report (Secondary Capture, GSPS).
``deliveries``     one row per (report, destination): state, attempts, next attempt.
``delivery_objects`` the overlays a delivery carries besides the SR, each with its own outcome.
``delivery_attempts`` every attempt to deliver, with status and error.
``housekeeping_runs`` what each housekeeping job did.
``operator_actions`` what a user of the web console or API did (a retry, a re-process, a view of
                   patient data), who, from where and when.

No patient names, IDs or birth dates are stored: the UIDs link every row to the PACS, which holds
the demographics. The migrations in ``migrations/`` must produce exactly this schema (tested).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID = String(64)
AE = String(16)
NODE = String(128)

# Instance states: the queue.
QUEUED = "queued"
CLAIMED = "claimed"
PROCESSED = "processed"
NOT_PROCESSED = "not_processed"
FAILED = "failed"
SUPERSEDED = "superseded"
FINAL_INSTANCE_STATES = (PROCESSED, NOT_PROCESSED, FAILED)

# Delivery states.
PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(NODE)
    calling_ae_title: Mapped[str] = mapped_column(AE)
    called_ae_title: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    """``open``, ``released``, ``aborted``, ``rejected`` or ``interrupted`` (the node stopped)."""
    reason: Mapped[str | None] = mapped_column(String(128))
    instances_stored: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    instances_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index(None, "started_at"),
        Index(None, "calling_ae_title", "started_at"),
        Index(None, "ended_at", "node"),
    )


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(512))
    """Relative to the spool folder."""
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    """Why an instance was not processed or failed (a code such as ``out_of_scope_modality``)."""
    detail: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(NODE)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many identical copies arrived after this one (acknowledged, not stored again)."""
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    spool_purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "state", "id"),
        Index(None, "study_instance_uid"),
        Index(None, "received_at"),
        Index(None, "association_id"),
        # Retention purge walks only the files still on disk.
        Index(
            "ix_instances_unpurged_received_at",
            "received_at",
            sqlite_where=text("spool_purged_at IS NULL"),
            postgresql_where=text("spool_purged_at IS NULL"),
        ),
        # One current (not superseded) row per SOP Instance UID.
        Index(
            "uq_instances_current_sop_instance_uid",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text("state != 'superseded'"),
            postgresql_where=text("state != 'superseded'"),
        ),
    )


class StoreFailure(Base):
    __tablename__ = "store_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "at"),)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    instances_received: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    report_due: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    """True while the study has instances that no report covers yet."""
    reported_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    report_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Failed attempts to report the study since its last report or arrival."""
    report_retry_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    """No report attempt before this (back-off after a failure)."""
    report_error: Mapped[str | None] = mapped_column(String(256))
    """Why the last attempt failed: the exception's type and a scrubbed message (no values
    copied from a header)."""
    report_parked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    """Set after ``[study] report_max_attempts`` failures: no more attempts until
    ``fracture-node reprocess`` or a new instance of the study."""

    __table_args__ = (
        Index(None, "report_due", "last_received_at"),
        Index(None, "first_received_at"),
    )


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    operating_point: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    decode_ms: Mapped[float] = mapped_column(Float)
    infer_ms: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(NODE)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    saliency: Mapped[str | None] = mapped_column(Text)
    """Where the model looked, a JSON object (method, layer, heat map, regions in source pixels;
    see ``docs/audit.md``); NULL when saliency was off or failed for this image."""

    __table_args__ = (
        Index(None, "created_at"),
        Index(None, "model_sha256", "created_at"),
    )


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    """Relative to the reports folder."""
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    instances_total: Mapped[int] = mapped_column(Integer)
    instances_positive: Mapped[int] = mapped_column(Integer)
    instances_unprocessed: Mapped[int] = mapped_column(Integer)
    max_probability: Mapped[float | None] = mapped_column(Float)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    made_by: Mapped[str] = mapped_column(NODE)

    __table_args__ = (
        UniqueConstraint("study_instance_uid", "version"),
        Index(None, "created_at"),
    )


class ReportObject(Base):
    """A saliency overlay made with a report: one per (image with regions, kind)."""

    __tablename__ = "report_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"))
    kind: Mapped[str] = mapped_column(String(8))
    """``sc`` (Secondary Capture) or ``gsps`` (Grayscale Softcopy Presentation State)."""
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    """The same across report versions while the image and its result are unchanged."""
    series_instance_uid: Mapped[str] = mapped_column(UID)
    source_sop_instance_uid: Mapped[str] = mapped_column(UID)
    """The radiograph it is about."""
    path: Mapped[str] = mapped_column(String(512))
    """Relative to the reports folder."""
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    """The report's ``created_at`` (set in the same transaction)."""
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    """When housekeeping deleted the file (retention); the row stays."""

    __table_args__ = (
        UniqueConstraint("report_id", "sop_instance_uid"),
        Index(None, "sop_instance_uid"),
        # Overlay retention walks only the files still on disk.
        Index(
            "ix_report_objects_unpurged_created_at",
            "created_at",
            sqlite_where=text("purged_at IS NULL"),
            postgresql_where=text("purged_at IS NULL"),
        ),
    )


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    deadline_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    report_delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    """When the SR itself was stored at the destination; the delivery is ``delivered`` once its
    ``delivery_objects`` are stored too."""

    __table_args__ = (
        UniqueConstraint("report_id", "destination"),
        Index(None, "state", "next_attempt_at"),
        Index(None, "created_at"),
    )


class DeliveryObject(Base):
    """An overlay that a delivery carries besides the SR, and whether it was stored."""

    __tablename__ = "delivery_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    object_id: Mapped[int] = mapped_column(ForeignKey("report_objects.id"))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("delivery_id", "object_id"),
        Index(None, "object_id"),
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float] = mapped_column(Float)
    ok: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    node: Mapped[str] = mapped_column(NODE)

    __table_args__ = (Index(None, "delivery_id"), Index(None, "attempted_at"))


class HousekeepingRun(Base):
    __tablename__ = "housekeeping_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(NODE)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    summary: Mapped[str] = mapped_column(Text)
    """A JSON object of what the job did."""

    __table_args__ = (Index(None, "job", "started_at"),)


class OperatorAction(Base):
    """One thing a user of the console or the API did or saw: the audit trail of people."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    user_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    via: Mapped[str] = mapped_column(String(16))
    """How the user was authenticated: ``basic``, ``session`` or ``proxy``."""
    peer_address: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    """``retry_delivery``, ``reprocess_study`` or ``view_patient_data``."""
    target: Mapped[str] = mapped_column(String(128))
    """A delivery id or a Study Instance UID (never a patient attribute)."""
    affected: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Rows the action changed (0: nothing to do, e.g. the delivery was no longer dead)."""

    __table_args__ = (Index(None, "at"),)

"""Every SQL statement of fracture-node lives here.

The :class:`Store` wraps one SQLAlchemy engine. Each public method is one transaction. On SQLite
(the embedded default) write transactions start with ``BEGIN IMMEDIATE`` so that concurrent
threads queue on the lock instead of failing on an upgrade; on PostgreSQL, work is claimed with
``SELECT ... FOR UPDATE SKIP LOCKED`` so several processes can share the queue.

Database failures are raised as :class:`~fracture_node.errors.DatabaseError`; callers decide
what that means (the C-STORE handler answers 0xA700).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fracture_node.db import rowcount
from fracture_node.db import schema as s
from fracture_node.db.database import Database
from fracture_node.db.reporting import ReportingQueries

T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class NewInstance:
    """What the receiver knows about an object it has just written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    transfer_syntax_uid: str
    modality: str | None
    size_bytes: int
    sha256: str
    spool_path: str
    received_at: dt.datetime
    association_id: int | None


@dataclass(frozen=True)
class CurrentInstance:
    id: int
    sha256: str
    spool_path: str


@dataclass(frozen=True)
class ClaimedInstance:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    spool_path: str
    attempts: int
    """Claims so far, this one included."""

    @property
    def is_retry(self) -> bool:
        """Claimed before without a result (its worker died, perhaps because of it): see
        :meth:`Store.claim_instances`."""
        return self.attempts > 1


@dataclass(frozen=True)
class ResultRecord:
    instance_id: int
    probability: float
    positive: bool
    threshold: float
    operating_point: str
    model_name: str
    model_version: str
    model_sha256: str
    decode_ms: float
    infer_ms: float
    batch_size: int
    saliency: str | None = None
    """JSON (:class:`fracture_node.saliency.SaliencyRecord`), or None."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, echo: bool = False, statement_timeout_ms: int = 0) -> Engine:
    """Create an engine with the settings fracture-node relies on for ``url``."""
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30,
                                                               "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # A database that hangs instead of refusing must not hold a C-STORE forever: statements
    # time out and dead TCP connections are noticed by keepalives.
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         connect_args={"connect_timeout": 5,
                                       "options": f"-c statement_timeout={statement_timeout_ms}",
                                       "keepalives": 1, "keepalives_idle": 30,
                                       "keepalives_interval": 10, "keepalives_count": 3})


class Store(ReportingQueries):
    """The SQL store: queue and audit trail (study/report/delivery SQL in ``reporting``)."""

    def __init__(self, url: str, echo: bool = False) -> None:
        self.url = url
        self.db = Database(make_engine(url, echo=echo, statement_timeout_ms=120_000))
        self.engine = self.db.engine
        self.is_postgres = self.db.dialect == "postgresql"

    # Plumbing -----------------------------------------------------------------------------
    def dispose(self) -> None:
        self.db.dispose()

    def run(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one read-write transaction (:meth:`Database.run`)."""
        return self.db.run(fn)

    def _insert(self) -> Any:
        return postgresql.insert if self.is_postgres else sqlite.insert

    def ping(self) -> None:
        """Raise :class:`DatabaseError` unless the database answers."""
        self.run(lambda ses: ses.execute(select(1)).scalar_one())

    # Associations -------------------------------------------------------------------------
    def open_association(self, *, node: str, calling_ae_title: str, called_ae_title: str,
                         peer_address: str, peer_port: int, outcome: str = "open",
                         reason: str | None = None, started_at: dt.datetime | None = None
                         ) -> int:
        now = utcnow()
        row = s.Association(node=node, calling_ae_title=calling_ae_title,
                            called_ae_title=called_ae_title, peer_address=peer_address,
                            peer_port=peer_port, started_at=started_at or now,
                            ended_at=None if outcome == "open" else now, outcome=outcome,
                            reason=reason, instances_stored=0, instances_failed=0)

        def fn(ses: Session) -> int:
            ses.add(row)
            ses.flush()
            return row.id

        return self.run(fn)

    def close_association(self, association_id: int, outcome: str, reason: str | None = None
                          ) -> None:
        self.run(lambda ses: ses.execute(
            update(s.Association).where(s.Association.id == association_id,
                                        s.Association.ended_at.is_(None))
            .values(ended_at=utcnow(), outcome=outcome, reason=reason)))

    def interrupt_open_associations(self, node: str) -> int:
        """Close the associations a previous run of ``node`` left open (it stopped or crashed).

        A node name is ``host:port:pid`` (:func:`fracture_node.dicom.scp.node_name`): a previous
        run is any other pid on the same host and port (only one process can listen there).
        """
        host_port = node.rsplit(":", 1)[0] if node.count(":") >= 2 else node
        pattern = host_port.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return self.run(lambda ses: rowcount(ses.execute(
            update(s.Association).where(
                (s.Association.node == host_port)
                | s.Association.node.like(pattern + ":%", escape="\\"),
                s.Association.node != node, s.Association.ended_at.is_(None))
            .values(ended_at=utcnow(), outcome="interrupted",
                    reason="the node stopped before the association ended"))))

    # Receiving ----------------------------------------------------------------------------
    def current_instance(self, sop_instance_uid: str) -> CurrentInstance | None:
        """The current (not superseded) row for a SOP Instance UID, if any."""
        def fn(ses: Session) -> CurrentInstance | None:
            row = ses.execute(
                select(s.Instance.id, s.Instance.sha256, s.Instance.spool_path).where(
                    s.Instance.sop_instance_uid == sop_instance_uid,
                    s.Instance.state != s.SUPERSEDED)
            ).first()
            return CurrentInstance(*row) if row else None

        return self.run(fn)

    def add_instance(self, new: NewInstance, supersedes: int | None = None) -> int:
        """Record a stored instance, queue it, and mark its study as due for a report.

        ``supersedes`` names the current row of the same SOP Instance UID that this different
        copy replaces (its result stays for audit; the new copy is processed again).
        """
        insert = self._insert()

        def fn(ses: Session) -> int:
            if supersedes is not None:
                ses.execute(update(s.Instance).where(s.Instance.id == supersedes)
                            .values(state=s.SUPERSEDED))
            row = s.Instance(
                sop_instance_uid=new.sop_instance_uid, sop_class_uid=new.sop_class_uid,
                study_instance_uid=new.study_instance_uid,
                series_instance_uid=new.series_instance_uid,
                transfer_syntax_uid=new.transfer_syntax_uid, modality=new.modality,
                size_bytes=new.size_bytes, sha256=new.sha256, spool_path=new.spool_path,
                received_at=new.received_at, association_id=new.association_id,
                state=s.QUEUED, attempts=0, duplicates=0)
            ses.add(row)
            ses.flush()
            if supersedes is not None:
                ses.execute(update(s.Instance).where(s.Instance.id == supersedes)
                            .values(superseded_by=row.id))
            stmt = insert(s.Study).values(
                study_instance_uid=new.study_instance_uid, first_received_at=new.received_at,
                last_received_at=new.received_at, instances_received=1, report_due=True,
                reported_version=0)
            ses.execute(stmt.on_conflict_do_update(
                index_elements=[s.Study.study_instance_uid],
                set_={"last_received_at": new.received_at, "report_due": True,
                      "instances_received": s.Study.instances_received + 1,
                      # a new instance is a new chance: a parked study is tried again
                      "report_attempts": 0, "report_retry_at": None,
                      "report_parked_at": None}))
            if new.association_id is not None:
                ses.execute(update(s.Association).where(s.Association.id == new.association_id)
                            .values(instances_stored=s.Association.instances_stored + 1))
            return row.id

        return self.run(fn)

    def add_duplicate(self, instance_id: int, association_id: int | None) -> None:
        """Count an identical copy of an instance we already hold."""
        def fn(ses: Session) -> None:
            ses.execute(update(s.Instance).where(s.Instance.id == instance_id)
                        .values(duplicates=s.Instance.duplicates + 1))
            if association_id is not None:
                ses.execute(update(s.Association).where(s.Association.id == association_id)
                            .values(instances_stored=s.Association.instances_stored + 1))

        self.run(fn)

    def add_store_failure(self, *, association_id: int | None, sop_instance_uid: str | None,
                          sop_class_uid: str | None, status: int, reason: str,
                          detail: str | None) -> None:
        def fn(ses: Session) -> None:
            ses.add(s.StoreFailure(association_id=association_id, at=utcnow(),
                                   sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                                   status=status, reason=reason, detail=detail))
            if association_id is not None:
                ses.execute(update(s.Association).where(s.Association.id == association_id)
                            .values(instances_failed=s.Association.instances_failed + 1))

        self.run(fn)

    # The queue ----------------------------------------------------------------------------
    def claim_instances(self, worker: str, limit: int,
                        retry_alone: bool = True) -> list[ClaimedInstance]:
        """Claim up to ``limit`` queued instances, oldest first.

        A *retry* (an instance claimed before without a result: its worker died with it in
        hand, perhaps because of it) is never batched with others, so that an image that
        crashes the process takes only itself to ``max_attempts``, not the innocent images of
        its batch. The claim stops before the first retry; a retry at the head of the queue is
        claimed alone, and only when ``retry_alone`` (the worker has nothing else in hand).
        """
        def fn(ses: Session) -> list[ClaimedInstance]:
            heads = ses.execute(
                select(s.Instance.id, s.Instance.attempts).where(s.Instance.state == s.QUEUED)
                .order_by(s.Instance.id).limit(limit).with_for_update(skip_locked=True)
            ).all()
            ids: list[int] = []
            for row_id, attempts in heads:
                if attempts > 0:
                    if not ids and retry_alone:
                        ids.append(row_id)
                    break
                ids.append(row_id)
            if not ids:
                return []
            rows = ses.execute(
                update(s.Instance).where(s.Instance.id.in_(ids), s.Instance.state == s.QUEUED)
                .values(state=s.CLAIMED, claimed_by=worker, claimed_at=utcnow(),
                        attempts=s.Instance.attempts + 1)
                .returning(s.Instance.id, s.Instance.sop_instance_uid, s.Instance.sop_class_uid,
                           s.Instance.study_instance_uid, s.Instance.spool_path,
                           s.Instance.attempts)
            ).all()
            return sorted((ClaimedInstance(*r) for r in rows), key=lambda c: c.id)

        return self.run(fn)

    def queue_depth(self) -> int:
        return self.run(lambda ses: ses.execute(
            select(func.count()).select_from(s.Instance).where(s.Instance.state == s.QUEUED)
        ).scalar_one())

    def save_results(self, worker: str, results: Sequence[ResultRecord]) -> int:
        """Store results of claimed instances; an instance no longer claimed by ``worker``
        (taken back, or finished by another worker) is skipped, so nothing is recorded twice."""
        def fn(ses: Session) -> int:
            now = utcnow()
            saved = 0
            for r in results:
                done = rowcount(ses.execute(
                    update(s.Instance).where(s.Instance.id == r.instance_id,
                                             s.Instance.state == s.CLAIMED,
                                             s.Instance.claimed_by == worker)
                    .values(state=s.PROCESSED, reason=None, detail=None, finished_at=now)
                ))
                if not done:
                    continue
                ses.add(s.Result(instance_id=r.instance_id, probability=r.probability,
                                 positive=r.positive, threshold=r.threshold,
                                 operating_point=r.operating_point, model_name=r.model_name,
                                 model_version=r.model_version, model_sha256=r.model_sha256,
                                 decode_ms=r.decode_ms, infer_ms=r.infer_ms,
                                 batch_size=r.batch_size, worker=worker, created_at=now,
                                 saliency=r.saliency))
                saved += 1
            return saved

        return self.run(fn)

    def finish_unprocessed(self, worker: str, instance_id: int, state: str, reason: str,
                           detail: str | None) -> bool:
        """Mark a claimed instance ``not_processed`` (out of scope, undecodable) or ``failed``."""
        return self.run(lambda ses: rowcount(ses.execute(
            update(s.Instance).where(s.Instance.id == instance_id,
                                     s.Instance.state == s.CLAIMED,
                                     s.Instance.claimed_by == worker)
            .values(state=state, reason=reason, detail=detail, finished_at=utcnow())
        )) > 0)

    def release_claims(self, worker: str, instance_ids: Sequence[int]) -> int:
        """Give claimed instances back to the queue (a worker stopping cleanly)."""
        if not instance_ids:
            return 0
        return self.run(lambda ses: rowcount(ses.execute(
            update(s.Instance).where(s.Instance.id.in_(list(instance_ids)),
                                     s.Instance.state == s.CLAIMED,
                                     s.Instance.claimed_by == worker)
            .values(state=s.QUEUED, claimed_by=None, claimed_at=None,
                    attempts=s.Instance.attempts - 1))))

    def renew_claims(self, worker: str, instance_ids: Sequence[int]) -> int:
        """Refresh ``claimed_at`` of claims ``worker`` still holds (its heartbeat), so that a slow
        but live worker keeps them; rows locked by another transaction are left as they are."""
        if not instance_ids:
            return 0

        def fn(ses: Session) -> int:
            ids = ses.execute(
                select(s.Instance.id).where(s.Instance.id.in_(list(instance_ids)),
                                            s.Instance.state == s.CLAIMED,
                                            s.Instance.claimed_by == worker)
                .with_for_update(skip_locked=True)).scalars().all()
            if not ids:
                return 0
            return rowcount(ses.execute(
                update(s.Instance).where(s.Instance.id.in_(ids)).values(claimed_at=utcnow())))

        return self.run(fn)

    def take_back_stale_claims(self, older_than: dt.timedelta, max_attempts: int) -> tuple[int, int]:
        """Requeue claims older than ``older_than`` (their worker died); an instance that was
        claimed ``max_attempts`` times is marked failed instead. Returns (requeued, failed).

        Safe to run from every node at once: rows another transaction holds (a worker saving
        its results) are skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), never waited on.
        """
        def fn(ses: Session) -> tuple[int, int]:
            now = utcnow()
            cutoff = now - older_than
            ids = ses.execute(
                select(s.Instance.id).where(s.Instance.state == s.CLAIMED,
                                            s.Instance.claimed_at < cutoff)
                .with_for_update(skip_locked=True)).scalars().all()
            if not ids:
                return 0, 0
            failed = rowcount(ses.execute(
                update(s.Instance).where(s.Instance.id.in_(ids),
                                         s.Instance.attempts >= max_attempts)
                .values(state=s.FAILED, reason="too_many_attempts", finished_at=now,
                        detail=f"claimed {max_attempts} times without a result")))
            requeued = rowcount(ses.execute(
                update(s.Instance).where(s.Instance.id.in_(ids), s.Instance.state == s.CLAIMED)
                .values(state=s.QUEUED, claimed_by=None, claimed_at=None)))
            return requeued, failed

        return self.run(fn)

    def instance_states(self) -> dict[str, int]:
        return dict(self.run(lambda ses: ses.execute(
            select(s.Instance.state, func.count()).group_by(s.Instance.state)).all()))

    # Tests and tools ----------------------------------------------------------------------
    def rows(self, model: type[Any], *where: Any) -> list[Any]:
        """All rows of a table (tests and the audit command)."""
        return list(self.run(lambda ses: ses.execute(select(model).where(*where)).scalars().all()))

    def delete_all(self) -> None:
        """Empty every table (tests only)."""
        def fn(ses: Session) -> None:
            for table in reversed(s.Base.metadata.sorted_tables):
                ses.execute(delete(table))

        self.run(fn)


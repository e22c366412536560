"""The SQL of housekeeping: spool and overlay retention, database upkeep, gauges, the record of
each run.

Every statement runs through the :class:`~fracture_node.db.store.Store` transaction helpers, so
on SQLite writes take the lock with ``BEGIN IMMEDIATE`` like the rest of the node and on
PostgreSQL several nodes can run the same job at once without doing the work twice (each row is
claimed by an ``UPDATE ... WHERE spool_purged_at IS NULL``, or ``purged_at IS NULL`` for an
overlay).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Select, and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from fracture_node.db import rowcount
from fracture_node.db import schema as s
from fracture_node.db.store import Store

PURGEABLE_STATES = (*s.FINAL_INSTANCE_STATES, s.SUPERSEDED)
"""States in which nothing will read an instance's spool file again."""

LIVE_STATES = (s.QUEUED, s.CLAIMED)

FINAL_DELIVERY_STATES = (s.DELIVERED,)
"""Delivery states in which nothing will send an overlay again. ``dead`` is not one of them:
``fracture-node retry`` queues a dead delivery again, and it then sends every overlay it has not
stored yet, from its file."""


@dataclass(frozen=True)
class SpoolFile:
    """An instance whose spool file housekeeping has just marked as purged."""

    instance_id: int
    spool_path: str


@dataclass(frozen=True)
class OverlayFile:
    """An overlay (``report_objects`` row) whose file housekeeping has just marked as purged."""

    object_id: int
    path: str
    """Relative to the reports folder."""


@dataclass(frozen=True)
class Gauges:
    """The figures behind the gauges of :class:`~fracture_node.metrics.Metrics`."""

    queue_depth: int
    claimed: int
    dead_deliveries: int
    pending_deliveries: int
    oldest_unreported_study_seconds: float
    """Age of the oldest instance that no report covers yet; 0 when every study is reported."""
    unreported_studies: int
    parked_studies: int = 0
    """Studies whose report failed ``[study] report_max_attempts`` times (``reprocess``)."""
    retrying_studies: int = 0
    """Studies whose last report attempt failed, waiting for their next attempt."""


def _purgeable(cutoff: dt.datetime) -> Any:
    """The WHERE clause for an instance whose spool file may go.

    Received before ``cutoff``, in a state nothing reads from, its study reported before
    ``cutoff`` (so a study reported again recently keeps its files) with no report due, and no
    other row that is still live or young shares the same file (a copy sent again after being
    superseded lands under the same name). The study index serves the last test: a spool path
    always lies in its study's folder.
    """
    other = aliased(s.Instance)
    shared_by_live = exists().where(
        other.study_instance_uid == s.Instance.study_instance_uid,
        other.spool_path == s.Instance.spool_path,
        other.id != s.Instance.id,
        other.spool_purged_at.is_(None),
        or_(other.state.in_(LIVE_STATES), other.received_at >= cutoff),
    )
    study_reported = exists().where(
        s.Study.study_instance_uid == s.Instance.study_instance_uid,
        s.Study.report_due.is_(False),
        s.Study.last_reported_at < cutoff,
    )
    return and_(
        s.Instance.spool_purged_at.is_(None),
        s.Instance.received_at < cutoff,
        s.Instance.state.in_(PURGEABLE_STATES),
        study_reported,
        ~shared_by_live,
    )


def purge_candidates(cutoff: dt.datetime, limit: int) -> Select[Any]:
    """The ids of up to ``limit`` purgeable instances, oldest first.

    Oldest first lets the planner walk the partial index ``ix_instances_unpurged_received_at``
    (migration 0002) and stop after ``limit`` rows instead of visiting every instance ever
    received.
    """
    return (select(s.Instance.id).where(_purgeable(cutoff))
            .order_by(s.Instance.received_at, s.Instance.id).limit(limit))


def mark_spool_purged(store: Store, cutoff: dt.datetime, now: dt.datetime, limit: int
                      ) -> list[SpoolFile]:
    """Mark up to ``limit`` purgeable instances received before ``cutoff`` as purged at ``now``.

    Returns the rows this call marked; the caller then deletes their files. Marking first means a
    crash between the two leaves a file without a row that needs it (harmless, and removed by
    hand at worst), never a row that points at a deleted file while it is still needed.
    """
    def fn(ses: Session) -> list[SpoolFile]:
        ids = ses.execute(purge_candidates(cutoff, limit)).scalars().all()
        if not ids:
            return []
        rows = ses.execute(
            update(s.Instance)
            .where(s.Instance.id.in_(ids), _purgeable(cutoff))
            .values(spool_purged_at=now)
            .returning(s.Instance.id, s.Instance.spool_path)
            .execution_options(synchronize_session=False)
        ).all()
        return sorted((SpoolFile(int(r[0]), str(r[1])) for r in rows),
                      key=lambda f: f.instance_id)

    return store.run(fn)


def _overlay_purgeable(cutoff: dt.datetime) -> Any:
    """The WHERE clause for an overlay whose file may go.

    Made with a report created before ``cutoff``, and no delivery still needs it: every
    delivery that carries it has stored it (``delivery_objects.delivered_at``) or is in a state
    from which nothing sends again (:data:`FINAL_DELIVERY_STATES`). A delivery that is pending, or
    dead (``fracture-node retry`` may queue it again), and has not stored the overlay keeps the
    file. An overlay that no delivery carries goes once it is old. The report's SR file
    (``reports.path``) is never purged: a later version of the report reads it.
    ``report_objects.created_at`` is the report's (the same transaction); it is tested too so
    that the partial index ``ix_report_objects_unpurged_created_at`` (migration 0004) serves.
    """
    o, x, d = s.ReportObject, s.DeliveryObject, s.Delivery
    report_old = exists().where(s.Report.id == o.report_id, s.Report.created_at < cutoff)
    still_needed = exists().where(
        x.object_id == o.id,
        x.delivered_at.is_(None),
        d.id == x.delivery_id,
        d.state.not_in(FINAL_DELIVERY_STATES),
    )
    return and_(
        o.purged_at.is_(None),
        o.created_at < cutoff,
        report_old,
        ~still_needed,
    )


def overlay_purge_candidates(cutoff: dt.datetime, limit: int) -> Select[Any]:
    """The ids of up to ``limit`` purgeable overlays, oldest first."""
    o = s.ReportObject
    return (select(o.id).where(_overlay_purgeable(cutoff))
            .order_by(o.created_at, o.id).limit(limit))


def mark_overlays_purged(store: Store, cutoff: dt.datetime, now: dt.datetime, limit: int
                         ) -> list[OverlayFile]:
    """Mark up to ``limit`` purgeable overlays made before ``cutoff`` as purged at ``now``.

    Returns the rows this call marked; the caller then deletes their files (marked first, as
    :func:`mark_spool_purged` does, for the same reason).
    """
    def fn(ses: Session) -> list[OverlayFile]:
        ids = ses.execute(overlay_purge_candidates(cutoff, limit)).scalars().all()
        if not ids:
            return []
        o = s.ReportObject
        rows = ses.execute(
            update(o)
            .where(o.id.in_(ids), _overlay_purgeable(cutoff))
            .values(purged_at=now)
            .returning(o.id, o.path)
            .execution_options(synchronize_session=False)
        ).all()
        return sorted((OverlayFile(int(r[0]), str(r[1])) for r in rows),
                      key=lambda f: f.object_id)

    return store.run(fn)


def gauges(store: Store, now: dt.datetime) -> Gauges:
    """Queue depth, dead deliveries and the age of the oldest unreported work, in one transaction."""
    return store.run(lambda ses: gauges_in(ses, now))


def gauges_in(ses: Session, now: dt.datetime) -> Gauges:
    """:func:`gauges` in a session of the caller's (the audit command reads with its own)."""
    states = dict(ses.execute(
        select(s.Instance.state, func.count()).where(s.Instance.state.in_(LIVE_STATES))
        .group_by(s.Instance.state)).all())
    deliveries = dict(ses.execute(
        select(s.Delivery.state, func.count()).where(s.Delivery.state.in_((s.DEAD, s.PENDING)))
        .group_by(s.Delivery.state)).all())
    # A due study waits since the first instance received after its last report (never reported:
    # its first instance); when none is later than the report (an instance that arrived while
    # the report was being made), since its latest instance.
    inst = s.Instance
    first_uncovered = (
        select(func.min(inst.received_at))
        .where(inst.study_instance_uid == s.Study.study_instance_uid,
               or_(s.Study.last_reported_at.is_(None),
                   inst.received_at > s.Study.last_reported_at))
        .correlate(s.Study).scalar_subquery())
    waiting = (select(func.coalesce(first_uncovered, s.Study.last_received_at).label("since"))
               .where(s.Study.report_due.is_(True)).subquery())
    oldest, unreported = ses.execute(
        select(func.min(waiting.c.since), func.count())).one()
    oldest_at = _as_utc(oldest)
    age = max(0.0, (now - oldest_at).total_seconds()) if oldest_at else 0.0
    parked, retrying = ses.execute(select(
        func.count(s.Study.report_parked_at),
        func.count().filter(s.Study.report_parked_at.is_(None),
                            s.Study.report_attempts > 0))).one()
    return Gauges(queue_depth=int(states.get(s.QUEUED, 0)),
                  claimed=int(states.get(s.CLAIMED, 0)),
                  dead_deliveries=int(deliveries.get(s.DEAD, 0)),
                  pending_deliveries=int(deliveries.get(s.PENDING, 0)),
                  oldest_unreported_study_seconds=age,
                  unreported_studies=int(unreported or 0),
                  parked_studies=int(parked or 0), retrying_studies=int(retrying or 0))


def _as_utc(value: Any) -> dt.datetime | None:
    """A timestamp from an aggregate as an aware UTC datetime (SQLite may hand back text)."""
    if value is None:
        return None
    parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def record_run(store: Store, *, job: str, node: str, started_at: dt.datetime,
               finished_at: dt.datetime, ok: bool, summary: dict[str, Any]) -> int:
    """Record one run of a housekeeping job; returns the row id."""
    row = s.HousekeepingRun(job=job, node=node, started_at=started_at, finished_at=finished_at,
                            ok=ok, summary=json.dumps(summary, sort_keys=True, default=str))

    def fn(ses: Session) -> int:
        ses.add(row)
        ses.flush()
        return int(row.id)

    return store.run(fn)


def prune_runs(store: Store, before: dt.datetime, jobs: Sequence[str]) -> int:
    """Delete successful runs of ``jobs`` that started before ``before``; failures stay."""
    def fn(ses: Session) -> int:
        result = ses.execute(
            delete(s.HousekeepingRun).where(s.HousekeepingRun.started_at < before,
                                            s.HousekeepingRun.ok.is_(True),
                                            s.HousekeepingRun.job.in_(list(jobs))))
        return rowcount(result)

    return store.run(fn)


def optimize(store: Store) -> dict[str, Any]:
    """Keep the database healthy; returns what was done.

    SQLite: ``PRAGMA wal_checkpoint(TRUNCATE)`` copies the write-ahead log into the database and
    truncates it (the log otherwise only grows while readers keep it busy), then a sampled
    ``ANALYZE`` (``analysis_limit=1000``) and ``PRAGMA optimize`` refresh the planner's statistics.

    PostgreSQL: ``ANALYZE`` on each table of ours (autovacuum does the vacuuming; this keeps the
    statistics fresh after bulk changes such as a purge).
    """
    if store.is_postgres:
        tables = [t.name for t in s.Base.metadata.sorted_tables]
        return store.db.upkeep(lambda cur: _analyze_postgres(cur, tables))
    return store.db.upkeep(_optimize_sqlite)


def _optimize_sqlite(cur: Any) -> dict[str, Any]:
    # Outside any transaction (a checkpoint cannot complete inside one).
    files = [row[2] for row in cur.execute("PRAGMA database_list").fetchall()
             if row[1] == "main" and row[2]]
    wal = Path(files[0] + "-wal") if files else None
    before = _size(wal)
    busy, _frames, _done = cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    after = _size(wal)
    # Approximate statistics (a sample of each index, milliseconds even on a big file): without
    # them SQLite's planner prefers the state index over the partial index of unpurged
    # instances and the purge visits every instance ever received.
    cur.execute("PRAGMA analysis_limit=1000")
    cur.execute("ANALYZE")
    cur.execute("PRAGMA optimize")
    return {"backend": "sqlite", "wal_checkpoint_busy": bool(busy),
            "wal_bytes_before": before, "wal_bytes_after": after, "analyzed": True,
            "optimized": True}


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except FileNotFoundError:
        return 0


def _analyze_postgres(cur: Any, tables: list[str]) -> dict[str, Any]:
    for name in tables:
        cur.execute(f'ANALYZE "{name}"')
    return {"backend": "postgresql", "analyzed": tables}

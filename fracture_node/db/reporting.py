"""SQL of studies, reports and deliveries (mixed into :class:`fracture_node.db.store.Store`).

Reports are made with optimistic concurrency: a reporter reads a study's snapshot without a lock,
builds the SR, and then commits it only if the study did not change meanwhile and no other
process reported this version first (the unique ``(study_instance_uid, version)``). This keeps
the SQLite write lock short and lets several PostgreSQL nodes report without a cluster protocol.
Deliveries are leased: a sender moves ``next_attempt_at`` past the send's timeout in the claiming
transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two nodes never send the same one at
once.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from fracture_node.db import rowcount
from fracture_node.db import schema as s
from fracture_node.db.database import Database
from fracture_node.errors import DatabaseError


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _already_stored(ses: Session, destination: str, uids: Sequence[str]
                    ) -> dict[str, dt.datetime]:
    """Of these overlay SOP Instance UIDs, those ``destination`` has stored already (for an
    earlier report version), with when. An overlay's UID is derived from what it shows, so
    such an object is not sent again: a PACS that refuses or flags a duplicate SOP Instance
    UID must not hold the new version's delivery back."""
    ro, do, d = s.ReportObject, s.DeliveryObject, s.Delivery
    rows = ses.execute(
        select(ro.sop_instance_uid, func.min(do.delivered_at))
        .join(do, do.object_id == ro.id).join(d, d.id == do.delivery_id)
        .where(d.destination == destination, ro.sop_instance_uid.in_(list(uids)),
               do.delivered_at.is_not(None))
        .group_by(ro.sop_instance_uid)).all()
    return {uid: at for uid, at in rows if at is not None}


ASSOCIATION_SILENCE_S = 180.0
"""An association still open in SQL but silent (no new instance) for this long is treated as
ended by :meth:`ReportingQueries.due_studies`: its receiver died and never came back to mark it
interrupted. The default is ``[node] network_timeout_s + dimse_timeout_s`` at their defaults
(120 + 60): a live receiver aborts an idle association after ``network_timeout_s``."""


@dataclass(frozen=True)
class StudyInstance:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    spool_path: str
    state: str
    reason: str | None
    probability: float | None
    positive: bool | None
    threshold: float | None
    operating_point: str | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    saliency: str | None = None


@dataclass(frozen=True)
class StudySnapshot:
    study_instance_uid: str
    instances_received: int
    reported_version: int
    instances: list[StudyInstance]
    previous_report_path: str | None
    previous_series_uid: str | None


@dataclass(frozen=True)
class NewReport:
    study_instance_uid: str
    version: int
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    instances_total: int
    instances_positive: int
    instances_unprocessed: int
    max_probability: float | None
    model_sha256: str | None


@dataclass(frozen=True)
class NewObject:
    """An overlay made with a report (a ``report_objects`` row to be)."""

    kind: str
    """``sc`` or ``gsps``."""
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    source_sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class DueObject:
    """An overlay a delivery still has to store (a ``delivery_objects`` row)."""

    id: int
    kind: str
    sop_instance_uid: str
    path: str
    purged_at: dt.datetime | None = None
    """When retention deleted the file (``report_objects.purged_at``); it cannot be sent unless
    it was put back."""


@dataclass(frozen=True)
class ObjectOutcome:
    """What happened to one overlay in a delivery attempt."""

    id: int
    ok: bool
    status: int | None
    error: str | None
    after_s: float | None = None
    """Seconds from the attempt's start to the peer's answer (when it was stored)."""


@dataclass(frozen=True)
class DueDelivery:
    id: int
    report_id: int
    destination: str
    report_path: str
    report_sop_instance_uid: str
    attempts: int
    deadline_at: dt.datetime
    report_delivered: bool = False
    """The SR itself was stored at an earlier attempt (only overlays are left)."""
    objects: tuple[DueObject, ...] = ()
    """Overlays not stored yet, in the order they are sent."""


@dataclass(frozen=True)
class ReportFailure:
    """What :meth:`ReportingQueries.record_report_failure` decided."""

    attempts: int
    parked: bool
    retry_in_s: float | None


class ReportingQueries:
    """Study, report and delivery statements of :class:`~fracture_node.db.store.Store`, run
    through its :class:`~fracture_node.db.database.Database` like every other query."""

    db: Database

    # Studies ------------------------------------------------------------------------------
    def due_studies(self, stable_before: dt.datetime, limit: int = 50, *,
                    association_silence_s: float | None = ASSOCIATION_SILENCE_S) -> list[str]:
        """Studies with unreported instances, quiet since ``stable_before``, whose instances
        are all finished and whose associations have all ended.

        An association still open but silent for ``association_silence_s`` seconds (started,
        and its last instance received, before then) counts as ended: the receiver that held it
        died without coming back (None: wait for it forever).

        The ``limit`` longest-quiet studies are returned in random order, so that the reporters
        of several nodes working through the same list seldom build the same SR at once (the
        loser's SR would be discarded by :meth:`add_report`).
        """
        i, a = s.Instance, s.Association
        unfinished = exists().where(i.study_instance_uid == s.Study.study_instance_uid,
                                    i.state.in_([s.QUEUED, s.CLAIMED]))
        still_open: Any = a.ended_at.is_(None)
        if association_silence_s is not None:
            silent_since = _now() - dt.timedelta(seconds=association_silence_s)
            later = aliased(s.Instance)
            still_open = still_open & or_(
                a.started_at >= silent_since,
                exists().where(later.association_id == a.id,
                               later.received_at >= silent_since))
        open_assoc = exists().where(i.study_instance_uid == s.Study.study_instance_uid,
                                    i.association_id == a.id, still_open)
        now = _now()
        due = list(self.db.run(lambda ses: ses.execute(
            select(s.Study.study_instance_uid)
            .where(s.Study.report_due.is_(True), s.Study.last_received_at <= stable_before,
                   s.Study.report_parked_at.is_(None),
                   or_(s.Study.report_retry_at.is_(None), s.Study.report_retry_at <= now),
                   ~unfinished, ~open_assoc)
            .order_by(s.Study.last_received_at).limit(limit)).scalars().all()))
        random.shuffle(due)
        return due

    def next_stability_time(self, stable_before: dt.datetime) -> dt.datetime | None:
        """The earliest last arrival after ``stable_before`` among studies due for a report and
        not parked: the study that becomes quiet next (to plan the next report pass)."""
        return self.db.run(lambda ses: ses.execute(
            select(func.min(s.Study.last_received_at))
            .where(s.Study.report_due.is_(True), s.Study.last_received_at > stable_before,
                   s.Study.report_parked_at.is_(None))
        ).scalar_one())

    def study_snapshot(self, study_uid: str) -> StudySnapshot | None:
        """Everything a report of the study needs, read in one transaction; None when there is
        no such study or it is not due any more: another node reported it, or one of its
        instances is not finished (an instance arrived or a claim was taken back after
        :meth:`due_studies` looked).
        """
        def fn(ses: Session) -> StudySnapshot | None:
            study = ses.execute(select(s.Study).where(s.Study.study_instance_uid == study_uid)
                                ).scalar_one_or_none()
            if study is None or not study.report_due:
                return None
            i, r = s.Instance, s.Result
            rows = ses.execute(
                select(i.id, i.sop_instance_uid, i.sop_class_uid, i.spool_path, i.state,
                       i.reason, r.probability, r.positive, r.threshold, r.operating_point,
                       r.model_name, r.model_version, r.model_sha256, r.saliency)
                .outerjoin(r, r.instance_id == i.id)
                .where(i.study_instance_uid == study_uid, i.state != s.SUPERSEDED)
                .order_by(i.id)).all()
            if any(row.state in (s.QUEUED, s.CLAIMED) for row in rows):
                return None
            previous = ses.execute(
                select(s.Report.path, s.Report.series_instance_uid)
                .where(s.Report.study_instance_uid == study_uid)
                .order_by(s.Report.version.desc()).limit(1)).first()
            return StudySnapshot(
                study_instance_uid=study_uid, instances_received=study.instances_received,
                reported_version=study.reported_version,
                instances=[StudyInstance(**row._mapping) for row in rows],
                previous_report_path=previous[0] if previous else None,
                previous_series_uid=previous[1] if previous else None)

        return self.db.run(fn)

    def add_report(self, snapshot: StudySnapshot, report: NewReport, node: str,
                   destinations: Sequence[str], deadline_s: float,
                   objects: Sequence[NewObject] = (),
                   overlays: Mapping[str, frozenset[str]] | None = None) -> int | None:
        """Commit a report and queue its deliveries, unless the study changed meanwhile or
        another process reported it first (then None: discard the files).

        ``objects`` are the overlays made with the report; each destination's delivery carries
        those whose kind is in ``overlays[destination]`` (none when it is not named).

        The study row is the arbiter: the update succeeds only while the study is still due and
        has the instance count and reported version of ``snapshot``; a concurrent reporter's
        update waits on the row lock and then finds it changed (PostgreSQL re-checks the
        condition on the new row version under READ COMMITTED).
        """
        def fn(ses: Session) -> int | None:
            now = _now()
            changed = rowcount(ses.execute(
                update(s.Study).where(
                    s.Study.study_instance_uid == snapshot.study_instance_uid,
                    s.Study.report_due.is_(True),
                    s.Study.instances_received == snapshot.instances_received,
                    s.Study.reported_version == snapshot.reported_version)
                .values(report_due=False, reported_version=report.version,
                        last_reported_at=now, report_attempts=0, report_retry_at=None,
                        report_error=None, report_parked_at=None)))
            if not changed:
                return None
            row = s.Report(
                study_instance_uid=report.study_instance_uid, version=report.version,
                sop_instance_uid=report.sop_instance_uid,
                series_instance_uid=report.series_instance_uid, path=report.path,
                created_at=now, instances_total=report.instances_total,
                instances_positive=report.instances_positive,
                instances_unprocessed=report.instances_unprocessed,
                max_probability=report.max_probability, model_sha256=report.model_sha256,
                made_by=node)
            ses.add(row)
            ses.flush()
            made = [s.ReportObject(report_id=row.id, kind=o.kind, sop_class_uid=o.sop_class_uid,
                                   sop_instance_uid=o.sop_instance_uid,
                                   series_instance_uid=o.series_instance_uid,
                                   source_sop_instance_uid=o.source_sop_instance_uid,
                                   path=o.path, created_at=now) for o in objects]
            ses.add_all(made)
            ses.flush()
            for name in destinations:
                delivery = s.Delivery(report_id=row.id, destination=name, state=s.PENDING,
                                      attempts=0, created_at=now, next_attempt_at=now,
                                      deadline_at=now + dt.timedelta(seconds=deadline_s))
                ses.add(delivery)
                kinds = (overlays or {}).get(name, frozenset())
                carried = [o for o in made if o.kind in kinds]
                if carried:
                    ses.flush()
                    held = _already_stored(ses, name, [o.sop_instance_uid for o in carried])
                    ses.add_all(s.DeliveryObject(delivery_id=delivery.id, object_id=o.id,
                                                 delivered_at=held.get(o.sop_instance_uid))
                                for o in carried)
            return row.id

        try:
            return self.db.run(fn)
        except DatabaseError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return None
            raise

    def record_report_failure(self, study_uid: str, error: str, *, max_attempts: int,
                              first_retry_s: float, max_retry_s: float) -> ReportFailure:
        """Count a failed attempt to report a study, with its (scrubbed) reason: back off
        (``first_retry_s``, doubling up to ``max_retry_s``), or park the study after
        ``max_attempts``."""
        def fn(ses: Session) -> ReportFailure:
            now = _now()
            study = ses.execute(select(s.Study).where(
                s.Study.study_instance_uid == study_uid).with_for_update()).scalar_one_or_none()
            if study is None:
                return ReportFailure(attempts=0, parked=False, retry_in_s=None)
            study.report_attempts = (study.report_attempts or 0) + 1
            study.report_error = error[:256]
            if study.report_attempts >= max_attempts:
                study.report_parked_at = now
                study.report_retry_at = None
                return ReportFailure(attempts=study.report_attempts, parked=True,
                                     retry_in_s=None)
            retry_s = min(max_retry_s, first_retry_s * 2 ** (study.report_attempts - 1))
            study.report_retry_at = now + dt.timedelta(seconds=retry_s)
            return ReportFailure(attempts=study.report_attempts, parked=False,
                                 retry_in_s=retry_s)

        return self.db.run(fn)

    def reprocess_studies(self, study_uids: Sequence[str] = ()) -> int:
        """Take parked studies back (those named, or every parked one): their failure count
        and back-off are cleared and a report is due again. Returns how many."""
        return int(self.db.run(lambda ses: reprocess_in(ses, study_uids)))

    def parked_studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """Studies whose report failed ``report_max_attempts`` times, newest first."""
        def fn(ses: Session) -> list[dict[str, Any]]:
            rows = ses.execute(
                select(s.Study.study_instance_uid, s.Study.report_attempts,
                       s.Study.report_parked_at, s.Study.report_error)
                .where(s.Study.report_parked_at.is_not(None))
                .order_by(s.Study.report_parked_at.desc()).limit(limit)).all()
            return [dict(r._mapping) for r in rows]

        return self.db.run(fn)

    def close_without_report(self, snapshot: StudySnapshot) -> bool:
        """Mark a study in which no image was assessed as handled, with no report.

        The reasons stay where the worker recorded them (``instances.state`` ``not_processed``
        and ``instances.reason``); ``reported_version`` stays 0, so ``status`` and ``audit``
        show the study as closed without an SR. New instances make it due again. Guarded like
        :meth:`add_report`: False when the study changed or another process handled it first.
        """
        def fn(ses: Session) -> bool:
            return bool(rowcount(ses.execute(
                update(s.Study).where(
                    s.Study.study_instance_uid == snapshot.study_instance_uid,
                    s.Study.report_due.is_(True),
                    s.Study.instances_received == snapshot.instances_received,
                    s.Study.reported_version == snapshot.reported_version)
                .values(report_due=False, last_reported_at=_now()))))

        return bool(self.db.run(fn))

    def oldest_unreported_study(self) -> dt.datetime | None:
        return self.db.run(lambda ses: ses.execute(
            select(func.min(s.Study.first_received_at)).where(s.Study.report_due.is_(True))
        ).scalar_one())

    # Deliveries ---------------------------------------------------------------------------
    def make_deliveries_due(self) -> int:
        """Make every pending delivery due now: leases and back-offs alike. Only for a node that
        is the sole deliverer (SQLite) at start-up, where a lease can only be a stopped run's,
        so that a crash does not hold a report back for the lease (``timeout_s * 4 + 5``)."""
        def fn(ses: Session) -> int:
            now = _now()
            return rowcount(ses.execute(
                update(s.Delivery).where(s.Delivery.state == s.PENDING,
                                         s.Delivery.next_attempt_at > now)
                .values(next_attempt_at=now)))

        return self.db.run(fn)

    def claim_deliveries(self, lease_s: float, limit: int = 20) -> list[DueDelivery]:
        """Pending deliveries whose next attempt is due, leased for ``lease_s`` seconds."""
        def fn(ses: Session) -> list[DueDelivery]:
            now = _now()
            d, r = s.Delivery, s.Report
            rows = ses.execute(
                select(d.id, d.report_id, d.destination, r.path, r.sop_instance_uid, d.attempts,
                       d.deadline_at, d.report_delivered_at)
                .join(r, r.id == d.report_id)
                .where(d.state == s.PENDING, d.next_attempt_at <= now)
                .order_by(d.next_attempt_at, d.id).limit(limit)
                .with_for_update(skip_locked=True, of=d)).all()
            if not rows:
                return []
            ids = [row[0] for row in rows]
            ses.execute(update(d).where(d.id.in_(ids))
                        .values(next_attempt_at=now + dt.timedelta(seconds=lease_s)))
            do, ro = s.DeliveryObject, s.ReportObject
            pending: dict[int, list[DueObject]] = {}
            for delivery_id, object_id, kind, uid, path, purged_at in ses.execute(
                    select(do.delivery_id, do.id, ro.kind, ro.sop_instance_uid, ro.path,
                           ro.purged_at)
                    .join(ro, ro.id == do.object_id)
                    .where(do.delivery_id.in_(ids), do.delivered_at.is_(None))
                    .order_by(do.delivery_id, ro.id)).all():
                pending.setdefault(delivery_id, []).append(
                    DueObject(object_id, kind, uid, path, purged_at))
            return [DueDelivery(*row[:7], report_delivered=row[7] is not None,
                                objects=tuple(pending.get(row[0], ())))
                    for row in rows]

        return self.db.run(fn)

    def record_attempt(self, delivery: DueDelivery, *, ok: bool, status: int | None,
                       error: str | None, duration_ms: float, node: str,
                       retry_in_s: float | None, report_stored: bool | None = None,
                       objects: Sequence[ObjectOutcome] = (),
                       started_at: dt.datetime | None = None,
                       report_stored_after_s: float | None = None) -> str:
        """Record one attempt; returns the delivery's new state (delivered, pending or dead).

        ``ok`` means everything the delivery still had to send was stored. ``report_stored``
        (default: ``ok``) says whether the SR was stored in this attempt; ``objects`` give the
        outcome of each overlay sent. ``started_at`` (default: now) is when the attempt began
        (``delivery_attempts.attempted_at``); with it, ``report_stored_after_s`` and each
        object's ``after_s`` date when the peer stored it, not when the attempt was recorded.
        """
        stored = ok if report_stored is None else report_stored

        def fn(ses: Session) -> str:
            now = _now()
            begun = started_at or now

            def at(after_s: float | None) -> dt.datetime:
                if started_at is None or after_s is None:
                    return now
                return min(now, started_at + dt.timedelta(seconds=after_s))

            ses.add(s.DeliveryAttempt(delivery_id=delivery.id, attempted_at=begun,
                                      duration_ms=duration_ms, ok=ok, status=status,
                                      error=error, node=node))
            for o in objects:
                ses.execute(update(s.DeliveryObject).where(
                    s.DeliveryObject.id == o.id, s.DeliveryObject.delivered_at.is_(None))
                    .values(last_status=o.status, last_error=o.error,
                            **({"delivered_at": at(o.after_s)} if o.ok else {})))
            if stored:
                ses.execute(update(s.Delivery).where(s.Delivery.id == delivery.id,
                                                     s.Delivery.report_delivered_at.is_(None))
                            .values(report_delivered_at=at(report_stored_after_s)))
            if ok:
                state, values = s.DELIVERED, {"delivered_at": now}
            elif retry_in_s is None or now + dt.timedelta(seconds=retry_in_s) > delivery.deadline_at:
                state, values = s.DEAD, {}
            else:
                state = s.PENDING
                values = {"next_attempt_at": now + dt.timedelta(seconds=retry_in_s)}
            ses.execute(update(s.Delivery).where(s.Delivery.id == delivery.id).values(
                state=state, attempts=s.Delivery.attempts + 1, last_status=status,
                last_error=error, **values))
            return state

        return self.db.run(fn)

    def retry_dead_deliveries(self, deadline_s: float, destination: str | None = None,
                              report_ids: Sequence[int] | None = None) -> int:
        """Put dead-lettered deliveries back in the queue with a fresh deadline."""
        return int(self.db.run(lambda ses: retry_dead_in(ses, deadline_s, destination,
                                                       report_ids)))

    def delivery_states(self) -> dict[str, int]:
        return dict(self.db.run(lambda ses: ses.execute(
            select(s.Delivery.state, func.count()).group_by(s.Delivery.state)).all()))


def reprocess_in(ses: Session, study_uids: Sequence[str] = ()) -> int:
    """:meth:`ReportingQueries.reprocess_studies` in the caller's transaction."""
    where: list[Any] = [s.Study.report_parked_at.is_not(None)]
    if study_uids:  # named: parked or failing (a reported study stays as it is)
        where = [s.Study.study_instance_uid.in_(list(study_uids)),
                 or_(s.Study.report_parked_at.is_not(None), s.Study.report_attempts > 0)]
    return rowcount(ses.execute(update(s.Study).where(*where).values(
        report_due=True, report_attempts=0, report_retry_at=None, report_parked_at=None)))


def retry_dead_in(ses: Session, deadline_s: float, destination: str | None = None,
                  report_ids: Sequence[int] | None = None,
                  delivery_ids: Sequence[int] | None = None) -> int:
    """:meth:`ReportingQueries.retry_dead_deliveries` in the caller's transaction (also by
    delivery id)."""
    now = _now()
    cond = [s.Delivery.state == s.DEAD]
    if destination:
        cond.append(s.Delivery.destination == destination)
    if report_ids:
        cond.append(s.Delivery.report_id.in_(list(report_ids)))
    if delivery_ids:
        cond.append(s.Delivery.id.in_(list(delivery_ids)))
    return rowcount(ses.execute(update(s.Delivery).where(and_(*cond)).values(
        state=s.PENDING, next_attempt_at=now, deadline_at=now + dt.timedelta(seconds=deadline_s))))

"""The audit trail browsed study by study: the read side of the web console and the JSON API.

Functions of a read-only :class:`~sqlalchemy.orm.Session` (opened by
:class:`fracture_node.db.audit.Audit`, the one entry point of every read): lists with filters and
paging, one study with everything the node did with it, destinations with their last success and
failure, the queue, dead letters, recent activity. Portable SQLAlchemy Core (SQLite and
PostgreSQL alike); every timestamp comes back as an aware UTC datetime.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import Session

from fracture_node.db import schema as s
from fracture_node.db.maintenance import _as_utc

STUDY_STATES = ("waiting", "retrying", "parked", "not_assessed", "reported")
"""A study's state: ``waiting`` (instances no report covers yet), ``retrying`` (its report
failed, another attempt is due), ``parked`` (its report failed every attempt: ``reprocess``),
``not_assessed`` (closed without an SR: no image in scope), ``reported``."""

DELIVERY_STATES = (s.PENDING, s.DELIVERED, s.DEAD)


@dataclass(frozen=True)
class Page:
    """``limit`` rows from ``offset``, and how many match in all."""

    total: int
    limit: int
    offset: int
    items: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "limit": self.limit, "offset": self.offset,
                "items": self.items}


@dataclass(frozen=True)
class StudyFilter:
    since: dt.datetime | None = None
    """First instance received at or after this (UTC)."""
    until: dt.datetime | None = None
    state: str | None = None
    destination: str | None = None
    """Studies with a delivery to this destination."""
    delivery_state: str | None = None
    """Studies with a delivery in this state."""
    study_uid: str | None = None


def _study_state() -> Any:
    st = s.Study
    return case(
        (st.report_parked_at.is_not(None), "parked"),
        (st.report_attempts > 0, "retrying"),
        (st.report_due.is_(True), "waiting"),
        (st.reported_version == 0, "not_assessed"),
        else_="reported")


def _row(mapping: Any) -> dict[str, Any]:
    return {k: (_as_utc(v) if isinstance(v, dt.datetime) else v) for k, v in mapping.items()}


def _count(ses: Session, stmt: Any) -> int:
    return int(ses.execute(select(func.count()).select_from(stmt.order_by(None).subquery()))
               .scalar_one())


def studies(ses: Session, flt: StudyFilter, limit: int, offset: int) -> Page:
    """Studies, latest arrival first, with their state, results and deliveries in brief."""
    st, d, r = s.Study, s.Delivery, s.Report
    state = _study_state().label("state")
    stmt = select(st.study_instance_uid, state, st.first_received_at, st.last_received_at,
                  st.instances_received, st.reported_version, st.last_reported_at,
                  st.report_attempts, st.report_error, st.report_parked_at)
    if flt.since is not None:
        stmt = stmt.where(st.first_received_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(st.first_received_at < flt.until)
    if flt.state:
        stmt = stmt.where(_study_state() == flt.state)
    if flt.study_uid:
        stmt = stmt.where(st.study_instance_uid == flt.study_uid)
    if flt.destination or flt.delivery_state:
        cond = [r.study_instance_uid == st.study_instance_uid]
        if flt.destination:
            cond.append(d.destination == flt.destination)
        if flt.delivery_state:
            cond.append(d.state == flt.delivery_state)
        stmt = stmt.where(exists(select(d.id).join(r, r.id == d.report_id).where(*cond)))
    total = _count(ses, stmt)
    rows = [_row(m) for m in ses.execute(
        stmt.order_by(st.last_received_at.desc(), st.id.desc()).limit(limit).offset(offset)
    ).mappings()]
    uids = [row["study_instance_uid"] for row in rows]
    results = _result_summary(ses, uids)
    deliveries = _delivery_summary(ses, uids)
    for row in rows:
        uid = row["study_instance_uid"]
        row.update(results.get(uid, {"instances": 0, "processed": 0, "positive": 0,
                                     "max_probability": None}))
        row["deliveries"] = deliveries.get(uid, {})
    return Page(total, limit, offset, rows)


def _result_summary(ses: Session, uids: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not uids:
        return {}
    i, res = s.Instance, s.Result
    rows = ses.execute(
        select(i.study_instance_uid, func.count(i.id), func.count(res.id),
               func.sum(case((res.positive.is_(True), 1), else_=0)), func.max(res.probability))
        .outerjoin(res, res.instance_id == i.id)
        .where(i.study_instance_uid.in_(list(uids)), i.state != s.SUPERSEDED)
        .group_by(i.study_instance_uid)).all()
    return {uid: {"instances": int(n), "processed": int(done), "positive": int(pos or 0),
                  "max_probability": top} for uid, n, done, pos, top in rows}


def _delivery_summary(ses: Session, uids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per study, the state of each destination's delivery of its latest report."""
    if not uids:
        return {}
    d, r, st = s.Delivery, s.Report, s.Study
    rows = ses.execute(
        select(r.study_instance_uid, d.destination, d.state)
        .join(r, r.id == d.report_id)
        .join(st, and_(st.study_instance_uid == r.study_instance_uid,
                       st.reported_version == r.version))
        .where(r.study_instance_uid.in_(list(uids)))
        .order_by(r.study_instance_uid, d.destination)).all()
    out: dict[str, dict[str, str]] = {}
    for uid, dest, state in rows:
        out.setdefault(uid, {})[dest] = state
    return out


def study(ses: Session, study_uid: str) -> dict[str, Any] | None:
    """One study: its row, every instance with its result, every report version with its
    deliveries, their objects and every attempt."""
    page = studies(ses, StudyFilter(study_uid=study_uid), 1, 0)
    if not page.items:
        return None
    out = page.items[0]
    i, res = s.Instance, s.Result
    out["instances"] = [_row(m) for m in ses.execute(
        select(i.id.label("instance_id"), i.sop_instance_uid, i.series_instance_uid,
               i.sop_class_uid, i.modality, i.state, i.reason, i.detail, i.received_at,
               i.finished_at, i.attempts, i.duplicates, i.spool_path, i.spool_purged_at,
               res.probability, res.positive, res.threshold, res.operating_point,
               res.model_name, res.model_version, res.model_sha256,
               (res.saliency.is_not(None)).label("has_saliency"))
        .outerjoin(res, res.instance_id == i.id)
        .where(i.study_instance_uid == study_uid)
        .order_by(i.received_at, i.id)).mappings()]
    r, d, a = s.Report, s.Delivery, s.DeliveryAttempt
    reports = [_row(m) for m in ses.execute(
        select(r.id.label("report_id"), r.version, r.sop_instance_uid, r.series_instance_uid,
               r.created_at, r.instances_total, r.instances_positive, r.instances_unprocessed,
               r.max_probability, r.model_sha256, r.made_by)
        .where(r.study_instance_uid == study_uid).order_by(r.version)).mappings()]
    ids = [rep["report_id"] for rep in reports]
    deliveries = [_row(m) for m in ses.execute(
        select(d.id.label("delivery_id"), d.report_id, d.destination, d.state, d.attempts,
               d.created_at, d.next_attempt_at, d.deadline_at, d.delivered_at,
               d.report_delivered_at, d.last_status, d.last_error)
        .where(d.report_id.in_(ids)).order_by(d.id)).mappings()] if ids else []
    dids = [x["delivery_id"] for x in deliveries]
    attempts = [_row(m) for m in ses.execute(
        select(a.delivery_id, a.attempted_at, a.duration_ms, a.ok, a.status, a.error, a.node)
        .where(a.delivery_id.in_(dids)).order_by(a.attempted_at, a.id)).mappings()] \
        if dids else []
    do, ro = s.DeliveryObject, s.ReportObject
    objects = [_row(m) for m in ses.execute(
        select(do.delivery_id, ro.kind, ro.sop_instance_uid, ro.source_sop_instance_uid,
               do.delivered_at, do.last_status, do.last_error, ro.purged_at)
        .join(ro, ro.id == do.object_id).where(do.delivery_id.in_(dids))
        .order_by(do.delivery_id, ro.id)).mappings()] if dids else []
    for x in deliveries:
        x["attempts_made"] = [t for t in attempts if t["delivery_id"] == x["delivery_id"]]
        x["objects"] = [o for o in objects if o["delivery_id"] == x["delivery_id"]]
    for rep in reports:
        rep["deliveries"] = [x for x in deliveries if x["report_id"] == rep["report_id"]]
    out["reports"] = reports
    return out


def instance_file(ses: Session, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
    """Where an instance of a study is spooled and its saliency record (None: unknown)."""
    i, res = s.Instance, s.Result
    row = ses.execute(
        select(i.spool_path, i.spool_purged_at, res.saliency, res.probability, res.positive)
        .outerjoin(res, res.instance_id == i.id)
        .where(i.study_instance_uid == study_uid, i.sop_instance_uid == sop_uid)
        .order_by(i.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def instances(ses: Session, *, state: str | None, reason: str | None,
              since: dt.datetime | None, until: dt.datetime | None,
              limit: int, offset: int) -> Page:
    """Instances, latest first, with their state and reason."""
    i = s.Instance
    stmt = select(i.id.label("instance_id"), i.sop_instance_uid, i.study_instance_uid,
                  i.modality, i.state, i.reason, i.detail, i.received_at, i.finished_at,
                  i.attempts, i.claimed_by)
    if state:
        stmt = stmt.where(i.state == state)
    if reason:
        stmt = stmt.where(i.reason == reason)
    if since is not None:
        stmt = stmt.where(i.received_at >= since)
    if until is not None:
        stmt = stmt.where(i.received_at < until)
    total = _count(ses, stmt)
    items = [_row(m) for m in ses.execute(
        stmt.order_by(i.received_at.desc(), i.id.desc()).limit(limit).offset(offset)).mappings()]
    return Page(total, limit, offset, items)


def queue(ses: Session, limit: int, offset: int) -> Page:
    """Instances waiting for the model or being scored, oldest first (the order of work)."""
    i = s.Instance
    stmt = select(i.id.label("instance_id"), i.sop_instance_uid, i.study_instance_uid,
                  i.state, i.received_at, i.claimed_by, i.claimed_at, i.attempts) \
        .where(i.state.in_((s.QUEUED, s.CLAIMED)))
    total = _count(ses, stmt)
    items = [_row(m) for m in ses.execute(
        stmt.order_by(i.id).limit(limit).offset(offset)).mappings()]
    return Page(total, limit, offset, items)


def destinations(ses: Session, configured: Sequence[str]) -> list[dict[str, Any]]:
    """Each destination (configured, or met in SQL): deliveries by state, last success and last
    failure (when, DICOM status, error)."""
    d, a = s.Delivery, s.DeliveryAttempt
    states: dict[str, dict[str, int]] = {}
    for dest, state, n in ses.execute(select(d.destination, d.state, func.count())
                                      .group_by(d.destination, d.state)).all():
        states.setdefault(dest, {})[state] = int(n)
    last: dict[tuple[str, bool], Any] = {
        (dest, bool(ok)): at for dest, ok, at in ses.execute(
            select(d.destination, a.ok, func.max(a.attempted_at))
            .join(d, d.id == a.delivery_id).group_by(d.destination, a.ok)).all()}
    out = []
    for name in list(configured) + sorted(set(states) - set(configured)):
        failure = None
        failed_at = _as_utc(last.get((name, False)))
        if failed_at is not None:
            failure = ses.execute(
                select(a.attempted_at, a.status, a.error).join(d, d.id == a.delivery_id)
                .where(d.destination == name, a.ok.is_(False))
                .order_by(a.attempted_at.desc(), a.id.desc()).limit(1)).mappings().first()
        out.append({
            "name": name, "configured": name in configured,
            "deliveries": {k: states.get(name, {}).get(k, 0) for k in DELIVERY_STATES},
            "last_success_at": _as_utc(last.get((name, True))),
            "last_failure_at": failed_at,
            "last_failure_status": failure["status"] if failure else None,
            "last_failure_error": failure["error"] if failure else None,
        })
    return out


def dead_letters(ses: Session, *, destination: str | None, since: dt.datetime | None,
                 until: dt.datetime | None, limit: int, offset: int) -> Page:
    """Dead deliveries, newest first, with their report and last error."""
    d, r, a = s.Delivery, s.Report, s.DeliveryAttempt
    last_attempt = select(func.max(a.attempted_at)).where(a.delivery_id == d.id) \
        .correlate(d).scalar_subquery()
    stmt = select(d.id.label("delivery_id"), r.study_instance_uid,
                  r.version.label("report_version"),
                  r.sop_instance_uid.label("report_sop_instance_uid"), d.destination, d.state,
                  d.attempts, d.created_at, last_attempt.label("last_attempt_at"),
                  d.deadline_at, d.last_status, d.last_error) \
        .join(r, r.id == d.report_id).where(d.state == s.DEAD)
    if destination:
        stmt = stmt.where(d.destination == destination)
    if since is not None:
        stmt = stmt.where(d.created_at >= since)
    if until is not None:
        stmt = stmt.where(d.created_at < until)
    total = _count(ses, stmt)
    items = [_row(m) for m in ses.execute(
        stmt.order_by(d.created_at.desc(), d.id.desc()).limit(limit).offset(offset)).mappings()]
    for item in items:
        item["last_attempt_at"] = _as_utc(item["last_attempt_at"])
    return Page(total, limit, offset, items)


def activity(ses: Session, since: dt.datetime) -> dict[str, int]:
    """What happened since ``since``: instances received and processed (or not), reports made,
    deliveries completed, failed delivery attempts, C-STORE requests refused."""
    i, res, r, d, a, f = (s.Instance, s.Result, s.Report, s.Delivery, s.DeliveryAttempt,
                          s.StoreFailure)

    def n(stmt: Any) -> int:
        return int(ses.execute(stmt).scalar_one() or 0)

    return {
        "received": n(select(func.count()).select_from(i).where(i.received_at >= since)),
        "processed": n(select(func.count()).select_from(res).where(res.created_at >= since)),
        "not_processed": n(select(func.count()).select_from(i).where(
            i.state.in_((s.NOT_PROCESSED, s.FAILED)), i.finished_at >= since)),
        "reported": n(select(func.count()).select_from(r).where(r.created_at >= since)),
        "delivered": n(select(func.count()).select_from(d).where(d.delivered_at >= since)),
        "failed_delivery_attempts": n(select(func.count()).select_from(a).where(
            a.ok.is_(False), a.attempted_at >= since)),
        "refused": n(select(func.count()).select_from(f).where(f.at >= since)),
    }

"""The JSON API (``/api``): what the audit and status commands know, and the operator's actions.

Reads go through :class:`fracture_node.db.audit.Audit` (a read-only connection; the same code as
``fracture-node audit`` and ``status``, so the answers are the same); actions through
:mod:`fracture_node.db.actions`, each recorded in ``operator_actions`` with the user who asked.
Times are UTC ISO 8601; ``since``/``until`` take a date (``2026-12-01``: ``until`` then includes
the day) or a date-time. Lists are paged: ``limit`` (1..500) rows from ``offset``, with ``total``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response

from fracture_node.db import actions, browse
from fracture_node.db.audit import QUESTIONS, Audit
from fracture_node.logs import get_logger
from fracture_node.web.app import WebContext, context_of
from fracture_node.web.auth import Operator, Principal, Viewer
from fracture_node.web.spooled import NoPicture, header_fields, overlay_png

log = get_logger("http")
router = APIRouter(prefix="/api", tags=["api"])

DEFAULT_DAYS = 30
Limit = Annotated[int, Query(ge=1, le=500, description="rows per page")]
Offset = Annotated[int, Query(ge=0, description="rows to skip")]
Since = Annotated[str | None, Query(description="UTC date or date-time, included")]
Until = Annotated[str | None, Query(description="UTC date (included) or date-time (excluded)")]


class _Json(Response):
    media_type = "application/json"


def as_json(content: Any) -> Response:
    """``content`` as JSON, times written as ``fracture-node audit --json`` writes them (ISO 8601,
    ``+00:00``), so that the API's answers and the commands' are the same text."""
    return _Json(json.dumps(content, default=_json_default, separators=(",", ":")))


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return str(value)


def parse_bound(value: str | None, *, end: bool) -> dt.datetime | None:
    """A ``since``/``until`` value as an aware UTC datetime (as ``fracture-node audit`` reads
    ``--since``/``--until``); 422 when it is not a date."""
    if not value:
        return None
    try:
        if len(value) == 10:
            start = dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), dt.UTC)
            return start + dt.timedelta(days=1) if end else start
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{'until' if end else 'since'} is not a date; use YYYY-MM-DD "
                                 "or an ISO date-time such as 2026-11-01T08:00") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def audit_of(web: WebContext) -> Audit:
    """The server's read-only :class:`Audit` (made at the first read)."""
    with web.lock:
        found = web.audit
        if found is None:
            found = web.audit = Audit(web.config.database_url)
    assert isinstance(found, Audit)
    return found


def actor_of(principal: Principal, request: Request) -> actions.Actor:
    return actions.Actor(principal.name, principal.role, principal.via,
                         request.client.host if request.client else None)


def _check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise HTTPException(422, f"{name} must be one of {', '.join(choices)}")


# Reads --------------------------------------------------------------------------------------

@router.get("/whoami")
def whoami(principal: Viewer) -> Response:
    """The authenticated user and role."""
    return as_json({"user": principal.name, "role": principal.role, "via": principal.via})


@router.get("/status")
def status(request: Request, _p: Viewer) -> Response:
    """Queue depth, states, last reports, dead deliveries: ``fracture-node status --json``."""
    return as_json(audit_of(context_of(request)).status(dt.datetime.now(dt.UTC)))


@router.get("/activity")
def activity(request: Request, _p: Viewer,
             hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24.0) -> Response:
    """Instances received and processed, reports made, deliveries completed and failed attempts
    in the last ``hours``."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    return as_json({"since": since, "hours": hours,
            **audit_of(context_of(request)).activity(since)})


@router.get("/studies")
def studies(request: Request, _p: Viewer, since: Since = None, until: Until = None,
            state: str | None = None, destination: str | None = None,
            delivery_state: str | None = None, limit: Limit = 50,
            offset: Offset = 0) -> Response:
    """Studies, latest arrival first, with state, results in brief and each destination's
    delivery of the latest report; ``since``/``until`` filter on the first arrival."""
    _check_choice("state", state, browse.STUDY_STATES)
    _check_choice("delivery_state", delivery_state, browse.DELIVERY_STATES)
    flt = browse.StudyFilter(since=parse_bound(since, end=False),
                             until=parse_bound(until, end=True), state=state,
                             destination=destination, delivery_state=delivery_state)
    return as_json(audit_of(context_of(request)).studies(flt, limit, offset).as_dict())


@router.get("/studies/{study_uid}")
def study(request: Request, principal: Viewer, study_uid: str) -> Response:
    """One study: every instance with its result, status and reason; every report version with
    its deliveries, their objects and every attempt. Accession number from the stored headers;
    patient name and ID only where ``[http] show_patient_data`` allows (and then recorded)."""
    return as_json(study_view(request, principal, study_uid))


def study_view(request: Request, principal: Principal, study_uid: str) -> dict[str, Any]:
    """:func:`study`, shared with the console's study page."""
    web = context_of(request)
    found = audit_of(web).study(study_uid)
    if found is None:
        raise HTTPException(404, "no such study")
    show = web.config.http.show_patient_data
    fields: dict[str, str] = {}
    for inst in found["instances"]:
        path = inst.pop("spool_path")  # where the node keeps files is not the caller's business
        if not fields and inst["spool_purged_at"] is None and inst["state"] != "superseded":
            fields = header_fields(web.config.spool_dir / path, patient=show)
    found["accession_number"] = fields.get("accession_number")
    if show:
        found["patient"] = {"name": fields.get("patient_name"), "id": fields.get("patient_id")}
        if web.store is not None:
            actions.record_view(web.store, study_uid, actor_of(principal, request))
        log.info("patient_data_shown", user=principal.name, study_instance_uid=study_uid)
    return found


@router.get("/studies/{study_uid}/instances/{sop_uid}/overlay.png",
            responses={200: {"content": {"image/png": {}}}}, response_class=Response)
def overlay(request: Request, _p: Viewer, study_uid: str, sop_uid: str) -> Response:
    """The image with the model's heat map and regions drawn in (PNG); 404 when the image has
    no saliency record or its spool file was deleted."""
    web = context_of(request)
    row = audit_of(web).instance_file(study_uid, sop_uid)
    if row is None:
        raise HTTPException(404, "no such instance in this study")
    try:
        png = overlay_png(web.config.spool_dir / str(row["spool_path"]), row["saliency"],
                          row["probability"], regions_shown=bool(row["positive"]) or
                          not web.config.saliency.positive_only)
    except NoPicture as exc:
        raise HTTPException(404, str(exc)) from None
    return Response(png, media_type="image/png")


@router.get("/instances")
def instances(request: Request, _p: Viewer, state: str | None = None,
              reason: str | None = None, since: Since = None, until: Until = None,
              limit: Limit = 50, offset: Offset = 0) -> Response:
    """Instances, latest first, with state and reason (filter by either, and by arrival)."""
    return as_json(audit_of(context_of(request)).instances(
        state=state, reason=reason, since=parse_bound(since, end=False),
        until=parse_bound(until, end=True), limit=limit, offset=offset).as_dict())


@router.get("/queue")
def queue(request: Request, _p: Viewer, limit: Limit = 50,
          offset: Offset = 0) -> Response:
    """Instances waiting for the model or being scored, in the order of work."""
    return as_json(audit_of(context_of(request)).queue(limit, offset).as_dict())


@router.get("/destinations")
def destinations(request: Request, _p: Viewer) -> Response:
    """Each destination: deliveries by state, last success, last failure with its reason."""
    web = context_of(request)
    configured = {d.name: d for d in web.config.destinations}
    out = audit_of(web).destinations(list(configured))
    for item in out:
        dest = configured.get(item["name"])
        item["address"] = f"{dest.ae_title}@{dest.host}:{dest.port}" if dest else None
    return as_json(out)


@router.get("/dead-letters")
def dead_letters(request: Request, _p: Viewer, destination: str | None = None,
                 since: Since = None, until: Until = None, limit: Limit = 50,
                 offset: Offset = 0) -> Response:
    """Dead deliveries (retries ran out), newest first, with the last error."""
    return as_json(audit_of(context_of(request)).dead_letters(
        destination=destination, since=parse_bound(since, end=False),
        until=parse_bound(until, end=True), limit=limit, offset=offset).as_dict())


@router.get("/models")
def models(request: Request, _p: Viewer, since: Since = None,
           until: Until = None) -> Response:
    """Every model that served (results per model version); default: all time."""
    lo = parse_bound(since, end=False) or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    hi = parse_bound(until, end=True) or dt.datetime.now(dt.UTC)
    return as_json(audit_of(context_of(request)).ask("models", lo, hi))


@router.get("/audit/{question}")
def audit(request: Request, _p: Viewer, question: str, since: Since = None,
          until: Until = None) -> Response:
    """An audit question, as ``fracture-node audit QUESTION --json`` answers it (default: the
    last 30 days)."""
    if question not in QUESTIONS:
        raise HTTPException(404, f"no such question; ask one of {', '.join(QUESTIONS)}")
    now = dt.datetime.now(dt.UTC)
    lo = parse_bound(since, end=False) or dt.datetime.combine(
        now.date() - dt.timedelta(days=DEFAULT_DAYS), dt.time(), dt.UTC)
    hi = parse_bound(until, end=True) or now
    if hi <= lo:
        raise HTTPException(422, "until is not after since")
    return as_json({"question": question, "since": lo, "until": hi,
            "rows": audit_of(context_of(request)).ask(question, lo, hi)})


# Actions ------------------------------------------------------------------------------------

def _store(web: WebContext) -> Any:
    if web.store is None:
        raise HTTPException(503, "this server cannot change state (no database writer)")
    return web.store


@router.post("/deliveries/{delivery_id}/retry")
def retry_delivery(request: Request, principal: Operator, delivery_id: int) -> Response:
    """Queue a dead delivery again with a fresh deadline (as ``fracture-node retry``);
    409 when it is not dead. Recorded with the user who asked."""
    web = context_of(request)
    count = actions.retry_delivery(_store(web), delivery_id, web.config.delivery.deadline_s,
                                   actor_of(principal, request))
    log.info("delivery_retry_asked", user=principal.name, delivery_id=delivery_id,
             queued=count)
    if not count:
        raise HTTPException(409, f"delivery {delivery_id} is not dead (or does not exist)")
    web.on_change()
    return as_json({"delivery_id": delivery_id, "queued": True})


@router.post("/studies/{study_uid}/reprocess")
def reprocess_study(request: Request, principal: Operator, study_uid: str) -> Response:
    """Report a study whose report failed (parked or retrying) again now (as
    ``fracture-node reprocess``); 409 when its report did not fail. Recorded with the user."""
    web = context_of(request)
    count = actions.reprocess_study(_store(web), study_uid, actor_of(principal, request))
    log.info("study_reprocess_asked", user=principal.name, study_instance_uid=study_uid,
             due=count)
    if not count:
        raise HTTPException(409, "the study's report did not fail (or there is no such study)")
    web.on_change()
    return as_json({"study_instance_uid": study_uid, "due": True})

"""Delivery: sends each report to each ``[[destinations]]`` entry (C-STORE or STOW-RS), retrying.

A delivery carries the SR and, for a destination with ``overlays``, the overlay objects made
with the report (``delivery_objects``), all over one association per attempt (C-STORE) or in
one request (STOW-RS, a destination with ``dicomweb_url``: an object counts as stored only when
the response lists it in its ReferencedSOPSequence and not in its FailedSOPSequence). What was stored
stays stored: a later attempt sends only what is left (the SR is not sent twice), and the
delivery is ``delivered`` once everything is.

Every attempt is recorded in ``delivery_attempts`` (time, destination, status, error). A failed
attempt is retried with exponential back-off (``first_retry_s`` doubling up to ``max_retry_s``,
with a little jitter so that many reports do not hammer a PACS that comes back); after
``deadline_s`` without success the delivery is dead-lettered, visible in SQL and in the metrics,
until ``fracture-node retry`` queues it again. The pass runs as an APScheduler job and also
right after a report is made (for latency).

An overlay whose file is gone (purged by retention, which only happens once nothing needs it, or
deleted by hand) is not sent: its ``delivery_objects`` row records why, the SR and the other
overlays are sent, and the delivery is dead-lettered at once when nothing else is left to retry
(no retry brings a file back; restore it and run ``fracture-node retry``).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracture_node.config import Config, Destination
from fracture_node.db import schema as s
from fracture_node.db.reporting import DueDelivery, DueObject, ObjectOutcome
from fracture_node.db.store import Store, utcnow
from fracture_node.dicom.send import StoreOutcome, store_many
from fracture_node.dicom.stow import stow_many
from fracture_node.errors import DeliveryError
from fracture_node.logs import get_logger

log = get_logger("delivery")


def backoff_s(config: Config, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones (1 = the first failure)."""
    d = config.delivery
    base = min(d.max_retry_s, d.first_retry_s * 2 ** max(0, attempts - 1))
    return base * random.uniform(0.9, 1.1)


class Deliverer:
    """Sends due deliveries; safe to call from several threads or processes at once."""

    def __init__(self, config: Config, store: Store, node: str, metrics: Any | None = None
                 ) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.metrics = metrics
        self.destinations: dict[str, Destination] = {d.name: d for d in config.destinations}
        self._lock = threading.Lock()

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were delivered."""
        if not self._lock.acquire(blocking=False):
            return 0  # another thread of this process is sending right now
        try:
            lease = self.config.delivery.timeout_s * 4 + 5
            delivered = 0
            while True:
                due = self.store.claim_deliveries(lease_s=lease)
                if not due:
                    return delivered
                for item in due:
                    delivered += self._attempt(item) == s.DELIVERED
        finally:
            self._lock.release()

    def _send(self, paths: list[Path], dest: Destination) -> list[StoreOutcome]:
        """One outcome per object: by STOW-RS in one request, or C-STORE on one association."""
        if dest.is_dicomweb:
            return stow_many(paths, dest, timeout_s=self.config.delivery.timeout_s)
        return store_many(paths, dest, calling_ae_title=self.config.node.ae_title,
                          timeout_s=self.config.delivery.timeout_s,
                          tls=self.config.tls if dest.tls else None)

    def _attempt(self, item: DueDelivery) -> str:
        """One delivery attempt: send what is left, record the outcome, log it; its state."""
        started_at = utcnow()
        tried = self._try(item)
        retry_in = backoff_s(self.config, item.attempts + 1)
        state = self.store.record_attempt(item, ok=tried.ok, status=tried.status,
                                          error=tried.error,
                                          duration_ms=round(tried.duration_s * 1000, 1),
                                          node=self.node,
                                          retry_in_s=None if tried.no_retry else retry_in,
                                          report_stored=tried.report_stored,
                                          objects=tried.objects, started_at=started_at,
                                          report_stored_after_s=tried.report_after_s)
        if self.metrics:
            self.metrics.deliveries.labels(item.destination,
                                           "delivered" if tried.ok else "failed").inc()
        _log_attempt(item, tried, state, retry_in)
        return state

    def _try(self, item: DueDelivery) -> _Tried:
        """Send the SR (unless stored by an earlier attempt) and the overlays still owed."""
        dest = self.destinations.get(item.destination)
        if dest is None:
            return _Tried(error=f"destination {item.destination!r} is no longer configured; "
                                "add it back to [[destinations]] or leave the delivery dead")
        if item.report_delivered and not item.objects:
            return _Tried(ok=True)  # everything was stored; only the state was left to record
        tried = _Tried()
        reports_dir = self.config.reports_dir
        sent: list[DueObject] = []
        gone: list[DueObject] = []
        for o in item.objects:
            (sent if (reports_dir / o.path).is_file() else gone).append(o)
        names = ([] if item.report_delivered else ["the SR"]) + [_name(o) for o in sent]
        paths = ([] if item.report_delivered else [reports_dir / item.report_path]) + [
            reports_dir / o.path for o in sent]
        rest_ok = True
        if paths:
            try:
                outcomes = self._send(paths, dest)
            except DeliveryError as exc:
                tried.error, rest_ok = str(exc), False
            else:
                tried.report_stored = not item.report_delivered and outcomes[0].ok
                tried.report_after_s = outcomes[0].duration_s if tried.report_stored else None
                tried.objects = [ObjectOutcome(o.id, out.ok, out.status, out.error,
                                               out.duration_s) for o, out in
                                 zip(sent, outcomes[len(outcomes) - len(sent):], strict=True)]
                tried.ok, tried.status, tried.error = _summary(outcomes, names,
                                                               item.report_delivered)
                rest_ok = tried.ok
                tried.duration_s = max((out.duration_s for out in outcomes), default=0.0)
        if gone:
            tried.objects += [ObjectOutcome(o.id, False, None, _gone_error(o)) for o in gone]
            for o in gone:
                log.error("overlay_file_missing", delivery_id=item.id,
                          destination=item.destination, kind=o.kind,
                          sop_instance_uid=o.sop_instance_uid,
                          purged_at=o.purged_at.isoformat() if o.purged_at else None)
            missing = _gone_summary(gone)
            tried.ok = False
            tried.error = missing if tried.error is None else f"{tried.error}; {missing}"
            if rest_ok:
                tried.no_retry = True  # only files that no retry brings back are left
        return tried


@dataclass
class _Tried:
    """What one attempt achieved, before it is recorded."""

    ok: bool = False
    status: int | None = None
    error: str | None = None
    duration_s: float = 0.0
    report_stored: bool = False
    report_after_s: float | None = None
    objects: list[ObjectOutcome] = field(default_factory=list)
    no_retry: bool = False
    """Only files that no retry brings back are missing: dead at once."""


def _log_attempt(item: DueDelivery, tried: _Tried, state: str, retry_in: float) -> None:
    if tried.ok:
        log.info("report_delivered", delivery_id=item.id, destination=item.destination,
                 sop_instance_uid=item.report_sop_instance_uid, attempt=item.attempts + 1,
                 overlays=len(item.objects), ms=round(tried.duration_s * 1000, 1))
    elif state == s.DEAD:
        log.error("delivery_dead", delivery_id=item.id, destination=item.destination,
                  sop_instance_uid=item.report_sop_instance_uid, attempts=item.attempts + 1,
                  error=tried.error)
    else:
        log.warning("delivery_failed", delivery_id=item.id, destination=item.destination,
                    sop_instance_uid=item.report_sop_instance_uid,
                    attempt=item.attempts + 1, error=tried.error, retry_in_s=round(retry_in, 1))


_KIND_NAMES = {"sc": "Secondary Capture", "gsps": "presentation state"}


def _name(obj: DueObject) -> str:
    return f"the {_KIND_NAMES.get(obj.kind, obj.kind)} {obj.sop_instance_uid}"


def _gone_reason(obj: DueObject) -> str:
    if obj.purged_at is not None:
        return f"its file was purged by retention on {obj.purged_at:%Y-%m-%d}"
    return "its file is missing from the reports folder"


def _gone_error(obj: DueObject) -> str:
    """``delivery_objects.last_error`` of an overlay not sent because its file is gone."""
    return (f"not sent: {_gone_reason(obj)}; fix: restore it from a backup of the reports "
            "folder and run fracture-node retry")


def _gone_summary(gone: list[DueObject]) -> str:
    """The delivery's error for the overlays not sent because their files are gone."""
    parts = [f"{_name(o)}: {_gone_reason(o)}" for o in gone]
    return (f"{len(gone)} overlay{'s' if len(gone) > 1 else ''} not sent, file gone: "
            + "; ".join(parts) + "; fix: restore from a backup of the reports folder and run "
            "fracture-node retry, or leave the delivery dead")


def _summary(outcomes: list[StoreOutcome], names: list[str], report_delivered: bool
             ) -> tuple[bool, int | None, str | None]:
    """One attempt's ok, status and error from the outcome of each object sent.

    The status is the SR's (or the first failure's when the SR was stored before or stored now
    while an overlay failed); the error names every object that failed.
    """
    failed = [(name, out) for name, out in zip(names, outcomes, strict=True) if not out.ok]
    if not failed:
        return True, outcomes[0].status, None
    status = failed[0][1].status if report_delivered or outcomes[0].ok else outcomes[0].status
    if len(outcomes) == 1:
        return False, status, failed[0][1].error
    parts = [f"{name}: {out.error}" for name, out in failed]
    stored = len(outcomes) - len(failed)
    return False, status, f"{len(failed)} of {len(outcomes)} objects not stored " \
        f"({stored} stored): " + "; ".join(parts)

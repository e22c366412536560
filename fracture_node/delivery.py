"""Delivery: sends each report to each ``[[destinations]]`` entry with C-STORE, retrying.

A delivery carries the SR and, for a destination with ``overlays``, the overlay objects made
with the report (``delivery_objects``), all over one association per attempt. What was stored
stays stored: a later attempt sends only what is left (the SR is not sent twice), and the
delivery is ``delivered`` once everything is.

Every attempt is recorded in ``delivery_attempts`` (time, destination, status, error). A failed
attempt is retried with exponential back-off (``first_retry_s`` doubling up to ``max_retry_s``,
with a little jitter so that many reports do not hammer a PACS that comes back); after
``deadline_s`` without success the delivery is dead-lettered, visible in SQL and in the metrics,
until ``fracture-node retry`` queues it again. The pass runs as an APScheduler job and also
right after a report is made (for latency).
"""

from __future__ import annotations

import random
import threading
from typing import Any

from fracture_node.config import Config, Destination
from fracture_node.db import schema as s
from fracture_node.db.reporting import DueDelivery, ObjectOutcome
from fracture_node.db.store import Store
from fracture_node.dicom.send import StoreOutcome, store_many
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

    def _attempt(self, item: DueDelivery) -> str:
        dest = self.destinations.get(item.destination)
        ok, status, error, duration_s = False, None, None, 0.0
        report_stored = False
        objects: list[ObjectOutcome] = []
        if dest is None:
            error = (f"destination {item.destination!r} is no longer configured; "
                     "add it back to [[destinations]] or leave the delivery dead")
        elif item.report_delivered and not item.objects:
            ok = True  # everything was stored; only the state was left to record
        else:
            names = ([] if item.report_delivered else ["the SR"]) + [
                f"the {_KIND_NAMES.get(o.kind, o.kind)} {o.sop_instance_uid}"
                for o in item.objects]
            paths = ([] if item.report_delivered
                     else [self.config.reports_dir / item.report_path]) + [
                self.config.reports_dir / o.path for o in item.objects]
            try:
                outcomes = store_many(paths, dest, calling_ae_title=self.config.node.ae_title,
                                      timeout_s=self.config.delivery.timeout_s,
                                      tls=self.config.tls if dest.tls else None)
            except DeliveryError as exc:
                error = str(exc)
            else:
                report_stored = not item.report_delivered and outcomes[0].ok
                objects = [ObjectOutcome(o.id, out.ok, out.status, out.error) for o, out in
                           zip(item.objects, outcomes[len(outcomes) - len(item.objects):],
                               strict=True)]
                ok, status, error = _summary(outcomes, names, item.report_delivered)
                duration_s = max((out.duration_s for out in outcomes), default=0.0)
        retry_in = backoff_s(self.config, item.attempts + 1)
        state = self.store.record_attempt(item, ok=ok, status=status, error=error,
                                          duration_ms=round(duration_s * 1000, 1),
                                          node=self.node, retry_in_s=retry_in,
                                          report_stored=report_stored, objects=objects)
        if self.metrics:
            self.metrics.deliveries.labels(item.destination,
                                           "delivered" if ok else "failed").inc()
        if ok:
            log.info("report_delivered", delivery_id=item.id, destination=item.destination,
                     sop_instance_uid=item.report_sop_instance_uid, attempt=item.attempts + 1,
                     overlays=len(item.objects), ms=round(duration_s * 1000, 1))
        elif state == s.DEAD:
            log.error("delivery_dead", delivery_id=item.id, destination=item.destination,
                      sop_instance_uid=item.report_sop_instance_uid, attempts=item.attempts + 1,
                      error=error)
        else:
            log.warning("delivery_failed", delivery_id=item.id, destination=item.destination,
                        sop_instance_uid=item.report_sop_instance_uid,
                        attempt=item.attempts + 1, error=error, retry_in_s=round(retry_in, 1))
        return state


_KIND_NAMES = {"sc": "Secondary Capture", "gsps": "presentation state"}


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

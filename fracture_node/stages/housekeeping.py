"""Housekeeping: the periodic jobs that keep a node healthy for years.

Jobs (on the node's one :class:`~fracture_node.scheduler.Scheduler`, in its upkeep pool, one
run of a job at a time):

``take_back_stale_claims`` (every minute)
    Claims older than ``[model] claim_timeout_s`` belong to a worker that stopped: requeue them,
    or mark them failed after ``[model] max_attempts`` claims (:func:`fracture_node.stages.claims.take_back`).
``purge_spool`` (hourly)
    Delete spool files received more than ``[storage] retention_days`` ago whose instance is
    final (processed, not processed, failed, superseded) and whose study was last reported more
    than ``retention_days`` ago with no report due now. The SQL rows stay
    (``instances.spool_purged_at`` is set): the audit trail is kept, only the pixels go.
    ``retention_days = 0`` keeps every file. The reports folder is left to ``purge_overlays``.
``purge_overlays`` (hourly)
    Delete overlay files (Secondary Captures, presentation states: ``report_objects.path``) of
    reports created more than ``retention_days`` ago that no delivery still needs: every
    delivery that carries one has stored it or is ``delivered`` (a ``dead`` delivery that has not
    stored it keeps it: ``fracture-node retry`` sends from the file). The rows stay
    (``report_objects.purged_at`` is set) and the emptied ``<SR uid>.overlays`` folder goes. SR
    files are never deleted (a later report version reads the previous SR);
    ``retention_days = 0`` keeps every file.
``maintain_database`` (hourly)
    SQLite: WAL checkpoint (truncate), sampled ``ANALYZE`` and ``PRAGMA optimize``; PostgreSQL:
    ``ANALYZE`` our tables.
    Successful runs of the two frequent jobs older than 90 days are pruned from
    ``housekeeping_runs`` (failures and the hourly jobs' runs are kept).
``refresh_metrics`` (every 30 s)
    Queue depth, dead deliveries and the age of the oldest unreported study on the gauges.

Each run logs a snake_case event and leaves a row in ``housekeeping_runs`` (JSON summary). A job
that fails logs ``housekeeping_failed`` and is tried again at its next interval: housekeeping
never stops the node.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracture_node.config import Config
from fracture_node.db import maintenance
from fracture_node.db.store import Store, utcnow
from fracture_node.errors import FractureNodeError, UnknownJob
from fracture_node.logs import get_logger
from fracture_node.metrics import Metrics
from fracture_node.scheduler import UPKEEP, Scheduler
from fracture_node.spool import Spool
from fracture_node.stages import claims

log = get_logger("housekeeping")

INTERVALS_S: dict[str, float] = {
    "take_back_stale_claims": 60.0,
    "purge_spool": 3600.0,
    "purge_overlays": 3600.0,
    "maintain_database": 3600.0,
    "refresh_metrics": 30.0,
}
"""Every job and how often it runs."""

JOBS = tuple(INTERVALS_S)

FIRST_RUN_DELAY_S: dict[str, float] = {
    "take_back_stale_claims": 5.0,
    "purge_spool": 120.0,
    "purge_overlays": 180.0,
    "maintain_database": 300.0,
    "refresh_metrics": 1.0,
}
"""Start-up is kept light: the heavy jobs first run a few minutes after the node starts."""

RUNS_KEPT_DAYS = 90.0
PRUNED_JOBS = ("take_back_stale_claims", "refresh_metrics")
"""Successful runs of these frequent jobs are pruned from ``housekeeping_runs`` after
``RUNS_KEPT_DAYS``; failed runs and the hourly jobs' runs are kept for good."""

PURGE_BATCH = 500
PURGE_MAX_S = 300.0
"""One purge run (spool or overlays) stops after this long and goes on at its next interval."""


@dataclass(frozen=True)
class JobRun:
    """What one run of a job did."""

    job: str
    ok: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Housekeeping:
    """The housekeeping jobs of one node.

    Parameters
    ----------
    config, store, spool, metrics:
        The node's parts (the daemon's).
    node:
        This process's name in SQL rows (:func:`fracture_node.dicom.scp.node_name`).
    clock:
        The current UTC time (tests move it).
    intervals_s:
        Override job intervals (seconds); tests and special sites.
    """

    def __init__(self, config: Config, store: Store, spool: Spool, metrics: Metrics, node: str,
                 *, clock: Callable[[], dt.datetime] = utcnow,
                 intervals_s: dict[str, float] | None = None) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.node = node
        self.clock = clock
        self.intervals_s = {**INTERVALS_S, **(intervals_s or {})}
        self._scheduler: Scheduler | None = None
        self._own_scheduler = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "take_back_stale_claims": self._take_back_stale_claims,
            "purge_spool": self._purge_spool,
            "purge_overlays": self._purge_overlays,
            "maintain_database": self._maintain_database,
            "refresh_metrics": self._refresh_metrics,
        }

    # Life cycle ---------------------------------------------------------------------------
    def start(self, scheduler: Scheduler | None = None) -> None:
        """Schedule every job on ``scheduler``'s upkeep pool (the node's one scheduler); with
        none (housekeeping alone, as in tests), on a scheduler of its own that :meth:`stop`
        ends."""
        with self._lock:
            if self._scheduler is not None:
                return
            self._stopping.clear()
            own = scheduler is None
            sched = Scheduler() if scheduler is None else scheduler
            for name in JOBS:
                sched.add(name, functools.partial(self.run_once, name), self.intervals_s[name],
                          pool=UPKEEP, misfire_grace_s=None,
                          first_in_s=min(FIRST_RUN_DELAY_S[name], self.intervals_s[name]))
            if own:
                sched.start()
            self._scheduler, self._own_scheduler = sched, own
        log.info("housekeeping_started", intervals_s=self.intervals_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop scheduling; waits up to ``timeout_s`` for a running job (a purge stops after
        its current batch).

        Safe to call twice.
        """
        self._stopping.set()
        with self._lock:
            sched, self._scheduler = self._scheduler, None
        if sched is None:
            return
        for name in JOBS:
            sched.remove(name)
        if self._own_scheduler:
            sched.stop(timeout_s)
        elif not sched.wait_idle(timeout_s, set(JOBS)):
            log.warning("housekeeping_still_running", timeout_s=round(timeout_s, 1))
        log.info("housekeeping_stopped")

    # Running ------------------------------------------------------------------------------
    def run_once(self, job: str) -> JobRun:
        """Run one job now (tests, ``fracture-node housekeeping``), record and log it."""
        if job not in self._jobs:
            raise UnknownJob(f"no housekeeping job {job!r}; use one of: {', '.join(JOBS)}")
        started = self.clock()
        t0 = time.monotonic()
        try:
            summary = self._jobs[job]()
            ok = not summary.get("errors")
        except Exception as exc:  # a job never takes the node down; it is tried again later
            ok = False
            first_line = (str(exc).splitlines() or [""])[0][:300]
            summary = {"error": f"{type(exc).__name__}: {first_line}"}
            log.error("housekeeping_failed", job=job, error=summary["error"])
        summary["duration_s"] = round(time.monotonic() - t0, 3)
        try:
            maintenance.record_run(self.store, job=job, node=self.node, started_at=started,
                                   finished_at=self.clock(), ok=ok, summary=summary)
        except FractureNodeError as exc:
            log.error("housekeeping_run_not_recorded", job=job, error=str(exc))
        return JobRun(job=job, ok=ok, summary=summary)

    # Jobs ---------------------------------------------------------------------------------
    def _take_back_stale_claims(self) -> dict[str, Any]:
        requeued, failed = claims.take_back(self.store, self.config.model, "housekeeping")
        return {"requeued": requeued, "failed": failed}

    def _purge_spool(self) -> dict[str, Any]:
        # Half-written files of a crashed receiver were never acknowledged: remove them.
        swept = self.spool.sweep_temporaries()
        if swept:
            log.info("spool_temporaries_removed", count=swept)
        days = self.config.storage.retention_days
        if days <= 0:
            log.debug("spool_purge_disabled")
            return {"skipped": "retention_days = 0 keeps every spool file",
                    "temporaries_removed": swept}
        return self._purge(maintenance.mark_spool_purged, self._delete_spool_file, days,
                           "spool_purged", "spool_purge_checked", temporaries_removed=swept)

    def _purge(self, mark: Callable[[Store, dt.datetime, dt.datetime, int], Sequence[Any]],
               delete: Callable[[Any, dict[str, Any], set[Path]], None], days: float,
               done_event: str, checked_event: str, **extra: Any) -> dict[str, Any]:
        """Mark rows older than ``days`` purged batch by batch (``mark``) and ``delete`` each
        one's file, for at most :data:`PURGE_MAX_S`; then remove the folders the deletions
        emptied. Logs ``done_event`` (info) when a file went, else ``checked_event`` (debug)."""
        now = self.clock()
        cutoff = now - dt.timedelta(days=days)
        summary: dict[str, Any] = {"cutoff": cutoff.isoformat(), "files_deleted": 0,
                                   "files_missing": 0, "bytes_freed": 0, "errors": 0,
                                   "folders_removed": 0, "complete": True, **extra}
        folders: set[Path] = set()
        deadline = time.monotonic() + PURGE_MAX_S
        while True:
            batch = mark(self.store, cutoff, now, PURGE_BATCH)
            for item in batch:
                delete(item, summary, folders)
            if len(batch) < PURGE_BATCH:
                break
            if time.monotonic() > deadline or self._stopping.is_set():
                summary["complete"] = False
                break
        for folder in sorted(folders):
            try:
                folder.rmdir()  # only when empty
                summary["folders_removed"] += 1
            except OSError:
                pass
        done = summary["files_deleted"] or summary["files_missing"]
        (log.info if done else log.debug)(done_event if done else checked_event, **summary)
        return summary

    def _delete_spool_file(self, item: maintenance.SpoolFile, summary: dict[str, Any],
                           folders: set[Path]) -> None:
        root = self.spool.root.resolve()
        path = _delete_file(root, item.spool_path, summary, outside="spool_path_outside_spool",
                            not_deleted="spool_file_not_deleted", instance_id=item.instance_id)
        if path is not None and path.parent != root:
            folders.add(path.parent)

    def _purge_overlays(self) -> dict[str, Any]:
        days = self.config.storage.retention_days
        if days <= 0:
            log.debug("overlay_purge_disabled")
            return {"skipped": "retention_days = 0 keeps every overlay file"}
        # An overlay still needed keeps its folder (only empty folders are removed).
        return self._purge(maintenance.mark_overlays_purged, self._delete_overlay_file, days,
                           "overlays_purged", "overlay_purge_checked")

    def _delete_overlay_file(self, item: maintenance.OverlayFile, summary: dict[str, Any],
                             folders: set[Path]) -> None:
        root = self.config.reports_dir.resolve()
        path = _delete_file(root, item.path, summary, outside="overlay_path_outside_reports",
                            not_deleted="overlay_file_not_deleted", object_id=item.object_id,
                            missing_too=True)
        # Only the report's own "<SR uid>.overlays" folder (nothing else writes there once the
        # report is made); the study folder holds the SRs.
        if path is not None and path.parent != root and path.parent.name.endswith(".overlays"):
            folders.add(path.parent)

    def _maintain_database(self) -> dict[str, Any]:
        summary = maintenance.optimize(self.store)
        pruned = maintenance.prune_runs(
            self.store, self.clock() - dt.timedelta(days=RUNS_KEPT_DAYS),
            PRUNED_JOBS)
        summary["housekeeping_runs_pruned"] = pruned
        log.info("database_maintained", **summary)
        return summary

    def _refresh_metrics(self) -> dict[str, Any]:
        g = maintenance.gauges(self.store, self.clock())
        self.metrics.queue_depth.set(g.queue_depth)
        self.metrics.dead_deliveries.set(g.dead_deliveries)
        self.metrics.parked_studies.set(g.parked_studies)
        self.metrics.oldest_unreported_study_seconds.set(g.oldest_unreported_study_seconds)
        summary = {"queue_depth": g.queue_depth, "claimed": g.claimed,
                   "dead_deliveries": g.dead_deliveries,
                   "pending_deliveries": g.pending_deliveries,
                   "unreported_studies": g.unreported_studies,
                   "parked_studies": g.parked_studies,
                   "oldest_unreported_study_seconds": round(g.oldest_unreported_study_seconds, 1)}
        log.debug("metrics_refreshed", **summary)
        return summary


def _delete_file(root: Path, relative: str, summary: dict[str, Any], *, outside: str,
                 not_deleted: str, missing_too: bool = False, **ids: int) -> Path | None:
    """Delete ``root / relative`` for a purge and count it in ``summary``.

    Returns the path when this call deleted the file (or, with ``missing_too``, when it was
    already missing: counted in ``files_missing``, not an error), else None: missing, outside
    ``root``, or an OS error (logged with ``outside`` or ``not_deleted`` and the row ``ids``,
    never the path).
    """
    path = (root / relative).resolve()
    if root not in path.parents:
        summary["errors"] += 1
        log.error(outside, **ids)
        return None
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        summary["files_missing"] += 1
        return path if missing_too else None
    except OSError as exc:
        summary["errors"] += 1
        log.error(not_deleted, error=os.strerror(exc.errno) if exc.errno else str(exc), **ids)
        return None
    summary["files_deleted"] += 1
    summary["bytes_freed"] += size
    return path

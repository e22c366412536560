"""The node's one scheduler: the report and delivery passes and the housekeeping jobs.

APScheduler 3's ``BackgroundScheduler`` with interval triggers and one run of a job at a time
(``max_instances=1``, missed runs coalesced). Two thread pools keep the kinds apart: ``stages``
for the frequent report and delivery passes, ``upkeep`` for housekeeping, so an hour-long purge
never holds up a report. Every job runs through a guard that logs its errors (``job_failed``)
instead of losing them in APScheduler's logger and counts the jobs running, so that
:meth:`Scheduler.stop` waits for them without holding APScheduler's locks (its
``shutdown(wait=True)`` does, and a job that touches the scheduler would then never end).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from fracture_node.errors import describe
from fracture_node.logs import get_logger

log = get_logger("scheduler")

STAGES = "stages"
UPKEEP = "upkeep"


class Scheduler:
    """Interval jobs on background threads; started by :meth:`start`, ended by :meth:`stop`."""

    def __init__(self, stage_threads: int = 2, upkeep_threads: int = 2) -> None:
        self._scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            executors={STAGES: ThreadPoolExecutor(max_workers=stage_threads),
                       UPKEEP: ThreadPoolExecutor(max_workers=upkeep_threads)},
            job_defaults={"coalesce": True, "max_instances": 1})
        self._running: dict[str, int] = {}
        self._idle = threading.Condition()
        self._stopped = threading.Event()

    def add(self, name: str, fn: Callable[[], object], every_s: float, *, pool: str = STAGES,
            first_in_s: float | None = None, misfire_grace_s: int | None = 30) -> None:
        """Run ``fn`` every ``every_s`` seconds (first after ``first_in_s``, default one
        interval) in ``pool`` (:data:`STAGES` or :data:`UPKEEP`). A run missed by more than
        ``misfire_grace_s`` whole seconds is skipped (None: never)."""
        first = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=every_s if first_in_s is None else first_in_s)
        self._scheduler.add_job(self._guarded(name, fn), "interval", seconds=every_s, id=name,
                                name=name, executor=pool, next_run_time=first,
                                misfire_grace_time=misfire_grace_s)

    def remove(self, name: str) -> None:
        """No more runs of ``name`` (a run in progress goes on)."""
        try:
            self._scheduler.remove_job(name)
        except Exception as exc:  # not scheduled, or the scheduler is already down
            log.debug("job_not_removed", job=name, error=type(exc).__name__)

    def poke(self, name: str) -> None:
        """Run ``name`` now rather than at its next interval; nothing once stopping."""
        if self._stopped.is_set():
            return
        try:
            self._scheduler.modify_job(name, next_run_time=dt.datetime.now(dt.UTC))
        except Exception as exc:  # a stopped scheduler, a job removed: nothing to hurry
            log.debug("job_not_hurried", job=name, error=type(exc).__name__)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Schedule nothing more, then wait up to ``timeout_s`` for the runs in progress."""
        self._stopped.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if not self.wait_idle(timeout_s):
            log.warning("jobs_still_running", timeout_s=round(timeout_s, 1),
                        jobs=sorted(n for n, k in self._running.items() if k))

    def wait_idle(self, timeout_s: float, names: set[str] | None = None) -> bool:
        """True once no job (of ``names``, default all) runs; False after ``timeout_s``."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not any(k for n, k in self._running.items()
                                if names is None or n in names), timeout_s)

    def _guarded(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with self._idle:
                self._running[name] = self._running.get(name, 0) + 1
            try:
                fn()
            except Exception as exc:
                log.error("job_failed", job=name, error=describe(exc))
            finally:
                with self._idle:
                    self._running[name] -= 1
                    self._idle.notify_all()

        return run

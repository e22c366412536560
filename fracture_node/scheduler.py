"""The node's one scheduler: the report and delivery passes and the housekeeping jobs.

APScheduler 3's ``BackgroundScheduler`` with interval triggers and one run of a job at a time
(``max_instances=1``, missed runs coalesced). Two thread pools keep the kinds apart: ``stages``
for the frequent report and delivery passes, ``upkeep`` for housekeeping, so an hour-long purge
never holds up a report. Every job runs through a guard that logs its errors (``job_failed``)
instead of losing them in APScheduler's logger and counts the jobs running, so that
:meth:`Scheduler.stop` waits for them without holding APScheduler's locks (its
``shutdown(wait=True)`` does, and a job that touches the scheduler would then never end).

A job is hurried by :meth:`Scheduler.poke` (run now) and :meth:`Scheduler.poke_at` (run at a
given moment, e.g. when the next study becomes stable); either only ever moves the next run
earlier. Whether a run of the job is in progress is known from the guard itself (set when the
job's function starts, cleared when it ends), not from APScheduler's events, which can come after
the run has already begun. A poke during a run makes that run call the job once more when it
ends; a later moment asked during a run is applied when the run ends. APScheduler allows two
instances of a job (``max_instances=2``), so a run hurried in the instant after the guard has
ended, before APScheduler has counted the run as over, is not skipped; an interval tick that
finds a run in progress is (as APScheduler's own limit would). The interval stays the fallback:
nothing relies on a hurry being heard (a restart forgets them).
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
            job_defaults={"coalesce": True, "max_instances": 2})
        self._running: dict[str, int] = {}
        self._idle = threading.Condition()
        self._stopped = threading.Event()
        self._active: set[str] = set()
        """Jobs whose function is running (under ``self._idle``)."""
        self._again: set[str] = set()
        """Jobs poked while running: their run calls the function once more."""
        self._hurry: dict[str, dt.datetime] = {}
        """The earliest later moment asked for each running job, applied when its run ends."""

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
        """Run ``name`` now rather than at its next interval (right after the run in progress,
        when there is one); nothing once stopping."""
        self.poke_at(name, dt.datetime.now(dt.UTC))

    def poke_at(self, name: str, when: dt.datetime) -> None:
        """Run ``name`` at ``when`` (timezone-aware) if that is before its next run; a run
        planned earlier stays. While ``name`` runs, a moment already come makes the run call it
        once more, and a later one is applied when the run ends. Nothing once stopping."""
        if self._stopped.is_set():
            return
        with self._idle:
            if name in self._active:
                if when <= dt.datetime.now(dt.UTC):
                    self._again.add(name)
                else:
                    kept = self._hurry.get(name)
                    self._hurry[name] = when if kept is None else min(kept, when)
                return
        self._move_earlier(name, when)

    def _move_earlier(self, name: str, when: dt.datetime) -> None:
        # Never under self._idle: APScheduler takes its own lock here.
        try:
            job = self._scheduler.get_job(name)
            if job is None or job.next_run_time is None or job.next_run_time <= when:
                return
            self._scheduler.modify_job(name, next_run_time=when)
        except Exception as exc:  # a stopped scheduler, a job removed: nothing to hurry
            log.debug("job_not_hurried", job=name, error=type(exc).__name__)

    def next_run(self, name: str) -> dt.datetime | None:
        """When ``name`` runs next (None: not scheduled)."""
        job = self._scheduler.get_job(name)
        return None if job is None else job.next_run_time

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
                if name in self._active:
                    return  # a tick during a run: skipped (a poke would have set _again)
                self._active.add(name)
                self._running[name] = self._running.get(name, 0) + 1
            hurry: dt.datetime | None = None
            try:
                while True:
                    try:
                        fn()
                    except Exception as exc:
                        log.error("job_failed", job=name, error=describe(exc))
                    with self._idle:
                        if name in self._again and not self._stopped.is_set():
                            self._again.discard(name)
                            continue
                        self._again.discard(name)
                        self._active.discard(name)
                        hurry = self._hurry.pop(name, None)
                        break
            finally:
                with self._idle:
                    self._active.discard(name)
                    self._running[name] -= 1
                    self._idle.notify_all()
            if hurry is not None and not self._stopped.is_set():
                self._move_earlier(name, hurry)

        return run

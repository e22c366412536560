"""The node's one scheduler: pools kept apart, errors logged, poke, stop waits for runs."""

from __future__ import annotations

import threading
import time

from structlog.testing import capture_logs

from fracture_node.scheduler import UPKEEP, Scheduler
from tests.support import wait_until


def test_a_long_upkeep_job_does_not_hold_up_the_stages() -> None:
    """While a housekeeping job runs for a second, a stage job every 50 ms keeps running."""
    sched = Scheduler(stage_threads=1, upkeep_threads=1)
    release = threading.Event()
    ticks: list[float] = []
    sched.add("purge", lambda: release.wait(5), 0.05, pool=UPKEEP, first_in_s=0)
    sched.add("report", lambda: ticks.append(time.monotonic()), 0.05, first_in_s=0)
    sched.start()
    try:
        wait_until(lambda: len(ticks) >= 5, timeout=5, what="five report runs")
    finally:
        release.set()
        sched.stop(5)


def test_a_failing_job_is_logged_and_runs_again() -> None:
    """An exception in a job is a job_failed event, and the job runs at its next interval."""
    sched = Scheduler()
    runs: list[int] = []

    def boom() -> None:
        runs.append(1)
        raise RuntimeError("broken")

    with capture_logs() as events:
        sched.add("deliver", boom, 0.05, first_in_s=0)
        sched.start()
        wait_until(lambda: len(runs) >= 2, timeout=5, what="two runs")
        sched.stop(5)
    assert any(e["event"] == "job_failed" and e["job"] == "deliver" for e in events)


def test_poke_runs_a_job_now() -> None:
    """A job due in an hour runs at once when poked."""
    sched = Scheduler()
    ran = threading.Event()
    sched.add("report", ran.set, 3600.0)
    sched.start()
    try:
        assert not ran.wait(0.3)
        sched.poke("report")
        assert ran.wait(5)
    finally:
        sched.stop(5)


def test_stop_waits_for_the_run_in_progress_and_nothing_runs_after() -> None:
    """stop() returns after the running job ends; no run starts afterwards, poke is ignored."""
    sched = Scheduler()
    started, finished = threading.Event(), threading.Event()
    count: list[int] = []

    def slow() -> None:
        count.append(1)
        started.set()
        time.sleep(0.5)
        finished.set()

    sched.add("report", slow, 0.05, first_in_s=0)
    sched.start()
    assert started.wait(5)
    sched.stop(5)
    assert finished.is_set()
    runs = len(count)
    sched.poke("report")
    time.sleep(0.3)
    assert len(count) == runs

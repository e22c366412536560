"""The node's one scheduler: pools kept apart, errors logged, poke and poke_at, stop waits
for runs."""

from __future__ import annotations

import datetime as dt
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


def test_poke_at_moves_the_next_run_earlier() -> None:
    """A job due in an hour is moved to the moment poke_at names when that comes first."""
    sched = Scheduler()
    sched.add("report", lambda: None, 3600.0)
    sched.start()
    try:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=600)
        sched.poke_at("report", when)
        assert sched.next_run("report") == when
    finally:
        sched.stop(5)


def test_poke_at_never_delays_a_run() -> None:
    """A later moment than the run already planned leaves that run where it was."""
    sched = Scheduler()
    sched.add("report", lambda: None, 3600.0)
    sched.start()
    try:
        planned = sched.next_run("report")
        assert planned is not None
        sched.poke_at("report", planned + dt.timedelta(seconds=600))
        assert sched.next_run("report") == planned
        earlier = planned - dt.timedelta(seconds=1800)
        sched.poke_at("report", earlier)
        sched.poke_at("report", earlier + dt.timedelta(seconds=60))
        assert sched.next_run("report") == earlier
    finally:
        sched.stop(5)


def _report_job_held_in_its_first_run() -> tuple[Scheduler, threading.Event, list[int]]:
    """A started scheduler whose hourly "report" job is in its first run until ``release`` is
    set; ``runs`` gets one entry per run."""
    sched = Scheduler()
    release = threading.Event()
    runs: list[int] = []

    def job() -> None:
        runs.append(1)
        release.wait(5)

    sched.add("report", job, 3600.0, first_in_s=0)
    sched.start()
    wait_until(lambda: runs, timeout=5, what="the first run")
    return sched, release, runs


def test_a_poke_during_a_run_runs_the_job_again_after_it() -> None:
    """A poke while the job runs (a run APScheduler would skip) gives one more run after it."""
    sched, release, runs = _report_job_held_in_its_first_run()
    try:
        sched.poke("report")
        release.set()
        wait_until(lambda: len(runs) >= 2, timeout=5, what="a second run")
    finally:
        release.set()
        sched.stop(5)


def test_a_later_moment_asked_during_a_run_is_applied_when_it_ends() -> None:
    """poke_at with a moment still to come, while the job runs: after the run, the job's next
    run is that moment (not the interval's), and no extra run happens meanwhile."""
    sched, release, runs = _report_job_held_in_its_first_run()
    try:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=600)
        sched.poke_at("report", when)
        release.set()
        wait_until(lambda: sched.next_run("report") == when, timeout=5,
                   what="the asked moment as the next run")
        assert len(runs) == 1
    finally:
        release.set()
        sched.stop(5)


def test_a_poke_in_the_instant_a_run_starts_is_not_lost() -> None:
    """Pokes that come as soon as the job's function has started (before APScheduler has even
    reported the run as submitted) each lead to a run after them."""
    sched = Scheduler()
    started = threading.Event()
    runs: list[int] = []

    def job() -> None:
        runs.append(1)
        started.set()

    sched.add("report", job, 3600.0, first_in_s=0)
    sched.start()
    try:
        for k in range(1, 20):
            assert started.wait(5), f"run {k}"
            started.clear()
            sched.poke("report")
        wait_until(lambda: len(runs) >= 20, timeout=5, what="a run after the last poke")
    finally:
        sched.stop(5)

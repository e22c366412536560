"""Housekeeping jobs on a real SQLite file and a real PostgreSQL: retention, claims, upkeep, gauges."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from structlog.testing import capture_logs

from fracture_node.config import Config, NodeConfig, StorageConfig
from fracture_node.db import migrate
from fracture_node.db import schema as s
from fracture_node.db.store import NewInstance, Store
from fracture_node.housekeeping import Housekeeping
from fracture_node.metrics import Metrics
from fracture_node.spool import Spool
from tests.support import postgres_database

NOW = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=40)
YOUNG = NOW - dt.timedelta(days=1)
NODE = "test-host:11112:1"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """One migrated database per backend for the whole module (emptied before each test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('hk') / 'node.db'}"
        migrate.upgrade(url)
        yield url
    else:
        with postgres_database() as url:
            migrate.upgrade(url)
            yield url


@pytest.fixture
def store(module_url: str) -> Iterator[Store]:
    st = Store(module_url)
    st.delete_all()
    yield st
    st.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", fsync=False)


def make_config(tmp_path: Path, url: str, retention_days: float = 30.0) -> Config:
    return Config(
        node=NodeConfig(state_dir=tmp_path / "state", port=0),
        storage=StorageConfig(spool_dir=tmp_path / "spool", retention_days=retention_days),
        database=dataclasses.replace(Config().database, url=url),
    ).validate()


def housekeeping(tmp_path: Path, store: Store, spool: Spool, metrics: Metrics | None = None,
                 retention_days: float = 30.0, **kwargs: object) -> Housekeeping:
    config = make_config(tmp_path, store.url, retention_days)
    return Housekeeping(config, store, spool, metrics or Metrics(), NODE, clock=lambda: NOW,
                        **kwargs)  # type: ignore[arg-type]


def receive(store: Store, spool: Spool, study: str, sop: str, received: dt.datetime,
            state: str = s.PROCESSED, sha: str | None = None) -> tuple[int, Path]:
    """Store a spool file and its row (as the SCP does), then put the row in ``state``."""
    sha = sha or (sop.replace(".", "") + "0" * 64)[:64]
    rel = spool.relative_path(study, sop, sha)
    path = spool.write(rel, b"DICM" + sop.encode())
    instance_id = store.add_instance(NewInstance(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=study,
        series_instance_uid=None, transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX",
        size_bytes=path.stat().st_size, sha256=sha, spool_path=rel, received_at=received,
        association_id=None))
    set_instance(store, instance_id, state=state)
    return instance_id, path


def set_instance(store: Store, instance_id: int, **values: object) -> None:
    store._run(lambda ses: ses.execute(update(s.Instance).where(s.Instance.id == instance_id)
                                       .values(**values)))


def mark_reported(store: Store, study: str, due: bool = False,
                  when: dt.datetime = NOW - dt.timedelta(days=39)) -> None:
    store._run(lambda ses: ses.execute(
        update(s.Study).where(s.Study.study_instance_uid == study)
        .values(report_due=due, reported_version=1, last_reported_at=when)))


def instance(store: Store, instance_id: int) -> s.Instance:
    return store.rows(s.Instance, s.Instance.id == instance_id)[0]


def runs(store: Store, job: str) -> list[s.HousekeepingRun]:
    return store.rows(s.HousekeepingRun, s.HousekeepingRun.job == job)


# Retention ------------------------------------------------------------------------------------

def test_purge_deletes_old_file_of_reported_study_and_keeps_row(
        tmp_path: Path, store: Store, spool: Spool) -> None:
    """An old processed instance of a reported study loses its file; its row stays, marked purged."""
    iid, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    run = housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert run.ok and run.summary["files_deleted"] == 1
    assert not path.exists()
    assert not path.parent.exists()
    assert instance(store, iid).spool_purged_at == NOW


def test_purge_leaves_the_reports_folder(tmp_path: Path, store: Store, spool: Spool) -> None:
    """Retention removes the study's spool file but never its SR or overlay files."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    hk = housekeeping(tmp_path, store, spool)
    reports = hk.config.reports_dir / "1.2.3"
    files = [reports / "9.1.dcm", reports / "9.1.overlays" / "sc-8.1.dcm",
             reports / "9.1.overlays" / "gsps-8.2.dcm"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"DICM")
    run = hk.run_once("purge_spool")
    assert run.ok and run.summary["files_deleted"] == 1 and not path.exists()
    assert all(f.exists() for f in files)


@pytest.mark.parametrize("state", [s.NOT_PROCESSED, s.FAILED, s.SUPERSEDED])
def test_purge_covers_every_final_state(tmp_path: Path, store: Store, spool: Spool,
                                        state: str) -> None:
    """Not-processed, failed and superseded instances are purged like processed ones."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD, state=state)
    mark_reported(store, "1.2.3")
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert not path.exists()


@pytest.mark.parametrize("state", [s.QUEUED, s.CLAIMED])
def test_purge_keeps_files_still_in_the_queue(tmp_path: Path, store: Store, spool: Spool,
                                              state: str) -> None:
    """A queued or claimed instance keeps its file however old it is."""
    iid, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD, state=state)
    mark_reported(store, "1.2.3")
    run = housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists() and run.summary["files_deleted"] == 0
    assert instance(store, iid).spool_purged_at is None


def test_purge_keeps_files_of_study_with_report_due(tmp_path: Path, store: Store,
                                                    spool: Spool) -> None:
    """A study whose report is due keeps every file, even old processed ones."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3", due=True)
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists()


def test_purge_keeps_files_of_never_reported_study(tmp_path: Path, store: Store,
                                                   spool: Spool) -> None:
    """A study that was never reported keeps its files."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists()


def test_purge_keeps_files_of_recently_reported_study(tmp_path: Path, store: Store,
                                                      spool: Spool) -> None:
    """An old file stays while its study's last report is younger than retention_days."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3", when=YOUNG)
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists()


def test_purge_keeps_young_files(tmp_path: Path, store: Store, spool: Spool) -> None:
    """A file younger than retention_days stays."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", YOUNG)
    mark_reported(store, "1.2.3")
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists()


def test_purge_keeps_file_shared_with_a_live_row(tmp_path: Path, store: Store,
                                                 spool: Spool) -> None:
    """A superseded row's file that a queued copy (same bytes, same name) now uses stays."""
    old_id, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD, state=s.SUPERSEDED,
                           sha="ab" * 32)
    mark_reported(store, "1.2.3")
    receive(store, spool, "1.2.3", "1.2.3.1", YOUNG, state=s.QUEUED, sha="ab" * 32)
    mark_reported(store, "1.2.3")
    housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert path.exists()
    assert instance(store, old_id).spool_purged_at is None


def test_retention_zero_keeps_everything(tmp_path: Path, store: Store, spool: Spool) -> None:
    """retention_days = 0 turns the purge off."""
    _, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    run = housekeeping(tmp_path, store, spool, retention_days=0).run_once("purge_spool")
    assert run.ok and "skipped" in run.summary
    assert path.exists()


def test_purge_of_missing_file_still_marks_row(tmp_path: Path, store: Store,
                                               spool: Spool) -> None:
    """A file already gone is counted as missing and the row is marked purged."""
    iid, path = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    path.unlink()
    mark_reported(store, "1.2.3")
    run = housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert run.summary["files_missing"] == 1
    assert instance(store, iid).spool_purged_at == NOW


def test_purge_logs_and_records_a_run(tmp_path: Path, store: Store, spool: Spool) -> None:
    """A purge logs spool_purged and records a housekeeping_runs row with a JSON summary."""
    receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    with capture_logs() as logs:
        housekeeping(tmp_path, store, spool).run_once("purge_spool")
    assert [e["files_deleted"] for e in logs if e["event"] == "spool_purged"] == [1]
    (row,) = runs(store, "purge_spool")
    assert row.ok and row.node == NODE
    assert json.loads(row.summary)["files_deleted"] == 1


# Claims ----------------------------------------------------------------------------------------

def test_stale_claims_are_taken_back(tmp_path: Path, store: Store, spool: Spool) -> None:
    """A claim older than claim_timeout_s goes back to the queue and the run is recorded."""
    iid, _ = receive(store, spool, "1.2.3", "1.2.3.1", YOUNG, state=s.QUEUED)
    assert [c.id for c in store.claim_instances("dead-worker", 10)] == [iid]
    set_instance(store, iid, claimed_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    run = housekeeping(tmp_path, store, spool).run_once("take_back_stale_claims")
    assert run.summary["requeued"] == 1
    assert instance(store, iid).state == s.QUEUED
    assert json.loads(runs(store, "take_back_stale_claims")[0].summary)["requeued"] == 1


# Database upkeep -------------------------------------------------------------------------------

def test_maintain_database(tmp_path: Path, store: Store, spool: Spool) -> None:
    """Upkeep checkpoints the whole WAL and optimizes SQLite, or analyzes our PostgreSQL tables."""
    receive(store, spool, "1.2.3", "1.2.3.1", YOUNG)
    run = housekeeping(tmp_path, store, spool).run_once("maintain_database")
    assert run.ok
    if store.is_postgres:
        assert set(run.summary["analyzed"]) == set(s.Base.metadata.tables)
    else:
        assert run.summary["optimized"] and not run.summary["wal_checkpoint_busy"]
        assert run.summary["wal_bytes_before"] > 0
        assert run.summary["wal_bytes_after"] == 0


def test_maintain_database_prunes_old_frequent_runs(tmp_path: Path, store: Store,
                                                    spool: Spool) -> None:
    """Successful runs of the frequent jobs older than 90 days go; failed ones stay."""
    hk = housekeeping(tmp_path, store, spool)
    hk.run_once("refresh_metrics")
    store._run(lambda ses: ses.add_all([
        s.HousekeepingRun(job="refresh_metrics", node=NODE, started_at=NOW - dt.timedelta(days=100),
                          finished_at=NOW - dt.timedelta(days=100), ok=ok, summary="{}")
        for ok in (True, False)]))
    run = hk.run_once("maintain_database")
    assert run.summary["housekeeping_runs_pruned"] == 1
    assert sorted(r.ok for r in runs(store, "refresh_metrics")) == [False, True]


# Gauges ----------------------------------------------------------------------------------------

def test_refresh_metrics_sets_gauges(tmp_path: Path, store: Store, spool: Spool) -> None:
    """Queue depth, dead deliveries and the oldest unreported study's age reach the gauges."""
    receive(store, spool, "1.2.3", "1.2.3.1", NOW - dt.timedelta(minutes=10), state=s.QUEUED)
    receive(store, spool, "1.2.3", "1.2.3.2", NOW - dt.timedelta(minutes=5), state=s.QUEUED)
    old_id, _ = receive(store, spool, "1.2.4", "1.2.4.1", OLD)
    mark_reported(store, "1.2.4")

    def add_dead(ses: object) -> None:
        report = s.Report(study_instance_uid="1.2.4", version=1, sop_instance_uid="9.1",
                          series_instance_uid="9", path="r.dcm", created_at=OLD,
                          instances_total=1, instances_positive=0, instances_unprocessed=0,
                          made_by=NODE)
        ses.add(report)  # type: ignore[attr-defined]
        ses.flush()  # type: ignore[attr-defined]
        ses.add(s.Delivery(report_id=report.id, destination="pacs",  # type: ignore[attr-defined]
                           state=s.DEAD, attempts=5, created_at=OLD, next_attempt_at=OLD,
                           deadline_at=OLD))

    store._run(add_dead)
    metrics = Metrics()
    housekeeping(tmp_path, store, spool, metrics).run_once("refresh_metrics")
    value = metrics.registry.get_sample_value
    assert value("fracture_node_queue_depth") == 2
    assert value("fracture_node_dead_deliveries") == 1
    assert value("fracture_node_oldest_unreported_study_seconds") == pytest.approx(600)


def test_oldest_unreported_counts_from_after_last_report(tmp_path: Path, store: Store,
                                                         spool: Spool) -> None:
    """A reported study that got a new instance waits since that instance, not since its first."""
    receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    receive(store, spool, "1.2.3", "1.2.3.2", NOW - dt.timedelta(minutes=3), state=s.QUEUED)
    metrics = Metrics()
    run = housekeeping(tmp_path, store, spool, metrics).run_once("refresh_metrics")
    assert run.summary["oldest_unreported_study_seconds"] == pytest.approx(180)


def test_due_study_without_later_instance_still_counts(tmp_path: Path, store: Store,
                                                       spool: Spool) -> None:
    """A due study whose instances all predate its last report waits since its latest instance."""
    receive(store, spool, "1.2.3", "1.2.3.1", NOW - dt.timedelta(minutes=2))
    mark_reported(store, "1.2.3", due=True, when=NOW - dt.timedelta(minutes=1))
    run = housekeeping(tmp_path, store, spool).run_once("refresh_metrics")
    assert run.summary["unreported_studies"] == 1
    assert run.summary["oldest_unreported_study_seconds"] == pytest.approx(120)


# Failures and scheduling -----------------------------------------------------------------------

def test_failing_job_is_logged_not_raised(tmp_path: Path, spool: Spool) -> None:
    """A job whose database has no tables fails with a log line and does not raise."""
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with capture_logs() as logs:
            run = housekeeping(tmp_path, empty, spool).run_once("take_back_stale_claims")
    finally:
        empty.dispose()
    assert not run.ok and "DatabaseError" in run.summary["error"]
    assert {"housekeeping_failed", "housekeeping_run_not_recorded"} <= {e["event"] for e in logs}


def test_scheduler_runs_jobs_and_stops(tmp_path: Path, store: Store, spool: Spool) -> None:
    """start() runs the jobs on their intervals in the background; stop() ends them."""
    hk = housekeeping(tmp_path, store, spool, intervals_s={"refresh_metrics": 0.2,
                                                           "take_back_stale_claims": 0.2})
    try:
        hk.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(runs(store, "refresh_metrics")) < 2:
            time.sleep(0.1)
    finally:
        hk.stop()
    assert len(runs(store, "refresh_metrics")) >= 2
    assert runs(store, "take_back_stale_claims")
    settled = len(runs(store, "refresh_metrics"))
    time.sleep(0.5)
    assert len(runs(store, "refresh_metrics")) == settled


def test_housekeeping_command_runs_one_job(tmp_path: Path, store: Store, spool: Spool,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`fracture-node housekeeping refresh_metrics --json` runs the job and records it."""
    from fracture_node import audit_cli

    receive(store, spool, "1.2.3", "1.2.3.1", YOUNG, state=s.QUEUED)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{store.url}"\n[storage]\nspool_dir = "{spool.root}"\n')
    assert audit_cli.main(["housekeeping", "refresh_metrics", "--config", str(config),
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["summary"]["queue_depth"] == 1
    assert len(runs(store, "refresh_metrics")) == 1

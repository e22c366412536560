"""Housekeeping jobs on a real SQLite file and a real PostgreSQL: retention (spool and overlay
files), claims, upkeep, gauges."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import update
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from fracture_node.config import Config, Destination, NodeConfig, StorageConfig
from fracture_node.db import schema as s
from fracture_node.db.store import NewInstance, Store
from fracture_node.metrics import Metrics
from fracture_node.spool import Spool
from fracture_node.stages.deliver import Deliverer
from fracture_node.stages.housekeeping import Housekeeping
from tests.support import migrated_database

NOW = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=40)
YOUNG = NOW - dt.timedelta(days=1)
NODE = "test-host:11112:1"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """One migrated database per backend for the whole module (emptied before each test)."""
    with migrated_database(request.param, tmp_path_factory.mktemp("hk")) as url:
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


def make_config(tmp_path: Path, url: str, retention_days: float = 30.0,
                destinations: tuple[Destination, ...] = ()) -> Config:
    return Config(
        node=NodeConfig(state_dir=tmp_path / "state", port=0),
        storage=StorageConfig(spool_dir=tmp_path / "spool", retention_days=retention_days),
        database=dataclasses.replace(Config().database, url=url),
        destinations=destinations,
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
    store.run(lambda ses: ses.execute(update(s.Instance).where(s.Instance.id == instance_id)
                                       .values(**values)))


def mark_reported(store: Store, study: str, due: bool = False,
                  when: dt.datetime = NOW - dt.timedelta(days=39)) -> None:
    store.run(lambda ses: ses.execute(
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
    """The spool purge removes the study's spool file but never its SR or overlay files (the
    overlays are purge_overlays' business, the SRs nobody's)."""
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


# Overlay retention ----------------------------------------------------------------------------

OVERLAY_CLASSES = {"sc": SecondaryCaptureImageStorage,
                   "gsps": GrayscaleSoftcopyPresentationStateStorage}
OVERLAY_ROOTS = {"sc": "8.1", "gsps": "8.2"}
"""The overlays' UIDs are ``<root>.<SR uid>``."""


def write_dicom(path: Path, sop_class: str, sop_instance: str) -> Path:
    """A small Part 10 file (enough for a C-STORE to storescp)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = "1.2.3"
    ds.Modality = "OT"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclasses.dataclass
class Made:
    """A report written as the reporter writes one: its SR file and its overlay files."""

    report_id: int
    sr: Path
    objects: dict[str, int]
    """``report_objects.id`` by kind."""
    files: dict[str, Path]
    folder: Path
    """``<study>/<SR uid>.overlays``."""


def make_report(store: Store, reports_dir: Path, created: dt.datetime, study: str = "1.2.3",
                version: int = 1, kinds: tuple[str, ...] = ("sc", "gsps")) -> Made:
    sr_uid = f"9.{study}.{version}"
    sr = write_dicom(reports_dir / study / f"{sr_uid}.dcm", Comprehensive3DSRStorage, sr_uid)
    folder = reports_dir / study / f"{sr_uid}.overlays"
    files = {kind: write_dicom(folder / f"{kind}-{OVERLAY_ROOTS[kind]}.{sr_uid}.dcm",
                               OVERLAY_CLASSES[kind], f"{OVERLAY_ROOTS[kind]}.{sr_uid}")
             for kind in kinds}

    def fn(ses: Session) -> Made:
        report = s.Report(study_instance_uid=study, version=version, sop_instance_uid=sr_uid,
                          series_instance_uid=f"9.{study}", path=f"{study}/{sr_uid}.dcm",
                          created_at=created, instances_total=1, instances_positive=1,
                          instances_unprocessed=0, made_by=NODE)
        ses.add(report)
        ses.flush()
        rows = {kind: s.ReportObject(
            report_id=report.id, kind=kind, sop_class_uid=OVERLAY_CLASSES[kind],
            sop_instance_uid=f"{OVERLAY_ROOTS[kind]}.{sr_uid}",
            series_instance_uid=f"{OVERLAY_ROOTS[kind]}.{study}",
            source_sop_instance_uid=f"{study}.1",
            path=path.relative_to(reports_dir).as_posix(), created_at=created)
            for kind, path in files.items()}
        ses.add_all(rows.values())
        ses.flush()
        return Made(report.id, sr, {k: r.id for k, r in rows.items()}, files, folder)

    made: Made = store.run(fn)
    return made


def carry(store: Store, made: Made, state: str, stored: dict[str, bool],
          destination: str = "pacs", sr_stored: bool = True) -> int:
    """A delivery of ``made`` in ``state`` carrying the overlays of ``stored`` (kind: stored?)."""
    when = OLD + dt.timedelta(minutes=1)

    def fn(ses: Session) -> int:
        row = s.Delivery(report_id=made.report_id, destination=destination, state=state,
                         attempts=1, created_at=OLD, next_attempt_at=OLD, deadline_at=OLD,
                         delivered_at=when if state == s.DELIVERED else None,
                         report_delivered_at=when if sr_stored else None)
        ses.add(row)
        ses.flush()
        ses.add_all(s.DeliveryObject(
            delivery_id=row.id, object_id=made.objects[kind],
            delivered_at=when if done else None) for kind, done in stored.items())
        return int(row.id)

    return int(store.run(fn))


def report_object(store: Store, object_id: int) -> s.ReportObject:
    return store.rows(s.ReportObject, s.ReportObject.id == object_id)[0]


def test_overlay_purge_deletes_delivered_old_overlays_and_keeps_the_sr(
        tmp_path: Path, store: Store, spool: Spool) -> None:
    """An old report whose delivery stored everything loses its overlay files and their
    .overlays folder; the SR file and every row stay, the rows marked purged."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, OLD)
    carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    size = sum(f.stat().st_size for f in made.files.values())
    with capture_logs() as logs:
        run = hk.run_once("purge_overlays")
    assert run.ok
    assert {k: run.summary[k] for k in ("files_deleted", "files_missing", "bytes_freed", "errors",
                                        "folders_removed", "complete")} == {
        "files_deleted": 2, "files_missing": 0, "bytes_freed": size, "errors": 0,
        "folders_removed": 1, "complete": True}
    assert not any(f.exists() for f in made.files.values()) and not made.folder.exists()
    assert made.sr.is_file()
    assert [report_object(store, i).purged_at for i in made.objects.values()] == [NOW, NOW]
    assert len(store.rows(s.DeliveryObject)) == 2 and len(store.rows(s.Report)) == 1
    [event] = [e for e in logs if e["event"] == "overlays_purged"]
    assert event["files_deleted"] == 2 and "path" not in event
    (row,) = runs(store, "purge_overlays")
    assert row.ok and json.loads(row.summary)["files_deleted"] == 2
    again = hk.run_once("purge_overlays")
    assert again.ok and again.summary["files_deleted"] == again.summary["files_missing"] == 0


def test_overlay_purge_keeps_young_overlays(tmp_path: Path, store: Store, spool: Spool) -> None:
    """Overlays of a report younger than retention_days stay, even when delivered."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, YOUNG)
    carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    run = hk.run_once("purge_overlays")
    assert run.ok and run.summary["files_deleted"] == 0
    assert all(f.is_file() for f in made.files.values())
    assert [report_object(store, i).purged_at for i in made.objects.values()] == [None, None]


@pytest.mark.parametrize("state", [s.DEAD, s.PENDING])
def test_overlay_purge_keeps_what_a_delivery_has_not_stored(
        tmp_path: Path, store: Store, spool: Spool, state: str) -> None:
    """A dead (retry sends it again) or pending delivery that has not stored an overlay keeps
    its file and their folder; the overlay it did store goes."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, OLD)
    carry(store, made, state, {"sc": True, "gsps": False})
    run = hk.run_once("purge_overlays")
    assert run.ok and run.summary["files_deleted"] == 1 and run.summary["folders_removed"] == 0
    assert not made.files["sc"].exists() and made.files["gsps"].is_file()
    assert report_object(store, made.objects["sc"]).purged_at == NOW
    assert report_object(store, made.objects["gsps"]).purged_at is None


def test_overlay_purge_waits_for_every_delivery(tmp_path: Path, store: Store,
                                                spool: Spool) -> None:
    """An overlay delivered to one destination but not stored by a dead delivery to another
    stays; once that delivery stores it, the next run deletes it."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, OLD, kinds=("sc",))
    carry(store, made, s.DELIVERED, {"sc": True}, destination="pacs")
    dead = carry(store, made, s.DEAD, {"sc": False}, destination="viewer")
    assert hk.run_once("purge_overlays").summary["files_deleted"] == 0
    assert made.files["sc"].is_file()
    store.run(lambda ses: ses.execute(
        update(s.DeliveryObject).where(s.DeliveryObject.delivery_id == dead)
        .values(delivered_at=NOW)))
    run = hk.run_once("purge_overlays")
    assert run.summary["files_deleted"] == 1 and not made.folder.exists()


def test_overlay_purge_takes_old_overlays_no_delivery_carries(
        tmp_path: Path, store: Store, spool: Spool) -> None:
    """An old overlay that no delivery carries goes."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, OLD)
    run = hk.run_once("purge_overlays")
    assert run.summary["files_deleted"] == 2 and not made.folder.exists() and made.sr.is_file()


def test_overlay_purge_retention_zero_keeps_everything(tmp_path: Path, store: Store,
                                                       spool: Spool) -> None:
    """retention_days = 0 turns the overlay purge off."""
    hk = housekeeping(tmp_path, store, spool, retention_days=0)
    made = make_report(store, hk.config.reports_dir, OLD - dt.timedelta(days=3650))
    carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    run = hk.run_once("purge_overlays")
    assert run.ok and "skipped" in run.summary
    assert all(f.is_file() for f in made.files.values())
    assert [report_object(store, i).purged_at for i in made.objects.values()] == [None, None]


def test_overlay_purge_of_missing_file_still_marks_row(tmp_path: Path, store: Store,
                                                       spool: Spool) -> None:
    """Files already gone are counted as missing, not errors; the rows are marked purged and the
    empty .overlays folder goes."""
    hk = housekeeping(tmp_path, store, spool)
    made = make_report(store, hk.config.reports_dir, OLD)
    carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    for f in made.files.values():
        f.unlink()
    run = hk.run_once("purge_overlays")
    assert run.ok and run.summary["files_missing"] == 2 and run.summary["errors"] == 0
    assert run.summary["files_deleted"] == 0 and run.summary["folders_removed"] == 1
    assert not made.folder.exists() and made.sr.is_file()
    assert [report_object(store, i).purged_at for i in made.objects.values()] == [NOW, NOW]


def test_overlay_purge_never_touches_sr_files_or_spool(tmp_path: Path, store: Store,
                                                      spool: Spool) -> None:
    """Two old report versions: every overlay goes, both SR files stay (version 2 read version
    1's), the study folder stays; the spool is not the overlay purge's business."""
    _, spool_file = receive(store, spool, "1.2.3", "1.2.3.1", OLD)
    mark_reported(store, "1.2.3")
    hk = housekeeping(tmp_path, store, spool)
    v1 = make_report(store, hk.config.reports_dir, OLD, version=1)
    v2 = make_report(store, hk.config.reports_dir, OLD + dt.timedelta(hours=1), version=2)
    for made in (v1, v2):
        carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    run = hk.run_once("purge_overlays")
    assert run.summary["files_deleted"] == 4 and run.summary["folders_removed"] == 2
    assert v1.sr.is_file() and v2.sr.is_file()
    assert sorted(p.name for p in (hk.config.reports_dir / "1.2.3").iterdir()) == \
        ["9.1.2.3.1.dcm", "9.1.2.3.2.dcm"]
    assert spool_file.is_file()


def test_purge_overlays_command(tmp_path: Path, store: Store, spool: Spool,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`fracture-node housekeeping purge_overlays --json` runs the job and records it."""
    from fracture_node.cli import operations as audit_cli

    config = tmp_path / "config.toml"
    state = tmp_path / "state"
    config.write_text(f'[database]\nurl = "{store.url}"\n[node]\nstate_dir = "{state}"\n'
                      f'[storage]\nspool_dir = "{spool.root}"\nretention_days = 1\n')
    made = make_report(store, state / "reports", NOW - dt.timedelta(days=2))
    carry(store, made, s.DELIVERED, {"sc": True, "gsps": True})
    assert audit_cli.main(["housekeeping", "purge_overlays", "--config", str(config),
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["summary"]["files_deleted"] == 2
    assert not made.folder.exists() and made.sr.is_file()
    assert len(runs(store, "purge_overlays")) == 1


# Delivering an overlay whose file is gone ---------------------------------------------------------

def test_retry_of_delivery_whose_overlay_file_was_purged(
        tmp_path: Path, store: Store, spool: Spool, storescp: tuple[int, Path]) -> None:
    """A dead delivery that still has to send an overlay whose file is gone (purged, or deleted
    by hand) is retried without crashing: the SR and the other overlay are stored, the gone one
    is recorded with its reason, the delivery is dead again at once (no retry brings a file
    back) and the log names UIDs only. Once the file is put back, a retry sends it."""
    from fracture_node import cli

    port, received = storescp
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    config = make_config(tmp_path, store.url, destinations=(pacs,))
    made = make_report(store, config.reports_dir, OLD)
    delivery_id = carry(store, made, s.DEAD, {"sc": False, "gsps": False}, sr_stored=False)
    sc_bytes = made.files["sc"].read_bytes()
    made.files["sc"].unlink()  # as if purged while still needed (only possible by hand)
    store.run(lambda ses: ses.execute(
        update(s.ReportObject).where(s.ReportObject.id == made.objects["sc"])
        .values(purged_at=OLD + dt.timedelta(days=31))))
    toml = tmp_path / "config.toml"
    toml.write_text(f'[database]\nurl = "{store.url}"\n')
    assert cli.main(["retry", "-c", str(toml)]) == 0

    deliverer = Deliverer(config, store, NODE)
    with capture_logs() as logs:
        assert deliverer.run_once() == 0
    [delivery] = store.rows(s.Delivery)
    assert delivery.state == s.DEAD and delivery.report_delivered_at is not None
    assert delivery.attempts == 2
    assert delivery.last_error.startswith("1 overlay not sent, file gone: the Secondary Capture "
                                          f"8.1.9.1.2.3.1: its file was purged by retention on "
                                          f"{(OLD + dt.timedelta(days=31)):%Y-%m-%d}")
    outcome = {o.object_id: o for o in store.rows(s.DeliveryObject)}
    sc, gsps = outcome[made.objects["sc"]], outcome[made.objects["gsps"]]
    assert sc.delivered_at is None and sc.last_error.startswith(
        "not sent: its file was purged by retention on")
    assert gsps.delivered_at is not None and gsps.last_status == 0
    assert sorted(str(pydicom.dcmread(p).SOPClassUID) for p in received.iterdir()) == sorted(
        [Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage])
    [gone] = [e for e in logs if e["event"] == "overlay_file_missing"]
    assert (gone["delivery_id"], gone["kind"], gone["sop_instance_uid"]) == \
        (delivery_id, "sc", "8.1.9.1.2.3.1")
    assert not any("path" in e or str(tmp_path) in json.dumps(e, default=str) for e in logs)
    assert [e["event"] for e in logs if e["event"].startswith("delivery_")] == ["delivery_dead"]

    made.files["sc"].write_bytes(sc_bytes)  # restored from a backup
    assert cli.main(["retry", "-c", str(toml)]) == 0
    assert deliverer.run_once() == 1
    [delivery] = store.rows(s.Delivery)
    assert delivery.state == s.DELIVERED
    assert all(o.delivered_at is not None for o in store.rows(s.DeliveryObject))
    assert len(list(received.iterdir())) == 3


def test_overlay_file_missing_by_hand_is_named_as_missing(
        tmp_path: Path, store: Store, spool: Spool, storescp: tuple[int, Path]) -> None:
    """An overlay file deleted by hand (not purged) while its delivery is pending: the SR is
    sent, the overlay's reason says the file is missing, the delivery is dead-lettered."""
    port, received = storescp
    pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    config = make_config(tmp_path, store.url, destinations=(pacs,))
    made = make_report(store, config.reports_dir, YOUNG, kinds=("sc",))
    carry(store, made, s.PENDING, {"sc": False}, sr_stored=False)
    store.run(lambda ses: ses.execute(update(s.Delivery).values(
        next_attempt_at=dt.datetime.now(dt.UTC), deadline_at=dt.datetime.now(dt.UTC)
        + dt.timedelta(days=1))))
    made.files["sc"].unlink()
    assert Deliverer(config, store, NODE).run_once() == 0
    [delivery] = store.rows(s.Delivery)
    assert delivery.state == s.DEAD and delivery.report_delivered_at is not None
    [obj] = store.rows(s.DeliveryObject)
    assert obj.delivered_at is None
    assert obj.last_error.startswith("not sent: its file is missing from the reports folder")
    assert [str(pydicom.dcmread(p).SOPClassUID) for p in received.iterdir()] == \
        [Comprehensive3DSRStorage]


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
    store.run(lambda ses: ses.add_all([
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

    store.run(add_dead)
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
    from fracture_node.cli import operations as audit_cli

    receive(store, spool, "1.2.3", "1.2.3.1", YOUNG, state=s.QUEUED)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{store.url}"\n[storage]\nspool_dir = "{spool.root}"\n')
    assert audit_cli.main(["housekeeping", "refresh_metrics", "--config", str(config),
                           "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["summary"]["queue_depth"] == 1
    assert len(runs(store, "refresh_metrics")) == 1

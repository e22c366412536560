"""Each audit question gives the expected figures on a small hand-made dataset (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from fracture_node.cli import operations as audit_cli
from fracture_node.db import audit, migrate
from fracture_node.db import schema as s
from fracture_node.db.store import Store
from tests.support import postgres_database

D1 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
D2 = D1 + dt.timedelta(days=1)
D3 = D1 + dt.timedelta(days=2)
NOW = D3 + dt.timedelta(hours=9)
MODEL_A = "a" * 64
MODEL_B = "b" * 64
REPO = Path(__file__).resolve().parents[2]
OVERLAY_CLASSES = {"sc": "1.2.840.10008.5.1.4.1.1.7", "gsps": "1.2.840.10008.5.1.4.1.1.11.1"}


def at(day: dt.datetime, hh: int, mm: int = 0, ss: int = 0) -> dt.datetime:
    return day + dt.timedelta(hours=hh, minutes=mm, seconds=ss)


def build_dataset(ses: Session) -> None:
    """Four associations, four studies, seven instances, four reports, four deliveries, seven
    overlays (five of them stored)."""
    def assoc(ae: str, peer: str, start: dt.datetime, outcome: str, stored: int, failed: int
              ) -> s.Association:
        row = s.Association(node="test:1:1", calling_ae_title=ae, called_ae_title="FRACTURE_NODE",
                            peer_address=peer, peer_port=4000, started_at=start,
                            ended_at=start + dt.timedelta(minutes=1), outcome=outcome,
                            instances_stored=stored, instances_failed=failed)
        ses.add(row)
        return row

    a1 = assoc("PACS_A", "10.0.0.1", at(D1, 8), "released", 3, 1)
    a2 = assoc("PACS_A", "10.0.0.2", at(D1, 9), "released", 1, 0)
    assoc("MODALITY_X", "10.0.0.9", at(D1, 10), "rejected", 0, 0)
    a4 = assoc("PACS_A", "10.0.0.1", at(D2, 8), "aborted", 2, 0)
    ses.flush()
    ses.add(s.StoreFailure(association_id=a1.id, at=at(D1, 8, 3), sop_instance_uid="1.2.9",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.1", status=0xC000,
                           reason="cannot_understand", detail="unreadable"))

    def study(uid: str, first: dt.datetime, last: dt.datetime, due: bool,
              reported: dt.datetime | None, version: int) -> None:
        ses.add(s.Study(study_instance_uid=uid, first_received_at=first, last_received_at=last,
                        instances_received=2, report_due=due, reported_version=version,
                        last_reported_at=reported))

    study("1.1", at(D1, 8), at(D1, 8, 2), False, at(D1, 12), 2)
    study("1.2", at(D1, 9), at(D1, 9), False, at(D1, 9, 2), 1)
    study("1.3", at(D2, 8), at(D2, 8, 1), False, at(D2, 8, 30), 1)
    study("1.4", at(D2, 9), at(D2, 9), True, None, 0)

    def inst(uid: str, study_uid: str, received: dt.datetime, assoc_id: int, state: str,
             reason: str | None = None) -> s.Instance:
        row = s.Instance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                         study_instance_uid=study_uid, series_instance_uid=study_uid + ".1",
                         transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX",
                         size_bytes=1000, sha256="0" * 64, spool_path=f"{study_uid}/{uid}.dcm",
                         received_at=received, association_id=assoc_id, state=state,
                         reason=reason, attempts=1, duplicates=0)
        ses.add(row)
        return row

    i1 = inst("1.1.1", "1.1", at(D1, 8), a1.id, s.PROCESSED)
    i2 = inst("1.1.2", "1.1", at(D1, 8, 1), a1.id, s.PROCESSED)
    inst("1.1.3", "1.1", at(D1, 8, 2), a1.id, s.NOT_PROCESSED, "out_of_scope_modality")
    i4 = inst("1.2.1", "1.2", at(D1, 9), a2.id, s.PROCESSED)
    i5 = inst("1.3.1", "1.3", at(D2, 8), a4.id, s.PROCESSED)
    inst("1.3.2", "1.3", at(D2, 8, 1), a4.id, s.FAILED, "too_many_attempts")
    inst("1.4.1", "1.4", at(D2, 9), a4.id, s.QUEUED)
    ses.flush()

    def result(instance: s.Instance, p: float, created: dt.datetime, sha: str, version: str
               ) -> None:
        ses.add(s.Result(instance_id=instance.id, probability=p, positive=p >= 0.5, threshold=0.5,
                         operating_point="balanced", model_name="densenet", model_version=version,
                         model_sha256=sha, decode_ms=5.0, infer_ms=20.0, batch_size=2,
                         worker="test:1:1", created_at=created))

    result(i1, 0.9, at(D1, 8, 5), MODEL_A, "1.0")
    result(i2, 0.2, at(D1, 8, 5), MODEL_A, "1.0")
    result(i4, 0.3, at(D1, 9, 1), MODEL_A, "1.0")
    result(i5, 0.8, at(D2, 8, 5), MODEL_B, "1.1")

    def report(study_uid: str, version: int, created: dt.datetime) -> s.Report:
        row = s.Report(study_instance_uid=study_uid, version=version,
                       sop_instance_uid=f"9.{study_uid}.{version}",
                       series_instance_uid=f"9.{study_uid}", path=f"{study_uid}/{version}.dcm",
                       created_at=created, instances_total=2, instances_positive=1,
                       instances_unprocessed=0, max_probability=0.9, model_sha256=MODEL_A,
                       made_by="test:1:1")
        ses.add(row)
        return row

    r1 = report("1.1", 1, at(D1, 8, 10))
    r2 = report("1.2", 1, at(D1, 9, 2))
    r3 = report("1.3", 1, at(D2, 8, 30))
    r4 = report("1.1", 2, at(D1, 12))
    ses.flush()

    def overlay(rep: s.Report, kind: str, source: str) -> s.ReportObject:
        row = s.ReportObject(report_id=rep.id, kind=kind, sop_class_uid=OVERLAY_CLASSES[kind],
                             sop_instance_uid=f"8.{kind}.{source}",
                             series_instance_uid=f"8.{kind}.{rep.study_instance_uid}",
                             source_sop_instance_uid=source,
                             path=f"{rep.study_instance_uid}/{rep.version}.overlays/{kind}.dcm",
                             created_at=rep.created_at)
        ses.add(row)
        return row

    def delivery(rep: s.Report, state: str, attempts: list[tuple[dt.datetime, bool]],
                 delivered: dt.datetime | None, report_delivered: dt.datetime | None = None,
                 objects: tuple[tuple[s.ReportObject, dt.datetime | None], ...] = ()) -> None:
        row = s.Delivery(report_id=rep.id, destination="pacs", state=state, attempts=len(attempts),
                         created_at=rep.created_at, next_attempt_at=rep.created_at,
                         deadline_at=rep.created_at + dt.timedelta(days=1), delivered_at=delivered,
                         report_delivered_at=report_delivered or delivered,
                         last_status=None if state == s.DELIVERED else 0xA700,
                         last_error=None if state == s.DELIVERED else "connection refused")
        ses.add(row)
        ses.flush()
        for when, ok in attempts:
            ses.add(s.DeliveryAttempt(delivery_id=row.id, attempted_at=when, duration_ms=10.0,
                                      ok=ok, status=0 if ok else None,
                                      error=None if ok else "connection refused", node="test:1:1"))
        for obj, stored in objects:
            ses.add(s.DeliveryObject(
                delivery_id=row.id, object_id=obj.id, delivered_at=stored,
                last_status=None if stored is None and not attempts else
                0x0000 if stored else 0xA700,
                last_error=None if stored or not attempts else "Out of Resources"))

    # Study 1.1 version 1 carries a Secondary Capture and a GSPS for each of its two images, all
    # stored, and retention has deleted the Secondary Captures' files; version 2 (still pending)
    # the GSPS of its positive image again. Study 1.3's PACS stored the SR and the Secondary
    # Capture and refused the GSPS until it was dead-lettered.
    r1_objects = [overlay(r1, kind, uid) for uid in ("1.1.1", "1.1.2") for kind in ("sc", "gsps")]
    for obj in r1_objects:
        obj.purged_at = at(D3, 1) if obj.kind == "sc" else None
    r3_sc, r3_gsps = overlay(r3, "sc", "1.3.1"), overlay(r3, "gsps", "1.3.1")
    r4_gsps = overlay(r4, "gsps", "1.1.1")
    ses.flush()
    delivery(r1, s.DELIVERED, [(at(D1, 8, 10, 30), False), (at(D1, 8, 11), True)], at(D1, 8, 11),
             objects=tuple((o, at(D1, 8, 11)) for o in r1_objects))
    delivery(r2, s.DELIVERED, [(at(D1, 9, 3), True)], at(D1, 9, 3))
    delivery(r3, s.DEAD, [(at(D2, 8, 31), False), (at(D2, 9), False), (at(D2, 10), False)], None,
             report_delivered=at(D2, 8, 31), objects=((r3_sc, at(D2, 8, 31)), (r3_gsps, None)))
    delivery(r4, s.PENDING, [], None, objects=((r4_gsps, None),))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[str]:
    """A migrated database holding the hand-made dataset: a SQLite file, then PostgreSQL."""
    def fill(db_url: str) -> None:
        migrate.upgrade(db_url)
        store = Store(db_url)
        store.run(build_dataset)
        store.dispose()

    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path_factory.mktemp('audit') / 'node.db'}"
        fill(db_url)
        yield db_url
    else:
        with postgres_database() as db_url:
            fill(db_url)
            yield db_url


@pytest.fixture(scope="module")
def auditor(url: str) -> Iterator[audit.Audit]:
    with audit.Audit(url) as a:
        yield a


def test_positives_per_day(auditor: audit.Audit) -> None:
    """Positives per day count results, positives, the rate and the (positive) studies."""
    rows = auditor.ask("positives", D1, D3)
    assert [(r["day"], r["instances"], r["positive"], r["studies"], r["positive_studies"])
            for r in rows] == [("2026-11-01", 3, 1, 2, 1), ("2026-11-02", 1, 1, 1, 1)]
    assert rows[0]["positive_rate"] == pytest.approx(1 / 3)
    assert rows[1]["positive_rate"] == pytest.approx(1.0)


def test_window_is_half_open(auditor: audit.Audit) -> None:
    """since is included and until is excluded."""
    assert [r["day"] for r in auditor.ask("positives", D2, D3)] == ["2026-11-02"]
    assert auditor.ask("positives", D1, at(D1, 8, 5)) == []


def test_turnaround_per_day(auditor: audit.Audit) -> None:
    """Turnaround gives nearest-rank p50/p95/max from arrival to first report and to the SR
    stored by a PACS (study 1.3's SR was stored although its delivery died on a GSPS)."""
    rows = auditor.ask("turnaround", D1, D3)
    assert rows == [
        {"day": "2026-11-01", "studies": 2, "reported": 2, "report_p50_s": pytest.approx(120),
         "report_p95_s": pytest.approx(600), "report_max_s": pytest.approx(600), "delivered": 2,
         "delivered_p50_s": pytest.approx(180), "delivered_p95_s": pytest.approx(660),
         "delivered_max_s": pytest.approx(660)},
        {"day": "2026-11-02", "studies": 2, "reported": 1, "report_p50_s": pytest.approx(1800),
         "report_p95_s": pytest.approx(1800), "report_max_s": pytest.approx(1800),
         "delivered": 1, "delivered_p50_s": pytest.approx(1860),
         "delivered_p95_s": pytest.approx(1860), "delivered_max_s": pytest.approx(1860)},
    ]


def test_results_per_model(auditor: audit.Audit) -> None:
    """Results per model version give count, positives, rate and first/last use per sha256."""
    rows = auditor.ask("models", D1, D3)
    assert [(r["model_sha256"], r["model_version"], r["results"], r["positive"]) for r in rows] \
        == [(MODEL_A, "1.0", 3, 1), (MODEL_B, "1.1", 1, 1)]
    assert rows[0]["positive_rate"] == pytest.approx(1 / 3)
    assert rows[0]["mean_probability"] == pytest.approx((0.9 + 0.2 + 0.3) / 3)
    assert rows[0]["first_used_at"] == at(D1, 8, 5)
    assert rows[0]["last_used_at"] == at(D1, 9, 1)


def test_failed_and_dead_deliveries(auditor: audit.Audit) -> None:
    """Deliveries lists the dead one and the one that failed before succeeding, not the others."""
    rows = auditor.ask("deliveries", D1, D3)
    assert [(r["study_instance_uid"], r["report_version"], r["state"], r["attempts"],
             r["failed_attempts"]) for r in rows] == [("1.1", 1, "delivered", 2, 1),
                                                      ("1.3", 1, "dead", 3, 3)]
    assert rows[1]["last_attempt_at"] == at(D2, 10)
    assert rows[1]["last_error"] == "connection refused"


def test_deliveries_show_the_objects_they_carry(auditor: audit.Audit) -> None:
    """Each listed delivery counts its Secondary Captures and GSPS, stored and not, and when the
    SR was stored."""
    rows = auditor.ask("deliveries", D1, D3)
    assert [(r["sc_objects"], r["sc_stored"], r["gsps_objects"], r["gsps_stored"],
             r["report_delivered_at"], r["objects"]) for r in rows] == [
        (2, 2, 2, 2, at(D1, 8, 11), "SR+2 SC+2 GSPS, all stored"),
        (1, 1, 1, 0, at(D2, 8, 31), "SR+1 SC+1 GSPS, 1 GSPS not stored"),
    ]


def test_objects_of_every_delivery(auditor: audit.Audit) -> None:
    """Objects lists the SR then each overlay of every delivery in the window, with where it
    went, when it was stored and the last status of what was not."""
    rows = auditor.ask("objects", D1, D3)
    assert [(r["study_instance_uid"], r["report_version"], r["destination"], r["kind"],
             r["source_sop_instance_uid"], r["delivered_at"]) for r in rows] == [
        ("1.1", 1, "pacs", "sr", None, at(D1, 8, 11)),
        ("1.1", 1, "pacs", "sc", "1.1.1", at(D1, 8, 11)),
        ("1.1", 1, "pacs", "sc", "1.1.2", at(D1, 8, 11)),
        ("1.1", 1, "pacs", "gsps", "1.1.1", at(D1, 8, 11)),
        ("1.1", 1, "pacs", "gsps", "1.1.2", at(D1, 8, 11)),
        ("1.2", 1, "pacs", "sr", None, at(D1, 9, 3)),
        ("1.1", 2, "pacs", "sr", None, None),
        ("1.1", 2, "pacs", "gsps", "1.1.1", None),
        ("1.3", 1, "pacs", "sr", None, at(D2, 8, 31)),
        ("1.3", 1, "pacs", "sc", "1.3.1", at(D2, 8, 31)),
        ("1.3", 1, "pacs", "gsps", "1.3.1", None),
    ]
    assert rows[0]["sop_instance_uid"] == "9.1.1.1" and rows[1]["sop_instance_uid"] == "8.sc.1.1.1"
    assert [(r["delivery_state"], r["last_status"], r["last_error"]) for r in rows[-3:]] == [
        ("dead", None, None), ("dead", 0x0000, None), ("dead", 0xA700, "Out of Resources")]
    assert (rows[6]["last_status"], rows[7]["last_status"]) == (0xA700, None)
    assert [r["file_purged_at"] for r in rows[:5]] == [None, at(D3, 1), at(D3, 1), None, None]
    assert all(r["file_purged_at"] is None for r in rows[5:])
    assert auditor.ask("objects", D2, D3) == rows[-3:]


@pytest.mark.parametrize(("counts", "summary"), [
    ((0, 0, 0, 0, True), "SR, all stored"),
    ((0, 0, 0, 0, False), "SR, none stored"),
    ((2, 0, 2, 0, False), "SR+2 SC+2 GSPS, none stored"),
    ((0, 0, 2, 1, True), "SR+2 GSPS, 1 GSPS not stored"),
    ((1, 0, 2, 2, False), "SR+1 SC+2 GSPS, SR+1 SC not stored"),
])
def test_objects_summary(counts: tuple[int, int, int, int, bool], summary: str) -> None:
    """The table's objects column names what a delivery carries and what is not stored yet."""
    sc, sc_stored, gsps, gsps_stored, sr_stored = counts
    row = {"sc_objects": sc, "sc_stored": sc_stored, "gsps_objects": gsps,
           "gsps_stored": gsps_stored, "report_delivered_at": D1 if sr_stored else None}
    assert audit.objects_summary(row) == summary


def test_sources_per_ae_per_day(auditor: audit.Audit) -> None:
    """Sources count associations, rejections, aborts, instances and failures per AE per day."""
    rows = auditor.ask("sources", D1, D3)
    assert [(r["day"], r["calling_ae_title"], r["associations"], r["rejected"], r["aborted"],
             r["instances_stored"], r["instances_failed"], r["peer_addresses"]) for r in rows] == [
        ("2026-11-01", "MODALITY_X", 1, 1, 0, 0, 0, "10.0.0.9"),
        ("2026-11-01", "PACS_A", 2, 0, 0, 4, 1, "10.0.0.1,10.0.0.2"),
        ("2026-11-02", "PACS_A", 1, 0, 1, 2, 0, "10.0.0.1"),
    ]
    assert rows[1]["first_at"] == at(D1, 8) and rows[1]["last_at"] == at(D1, 9)


def test_unprocessed_by_reason(auditor: audit.Audit) -> None:
    """Unprocessed counts not-processed and failed instances and refused stores by reason."""
    rows = auditor.ask("unprocessed", D1, D3)
    assert [(r["state"], r["reason"], r["instances"]) for r in rows] == [
        ("failed", "too_many_attempts", 1),
        ("not_processed", "out_of_scope_modality", 1),
        ("refused", "cannot_understand", 1),
    ]


def test_status_figures(auditor: audit.Audit) -> None:
    """Status gives queue depth, dead deliveries and the oldest unreported study's age."""
    st = auditor.status(NOW)
    assert st["queue_depth"] == 1
    assert st["dead_deliveries"] == 1
    assert st["pending_deliveries"] == 1
    assert st["unreported_studies"] == 1
    assert st["oldest_unreported_study_seconds"] == pytest.approx(86400.0)
    assert st["instance_states"] == {"failed": 1, "not_processed": 1, "processed": 4, "queued": 1}
    assert [(r["study_instance_uid"], r["version"]) for r in st["last_reports"]][:2] == \
        [("1.3", 1), ("1.1", 2)]


def test_cli_json_matches_questions(url: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`audit positives --json` prints the rows as JSON for scripts."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    code = audit_cli.main(["audit", "positives", "--config", str(config), "--since", "2026-11-01",
                           "--until", "2026-11-02", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["day"], r["instances"]) for r in out["rows"]] == [("2026-11-01", 3),
                                                                ("2026-11-02", 1)]


def test_cli_table_for_people(url: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """`audit sources` prints an aligned table with a header line."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    assert audit_cli.main(["audit", "sources", "-c", str(config), "--since", "2026-11-01",
                           "--until", "2026-11-02"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("day"))
    body = lines[header + 2:header + 5]
    assert [line.split()[1] for line in body] == ["MODALITY_X", "PACS_A", "PACS_A"]
    assert len({line.index("PACS_A") for line in body if "PACS_A" in line}) == 1


def test_cli_deliveries_table_and_json_show_objects(url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`audit deliveries` prints an objects column for people and the counts in --json."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    window = ["--since", "2026-11-01", "--until", "2026-11-02"]
    assert audit_cli.main(["audit", "deliveries", "-c", str(config), *window]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("delivery_id"))
    assert "objects" in lines[header].split() and "sc_objects" not in lines[header]
    column = lines[header].index(" objects ") + 1
    assert [line[column:].split(",")[0] for line in lines[header + 2:]] == \
        ["SR+2 SC+2 GSPS", "SR+1 SC+1 GSPS"]
    assert "all stored" in lines[header + 2] and "1 GSPS not stored" in lines[header + 3]
    assert audit_cli.main(["audit", "deliveries", "-c", str(config), *window, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["objects"], r["gsps_stored"], r["report_delivered_at"]) for r in out["rows"]] == [
        ("SR+2 SC+2 GSPS, all stored", 2, "2026-11-01T08:11:00+00:00"),
        ("SR+1 SC+1 GSPS, 1 GSPS not stored", 0, "2026-11-02T08:31:00+00:00")]


def test_cli_objects_table(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`audit objects` prints one line per object with its kind and destination."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    assert audit_cli.main(["audit", "objects", "-c", str(config), "--since", "2026-11-02",
                           "--until", "2026-11-02"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("delivery_id"))
    body = [line.split() for line in lines[header + 2:]]
    assert [(cells[3], cells[7]) for cells in body] == [("pacs", "sr"), ("pacs", "sc"),
                                                        ("pacs", "gsps")]
    assert "0xA700" in lines[-1] and lines[-1].rstrip().endswith("Out of Resources")


def test_cli_status_json(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --json` prints the queue depth and dead deliveries."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')
    assert audit_cli.main(["status", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["queue_depth"], out["dead_deliveries"]) == (1, 1)


def test_docs_hold_every_query() -> None:
    """docs/audit.md carries the exact SQL of every question for both backends."""
    doc = (REPO / "docs" / "audit.md").read_text()
    for name, per_dialect in audit.sql_for_docs().items():
        for dialect, sql in per_dialect.items():
            assert sql in doc, f"docs/audit.md lacks the {dialect} SQL of {name}"


def test_cli_missing_database_is_an_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Auditing a SQLite file that does not exist fails with exit 2 and creates nothing."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "absent.db"}"\n')
    assert audit_cli.main(["status", "--config", str(config)]) == 2
    assert "no database file" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()

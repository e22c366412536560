"""Report: a stable study becomes a versioned SR, or is closed when nothing in it was
assessed (a real database, spool and DICOM peers on loopback)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fracture_node.db import audit
from fracture_node.db import schema as s
from fracture_node.stages.report import Reporter
from tests.support.node import Node, make_node, sample_study


def test_study_with_open_association_is_not_reported(node: Node, samples_dir: Path) -> None:
    """While an association that brought instances is still open, the study waits."""
    assoc = node.store.open_association(node="n", calling_ae_title="A", called_ae_title="B",
                                        peer_address="127.0.0.1", peer_port=1)
    node.add(sample_study(samples_dir, 1)[0], association_id=assoc)
    node.drain()
    assert node.reporter.run_once() == 0
    node.store.close_association(assoc, "released")
    assert node.reporter.run_once() == 1


def test_a_study_not_yet_quiet_names_the_moment_it_will_be(node: Node,
                                                          samples_dir: Path) -> None:
    """A pass that finds a study not yet quiet tells on_quiet_at its last arrival plus
    stable_after_s (when the next pass should run) and reports nothing."""
    config = dataclasses.replace(
        node.config, study=dataclasses.replace(node.config.study, stable_after_s=600.0))
    told: list[dt.datetime] = []
    reporter = Reporter(config, node.store, node.spool, "test-node", node.reporter.algorithm,
                        on_quiet_at=told.append)
    node.add(sample_study(samples_dir, 1)[0])
    node.drain()
    assert reporter.run_once() == 0
    (study,) = node.store.rows(s.Study)
    assert told == [study.last_received_at + dt.timedelta(seconds=600)]


def test_a_quiet_study_held_back_names_no_moment(node: Node, samples_dir: Path) -> None:
    """A study already quiet but held back (its association still open) names no moment to
    on_quiet_at: one already past would run the pass again at once, over and over."""
    told: list[dt.datetime] = []
    reporter = Reporter(node.config, node.store, node.spool, "test-node",
                        node.reporter.algorithm, on_quiet_at=told.append)
    assoc = node.store.open_association(node="n", calling_ae_title="A", called_ae_title="B",
                                        peer_address="127.0.0.1", peer_port=1)
    node.add(sample_study(samples_dir, 1)[0], association_id=assoc)
    node.drain()
    assert reporter.run_once() == 0
    assert told == []


def test_late_instance_makes_a_new_version(node: Node, samples_dir: Path,
                                           pacs: tuple[int, Path]) -> None:
    """An instance arriving after the report gives version 2 with the predecessor named."""
    first, late = sample_study(samples_dir, 2)
    node.add(first)
    node.drain()
    node.reporter.run_once()
    node.add(late)
    node.drain()
    assert node.reporter.run_once() == 1
    reports = sorted(node.store.rows(s.Report), key=lambda r: r.version)
    assert [r.version for r in reports] == [1, 2]
    assert reports[0].series_instance_uid == reports[1].series_instance_uid
    v2 = pydicom.dcmread(node.config.reports_dir / reports[1].path)
    pred = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == reports[0].sop_instance_uid
    assert reports[1].instances_total == 2
    node.deliverer.run_once()
    assert len(list(pacs[1].iterdir())) == 2




def _same_study(samples_dir: Path, names: list[str]) -> list[pydicom.Dataset]:
    study_uid = generate_uid()
    out: list[pydicom.Dataset] = []
    for name in names:
        ds = pydicom.dcmread(samples_dir / name)
        ds.StudyInstanceUID = study_uid
        out.append(ds)
    return out


def test_study_with_nothing_assessed_gets_no_sr(node: Node, samples_dir: Path) -> None:
    """A CT + MR study is closed without an SR; the reasons stay on the instances in SQL."""
    for ds in _same_study(samples_dir, ["negative_controls/CT_small.dcm",
                                        "negative_controls/MR_small_RLE.dcm"]):
        node.add(ds)
    node.drain()
    assert node.reporter.run_once() == 0
    assert node.store.rows(s.Report) == []
    [study] = node.store.rows(s.Study)
    assert (study.report_due, study.reported_version) == (False, 0)
    assert study.last_reported_at is not None
    assert {(i.state, i.reason) for i in node.store.rows(s.Instance)} == {
        (s.NOT_PROCESSED, "out_of_scope_modality")}
    assert node.reporter.run_once() == 0  # not picked up again
    with audit.Audit(node.config.database_url) as auditor:
        assert auditor.status(dt.datetime.now(dt.UTC))["studies_not_assessed"] == 1
        unprocessed = auditor.ask("unprocessed", dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
                                  dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        assert {(r["reason"], r["instances"]) for r in unprocessed} == {
            ("out_of_scope_modality", 2)}


def test_nothing_assessed_can_still_be_reported_when_configured(
        tmp_path: Path, sqlite_url: str, tiny_model: Path, samples_dir: Path) -> None:
    """[scope] report_when_nothing_assessed = true sends the SR listing the reasons."""
    n = make_node(tmp_path, sqlite_url, tiny_model)
    n.reporter.config = dataclasses.replace(
        n.config, scope=dataclasses.replace(n.config.scope, report_when_nothing_assessed=True))
    try:
        for ds in _same_study(samples_dir, ["negative_controls/CT_small.dcm"]):
            n.add(ds)
        n.drain()
        assert n.reporter.run_once() == 1
        [report] = n.store.rows(s.Report)
        assert (report.instances_total, report.instances_unprocessed) == (1, 1)
    finally:
        n.close()

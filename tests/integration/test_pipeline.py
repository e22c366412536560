"""Worker, reporter and delivery over a real database, spool and DICOM peers on loopback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from fracture_node.config import ScopeConfig
from fracture_node.db import audit
from fracture_node.db import schema as s
from tests.support import free_port, wait_for_port
from tests.support.node import Node, make_node, sample_study


@pytest.fixture
def pacs(storescp: tuple[int, Path]) -> tuple[int, Path]:
    """The PACS of these tests: DCMTK storescp (see tests/conftest.py)."""
    return storescp




@pytest.fixture
def node(tmp_path: Path, db_url: str, tiny_model: Path, pacs: tuple[int, Path]
         ) -> Iterator[Node]:
    n = make_node(tmp_path, db_url, tiny_model, pacs[0])
    yield n
    n.close()


def test_worker_scores_every_queued_instance_once(node: Node, samples_dir: Path) -> None:
    """Each queued radiograph gets exactly one result with the model's identity."""
    for ds in sample_study(samples_dir, 5):
        node.add(ds)
    node.drain()
    results = node.store.rows(s.Result)
    assert len(results) == 5
    assert len({r.instance_id for r in results}) == 5
    assert all(0.0 <= r.probability <= 1.0 for r in results)
    assert {r.model_sha256 for r in results} == {node.classifier.sha256}
    assert all(r.positive == (r.probability >= r.threshold) for r in results)
    assert {i.state for i in node.store.rows(s.Instance)} == {s.PROCESSED}


def test_batches_respect_max_batch(tmp_path: Path, sqlite_url: str, tiny_model: Path,
                                   samples_dir: Path) -> None:
    """With max_batch 4, ten instances are scored in batches of at most four."""
    n = make_node(tmp_path, sqlite_url, tiny_model, max_batch=4, max_wait_ms=0)
    try:
        for ds in sample_study(samples_dir, 10):
            n.add(ds)
        n.drain()
        sizes = [r.batch_size for r in n.store.rows(s.Result)]
        assert len(sizes) == 10 and max(sizes) == 4
    finally:
        n.close()


def test_out_of_scope_objects_are_recorded_not_processed(node: Node, samples_dir: Path) -> None:
    """CT, MR and US objects end as not_processed with the reason, without a result."""
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "US_rgb_uncompressed.dcm"):
        node.add(pydicom.dcmread(samples_dir / "negative_controls" / name))
    node.drain()
    rows = node.store.rows(s.Instance)
    assert {r.state for r in rows} == {s.NOT_PROCESSED}
    assert all(r.reason for r in rows)
    assert node.store.rows(s.Result) == []


def test_undecodable_pixel_data_is_recorded_with_reason(node: Node, samples_dir: Path) -> None:
    """The malformed samples end as not_processed, reason undecodable, and the worker goes on."""
    for path in sorted((samples_dir / "malformed").glob("*.dcm")):
        node.add(pydicom.dcmread(path))
    node.add(sample_study(samples_dir, 1)[0])
    node.drain()
    states = sorted((r.state, r.reason) for r in node.store.rows(s.Instance))
    assert states.count((s.NOT_PROCESSED, "undecodable")) == 2
    assert (s.PROCESSED, None) in states


def test_taken_back_claim_is_processed_once(node: Node, samples_dir: Path) -> None:
    """A claim of a dead worker is taken back, processed by another, and recorded once."""
    node.add(sample_study(samples_dir, 1)[0])
    [claimed] = node.store.claim_instances("dead-worker", 10)
    assert node.store.take_back_stale_claims(dt.timedelta(0), max_attempts=3) == (1, 0)
    node.drain()
    # The dead worker comes back to life and tries to save its stale result: it is refused.
    from fracture_node.db.store import ResultRecord

    late = ResultRecord(claimed.id, 0.9, True, 0.5, "balanced", "x", "x", "x", 1, 1, 1)
    assert node.store.save_results("dead-worker", [late]) == 0
    assert len(node.store.rows(s.Result)) == 1


def test_retry_is_claimed_and_scored_alone(tmp_path: Path, db_url: str, tiny_model: Path,
                                          samples_dir: Path) -> None:
    """Instances a dead worker held come back as retries: each is claimed and scored alone
    (so an image that crashes the process cannot take its batch to max_attempts with it),
    and the fresh instances behind them still go in full batches."""
    n = make_node(tmp_path, db_url, tiny_model, max_batch=4, max_wait_ms=200)
    try:
        for ds in sample_study(samples_dir, 6):
            n.add(ds)
        dead = n.store.claim_instances("dead-worker", 2)
        assert n.store.take_back_stale_claims(dt.timedelta(0), max_attempts=3) == (2, 0)
        retried = {c.id for c in dead}
        # A worker with something in hand claims nothing past a retry at the head of the queue.
        assert n.store.claim_instances("other", 10, retry_alone=False) == []
        n.drain()
        results = {r.instance_id: r for r in n.store.rows(s.Result)}
        instances = n.store.rows(s.Instance)
        assert {i.state for i in instances} == {s.PROCESSED} and len(results) == 6
        assert all(results[i].batch_size == 1 for i in retried)
        assert max(r.batch_size for i, r in results.items() if i not in retried) > 1
        assert {i.id: i.attempts for i in instances if i.id in retried} == dict.fromkeys(retried, 2)
    finally:
        n.close()


def test_claim_stops_before_a_retry(node: Node, samples_dir: Path) -> None:
    """Fresh instances ahead of a retry are claimed; the claim stops at the retry, which is
    then claimed alone."""
    for ds in sample_study(samples_dir, 4):
        node.add(ds)
    ids = sorted(i.id for i in node.store.rows(s.Instance))
    [first, second] = node.store.claim_instances("dead-worker", 2)
    node.store.release_claims("dead-worker", [first.id])  # a clean stop: not a retry
    node.store.take_back_stale_claims(dt.timedelta(0), max_attempts=3)  # second: a retry
    assert [c.id for c in node.store.claim_instances("w", 10)] == [ids[0]]
    assert [(c.id, c.attempts) for c in node.store.claim_instances("w", 10)] == [(ids[1], 2)]
    assert [c.id for c in node.store.claim_instances("w", 10)] == ids[2:]


def test_stopping_worker_gives_claims_back(node: Node, samples_dir: Path) -> None:
    """Claims the worker holds but has not scored go back to the queue when it stops."""
    for ds in sample_study(samples_dir, 3):
        node.add(ds)
    node.worker._refill()
    node.worker.stop()
    assert {r.state for r in node.store.rows(s.Instance)} == {s.QUEUED}


def test_stable_study_is_reported_and_delivered(node: Node, samples_dir: Path,
                                                pacs: tuple[int, Path]) -> None:
    """A finished study gets one SR with a probability per image, delivered to the PACS."""
    study = sample_study(samples_dir, 3)
    for ds in study:
        node.add(ds)
    node.drain()
    assert node.reporter.run_once() == 1
    assert node.deliverer.run_once() == 1
    [report] = node.store.rows(s.Report)
    assert (report.version, report.instances_total) == (1, 3)
    [delivery] = node.store.rows(s.Delivery)
    assert delivery.state == s.DELIVERED
    [attempt] = node.store.rows(s.DeliveryAttempt)
    assert attempt.ok and attempt.status == 0
    # attempted_at is the attempt's start; the SR is stamped when the PACS answered it
    answered = delivery.report_delivered_at - attempt.attempted_at
    assert dt.timedelta(0) < answered <= dt.timedelta(milliseconds=attempt.duration_ms + 1)
    assert attempt.attempted_at < delivery.report_delivered_at <= delivery.delivered_at
    [received] = list(pacs[1].iterdir())
    sr = pydicom.dcmread(received)
    assert sr.StudyInstanceUID == study[0].StudyInstanceUID
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in _walk(sr) if getattr(item, "ValueType", "") == "IMAGE"}
    assert {ds.SOPInstanceUID for ds in study} <= referenced
    assert sum(1 for item in _walk(sr) if getattr(item, "ValueType", "") == "NUM") >= 3


def test_study_with_open_association_is_not_reported(node: Node, samples_dir: Path) -> None:
    """While an association that brought instances is still open, the study waits."""
    assoc = node.store.open_association(node="n", calling_ae_title="A", called_ae_title="B",
                                        peer_address="127.0.0.1", peer_port=1)
    node.add(sample_study(samples_dir, 1)[0], association_id=assoc)
    node.drain()
    assert node.reporter.run_once() == 0
    node.store.close_association(assoc, "released")
    assert node.reporter.run_once() == 1


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


def test_lease_of_a_stopped_run_is_made_due(node: Node, samples_dir: Path) -> None:
    """A delivery leased by a run that died is sent at once after make_deliveries_due (what
    a SQLite node does at start-up), not after the lease."""
    for ds in sample_study(samples_dir, 2):
        node.add(ds)
    node.drain()
    assert node.reporter.run_once() == 1
    assert len(node.store.claim_deliveries(lease_s=3600)) == 1  # the run that dies
    assert node.store.claim_deliveries(lease_s=3600) == []
    assert node.deliverer.run_once() == 0
    assert node.store.make_deliveries_due() == 1
    assert node.deliverer.run_once() == 1
    [delivery] = node.store.rows(s.Delivery)
    assert delivery.state == s.DELIVERED and node.store.make_deliveries_due() == 0


def test_unreachable_pacs_is_retried_then_dead_lettered_then_redelivered(
        tmp_path: Path, sqlite_url: str, tiny_model: Path, samples_dir: Path) -> None:
    """Failed deliveries are retried with back-off, dead-lettered at the deadline, and
    delivered after `retry` once the PACS is back."""
    pacs_port = free_port()
    n = make_node(tmp_path, sqlite_url, tiny_model, pacs_port, deadline_s=1.5)
    try:
        n.add(sample_study(samples_dir, 1)[0])
        n.drain()
        n.reporter.run_once()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n.deliverer.run_once()
            if n.store.delivery_states().get(s.DEAD):
                break
            time.sleep(0.1)
        attempts = n.store.rows(s.DeliveryAttempt)
        assert len(attempts) >= 2 and not any(a.ok for a in attempts)
        assert all(a.error for a in attempts)
        gaps = [(b.attempted_at - a.attempted_at).total_seconds()
                for a, b in zip(attempts, attempts[1:], strict=False)]
        assert min(gaps) >= 0.15
        assert n.store.delivery_states() == {s.DEAD: 1}
        out = tmp_path / "late-pacs"
        out.mkdir()
        proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(pacs_port)
            assert n.store.retry_dead_deliveries(deadline_s=60) == 1
            assert n.deliverer.run_once() == 1
            assert len(list(out.iterdir())) == 1
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        n.close()


def _walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _same_study(samples_dir: Path, names: list[str]) -> list[pydicom.Dataset]:
    study_uid = generate_uid()
    out = []
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


def test_default_scope_does_not_score_the_16_pixel_image(
        tmp_path: Path, sqlite_url: str, tiny_model: Path, samples_dir: Path) -> None:
    """With the shipped [scope], the 16 x 16 CR is not_processed (too_small), never scored."""
    n = make_node(tmp_path, sqlite_url, tiny_model)
    n.worker.config = dataclasses.replace(n.config, scope=ScopeConfig())
    try:
        for ds in sample_study(samples_dir, 1):
            n.add(ds)
        n.drain()
        [row] = n.store.rows(s.Instance)
        assert (row.state, row.reason) == (s.NOT_PROCESSED, "too_small")
        assert n.store.rows(s.Result) == []
    finally:
        n.close()

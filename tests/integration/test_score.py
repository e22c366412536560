"""Score: the worker claims queued instances, decodes them, scores them in batches, and
gives back or fails what it cannot finish (a real database and spool)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pydicom

from fracture_node.config import ScopeConfig
from fracture_node.db import schema as s
from tests.support.node import Node, make_node, sample_study


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


def test_a_blank_image_is_not_processed_and_the_study_goes_on(node: Node,
                                                              samples_dir: Path) -> None:
    """An instance whose pixels all have one grey level ends not_processed (blank_image) with no
    result; the other images of its study are scored."""
    import numpy as np

    blank, other = sample_study(samples_dir, 2)
    blank.PixelData = np.full_like(blank.pixel_array, 700).tobytes()
    node.add(blank)
    node.add(other)
    node.drain()
    rows = {r.sop_instance_uid: r for r in node.store.rows(s.Instance)}
    assert (rows[blank.SOPInstanceUID].state, rows[blank.SOPInstanceUID].reason) == (
        s.NOT_PROCESSED, "blank_image")
    assert rows[other.SOPInstanceUID].state == s.PROCESSED
    assert len(node.store.rows(s.Result)) == 1

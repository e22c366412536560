"""Deliver: each report goes to its PACS, is retried, dead-lettered and sent again (a real
database and DCMTK storescp on loopback)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fracture_node.db import schema as s
from tests.support import free_port, wait_for_port
from tests.support.node import Node, make_node, sample_study


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

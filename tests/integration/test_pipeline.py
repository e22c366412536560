"""The whole flow in one process: a study scored, reported and delivered to a real PACS (the
stages alone: test_score.py, test_report.py, test_deliver.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom

from fracture_node.db import schema as s
from tests.support.node import Node, sample_study, walk


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
                  for item in walk(sr) if getattr(item, "ValueType", "") == "IMAGE"}
    assert {ds.SOPInstanceUID for ds in study} <= referenced
    assert sum(1 for item in walk(sr) if getattr(item, "ValueType", "") == "NUM") >= 3



















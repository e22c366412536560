"""Studies: decide when a study is complete enough to report, and make its SR.

A study is reported when it is stable: no new instance for ``[study] stable_after_s`` seconds,
every association that brought its instances has ended, and every instance has a final state
(processed, not processed, failed). A late instance makes the study due again and produces a
new SR version in the same series that supersedes the previous one (new SOP Instance UID,
Predecessor Documents Sequence), never a silent merge.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from fracture_node import __version__
from fracture_node.config import Config
from fracture_node.db import schema as s
from fracture_node.db.reporting import NewReport, StudySnapshot
from fracture_node.db.store import Store, utcnow
from fracture_node.dicom.report import (
    AlgorithmInfo,
    ImageFinding,
    Unprocessed,
    build_report,
    write_report,
)
from fracture_node.errors import DatabaseError, ReportError
from fracture_node.logs import get_logger
from fracture_node.spool import Spool, safe_name

log = get_logger("studies")

RETRY_FAILED_REPORT_S = 60.0


class Reporter:
    """Makes the SR of every stable study and queues its deliveries."""

    def __init__(self, config: Config, store: Store, spool: Spool, node: str,
                 algorithm: AlgorithmInfo | None, metrics: Any | None = None,
                 on_report: Callable[[], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.node = node
        self.algorithm = algorithm
        self.metrics = metrics
        self.on_report = on_report or (lambda: None)
        self.reports_dir = config.reports_dir
        self.reports_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.device_uid = generate_uid(entropy_srcs=["fracture-node device",
                                                     config.node.ae_title])
        self._failed: dict[tuple[str, int], float] = {}

    def run_once(self) -> int:
        """Report every study that is due now; returns how many reports were made."""
        stable_before = utcnow() - dt.timedelta(seconds=self.config.study.stable_after_s)
        made = 0
        silence = self.config.node.network_timeout_s + self.config.node.dimse_timeout_s
        for study_uid in self.store.due_studies(stable_before, association_silence_s=silence):
            try:
                made += self.report_study(study_uid)
            except DatabaseError as exc:
                log.error("report_not_saved", study_instance_uid=study_uid, error=str(exc))
        return made

    def report_study(self, study_uid: str) -> int:
        snapshot = self.store.study_snapshot(study_uid)
        if snapshot is None:
            return 0
        key = (study_uid, snapshot.instances_received)
        if time.monotonic() < self._failed.get(key, 0.0):
            return 0
        started = time.perf_counter()
        try:
            sr, counts = self._build(snapshot)
        except ReportError as exc:
            self._failed[key] = time.monotonic() + RETRY_FAILED_REPORT_S
            log.error("report_failed", study_instance_uid=study_uid, error=str(exc),
                      retry_in_s=RETRY_FAILED_REPORT_S)
            return 0
        relative = f"{safe_name(study_uid)}/{sr.SOPInstanceUID}.dcm"
        path = self.reports_dir / relative
        write_report(sr, path)
        report = NewReport(
            study_instance_uid=study_uid, version=int(sr.InstanceNumber),
            sop_instance_uid=str(sr.SOPInstanceUID),
            series_instance_uid=str(sr.SeriesInstanceUID), path=relative, **counts)
        report_id = self.store.add_report(snapshot, report, self.node,
                                          [d.name for d in self.config.destinations],
                                          self.config.delivery.deadline_s)
        if report_id is None:
            path.unlink(missing_ok=True)
            log.info("report_discarded", study_instance_uid=study_uid,
                     detail="the study changed or another node reported it first")
            return 0
        if self.metrics:
            self.metrics.reports.inc()
        log.info("report_created", study_instance_uid=study_uid, report_id=report_id,
                 sop_instance_uid=report.sop_instance_uid, version=report.version,
                 images=report.instances_total, positives=report.instances_positive,
                 unprocessed=report.instances_unprocessed,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        self.on_report()
        return 1

    def _build(self, snap: StudySnapshot) -> tuple[pydicom.Dataset, dict[str, Any]]:
        sources: list[pydicom.Dataset] = []
        findings: list[ImageFinding] = []
        unprocessed: list[Unprocessed] = []
        algorithm = self.algorithm
        for inst in snap.instances:
            try:
                header = pydicom.dcmread(self.spool.path(inst.spool_path),
                                         stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                log.warning("report_source_unreadable", instance_id=inst.id,
                            sop_instance_uid=inst.sop_instance_uid, error=type(exc).__name__)
                continue
            sources.append(header)
            if inst.state == s.PROCESSED and inst.probability is not None:
                findings.append(ImageFinding(
                    sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid,
                    probability=float(inst.probability), positive=bool(inst.positive)))
                if inst.model_sha256 and (algorithm is None
                                          or algorithm.sha256 != inst.model_sha256):
                    algorithm = AlgorithmInfo(
                        name=inst.model_name or "", version=inst.model_version or "",
                        sha256=inst.model_sha256, threshold=float(inst.threshold or 0.0),
                        operating_point=inst.operating_point or "")
            else:
                unprocessed.append(Unprocessed(
                    sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid,
                    reason=inst.reason or inst.state))
        if not sources:
            raise ReportError(f"no instance of study {snap.study_instance_uid} can be read "
                              "from the spool")
        if algorithm is None:
            raise ReportError(f"study {snap.study_instance_uid} has no result and no model is "
                              "loaded on this node to name in the report")
        version = snap.reported_version + 1
        predecessor = None
        if version > 1 and snap.previous_report_path:
            try:
                predecessor = pydicom.dcmread(self.reports_dir / snap.previous_report_path,
                                              stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise ReportError(f"the previous report of study {snap.study_instance_uid} "
                                  f"cannot be read ({type(exc).__name__})") from exc
        sr = build_report(
            sources, findings, unprocessed, algorithm, version=version,
            series_instance_uid=snap.previous_series_uid or generate_uid(),
            predecessor=predecessor, device_observer_uid=self.device_uid,
            station_ae_title=self.config.node.ae_title, software_version=__version__)
        probabilities = [f.probability for f in findings]
        counts = {
            "instances_total": len(findings) + len(unprocessed),
            "instances_positive": sum(f.positive for f in findings),
            "instances_unprocessed": len(unprocessed),
            "max_probability": max(probabilities) if probabilities else None,
            "model_sha256": algorithm.sha256 if findings else None,
        }
        return sr, counts

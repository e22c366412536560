"""Studies: decide when a study is complete enough to report, and make its SR.

A study is reported when it is stable: no new instance for ``[study] stable_after_s`` seconds,
every association that brought its instances has ended, and every instance has a final state
(processed, not processed, failed). A late instance makes the study due again and produces a
new SR version in the same series that supersedes the previous one (new SOP Instance UID,
Predecessor Documents Sequence), never a silent merge.

Saliency: the regions stored with each result (``results.saliency``) go into the SR as TID 1410
groups (for positive images only, unless ``[saliency] positive_only = false``). For destinations
with ``overlays``, each image with regions in the SR also gets a Secondary Capture (the heat map
burned into the radiograph, re-read from the spool) and/or a GSPS (the regions outlined on the
radiograph), in the same study, queued with the SR for those destinations only. An overlay that
cannot be made is logged and left out; it never holds back the SR. An overlay's SOP Instance UID
is derived from what it shows, so a new report version lists the same objects rather than adding new
ones beside the old; a destination that stored one already is not sent it again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from fracture_node import __version__
from fracture_node.config import Config
from fracture_node.db import schema as s
from fracture_node.db.reporting import NewObject, NewReport, StudyInstance, StudySnapshot
from fracture_node.db.store import Store, utcnow
from fracture_node.dicom.overlay import (
    build_presentation_state,
    build_secondary_capture,
    overlay_instance_uid,
    overlay_series_uid,
)
from fracture_node.dicom.pixels import read_pixels
from fracture_node.dicom.report import (
    SALIENCY_METHODS,
    AlgorithmInfo,
    ImageFinding,
    Unprocessed,
    build_report,
    write_report,
)
from fracture_node.errors import DatabaseError, ReportError, describe
from fracture_node.logs import get_logger
from fracture_node.saliency import Region, SaliencyRecord
from fracture_node.spool import Spool, safe_name

log = get_logger("studies")

@dataclass(frozen=True)
class _Shown:
    """An image whose regions are in the SR: what its overlays are drawn from."""

    instance: StudyInstance
    header: pydicom.Dataset
    number: int
    """Its number in the SR ("Fracture, image <n>"), the overlays' Instance Number."""
    record: SaliencyRecord
    regions: tuple[Region, ...]
    probability: float


@dataclass
class _Gathered:
    """What a study's SR is made of."""

    sources: list[pydicom.Dataset] = field(default_factory=list)
    findings: list[ImageFinding] = field(default_factory=list)
    unprocessed: list[Unprocessed] = field(default_factory=list)
    shown: list[_Shown] = field(default_factory=list)
    algorithm: AlgorithmInfo | None = None
    """The model that scored the study (set by ``_gather``, which refuses a study without)."""


class Reporter:
    """Makes the SR of every stable study and queues its deliveries."""

    def __init__(self, config: Config, store: Store, spool: Spool, node: str,
                 algorithm: AlgorithmInfo | None, metrics: Any | None = None,
                 on_report: Callable[[], None] | None = None,
                 on_quiet_at: Callable[[dt.datetime], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.node = node
        self.algorithm = algorithm
        self.metrics = metrics
        self.on_report = on_report or (lambda: None)
        self.on_quiet_at = on_quiet_at or (lambda when: None)
        self.reports_dir = config.reports_dir
        self.reports_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.device_uid = generate_uid(entropy_srcs=["fracture-node device",
                                                     config.node.ae_title])
        self.overlays = {d.name: d.overlay_kinds for d in config.destinations}
        self.overlay_kinds = frozenset().union(*self.overlays.values())

    def run_once(self) -> int:
        """Report every study that is due now; returns how many reports were made.

        Then ``on_quiet_at`` is told when the next study not yet quiet becomes so (its last
        arrival + ``[study] stable_after_s``), so that the next pass can run at that moment
        rather than at the next interval; the interval stays the fallback.
        """
        stable_after = dt.timedelta(seconds=self.config.study.stable_after_s)
        stable_before = utcnow() - stable_after
        made = 0
        silence = self.config.node.network_timeout_s + self.config.node.dimse_timeout_s
        for study_uid in self.store.due_studies(stable_before, association_silence_s=silence):
            try:
                made += self.report_study(study_uid)
            except DatabaseError as exc:
                log.error("report_not_saved", study_instance_uid=study_uid, error=str(exc))
        quiet_from = self.store.next_stability_time(stable_before)
        if quiet_from is not None:
            self.on_quiet_at(quiet_from + stable_after)
        return made

    def report_study(self, study_uid: str) -> int:
        """Report one study; any failure but the database's is recorded against the study
        (scrubbed reason, back-off, parked after ``[study] report_max_attempts``)."""
        snapshot = self.store.study_snapshot(study_uid)
        if snapshot is None:
            return 0
        if self._nothing_assessed(snapshot):
            return 0
        try:
            return self._report(snapshot)
        except DatabaseError:
            raise
        except Exception as exc:  # one study must never stop the others, nor be retried blind
            self._failed(study_uid, exc)
            return 0

    def _failed(self, study_uid: str, exc: BaseException) -> None:
        error = describe(exc)
        study = self.config.study
        outcome = self.store.record_report_failure(
            study_uid, error, max_attempts=study.report_max_attempts,
            first_retry_s=study.report_first_retry_s, max_retry_s=study.report_max_retry_s)
        if self.metrics:
            self.metrics.report_failures.inc()
        if outcome.parked:
            log.error("report_parked", study_instance_uid=study_uid, error=error,
                      attempts=outcome.attempts,
                      detail="no more attempts: fix the cause, then fracture-node reprocess")
        else:
            log.error("report_failed", study_instance_uid=study_uid, error=error,
                      attempts=outcome.attempts, retry_in_s=outcome.retry_in_s)

    def _report(self, snapshot: StudySnapshot) -> int:
        study_uid = snapshot.study_instance_uid
        started = time.perf_counter()
        sr, counts, shown = self._build(snapshot)
        relative = f"{safe_name(study_uid)}/{sr.SOPInstanceUID}.dcm"
        path = self.reports_dir / relative
        write_report(sr, path)
        objects = self._overlays(study_uid, str(sr.SOPInstanceUID), shown)
        report = NewReport(
            study_instance_uid=study_uid, version=int(sr.InstanceNumber),
            sop_instance_uid=str(sr.SOPInstanceUID),
            series_instance_uid=str(sr.SeriesInstanceUID), path=relative, **counts)
        report_id = self.store.add_report(snapshot, report, self.node,
                                          [d.name for d in self.config.destinations],
                                          self.config.delivery.deadline_s,
                                          objects=objects, overlays=self.overlays)
        if report_id is None:
            self._discard_files(path, str(sr.SOPInstanceUID), objects)
            log.info("report_discarded", study_instance_uid=study_uid,
                     detail="the study changed or another node reported it first")
            return 0
        if self.metrics:
            self.metrics.reports.inc()
        log.info("report_created", study_instance_uid=study_uid, report_id=report_id,
                 sop_instance_uid=report.sop_instance_uid, version=report.version,
                 images=report.instances_total, positives=report.instances_positive,
                 unprocessed=report.instances_unprocessed,
                 images_with_regions=len(shown),
                 overlays=len(objects), ms=round((time.perf_counter() - started) * 1000, 1))
        self.on_report()
        return 1

    def _nothing_assessed(self, snap: StudySnapshot) -> bool:
        """A first report of a study in which no image was scored is not made (``[scope]
        report_when_nothing_assessed``): the study is closed, the reasons stay in SQL."""
        if (self.config.scope.report_when_nothing_assessed or snap.reported_version
                or any(i.state == s.PROCESSED for i in snap.instances)):
            return False
        reasons = sorted({i.reason or i.state for i in snap.instances})
        if self.store.close_without_report(snap):
            log.info("study_not_reported", study_instance_uid=snap.study_instance_uid,
                     images=len(snap.instances), reasons=",".join(reasons),
                     detail="no image of the study was assessed; no SR is sent")
        return True

    def _discard_files(self, sr_path: Path, sr_uid: str, objects: list[NewObject]) -> None:
        """Remove the files of a report no row refers to: the SR, its overlays and their
        ``<sr_uid>.overlays`` folder (named after this SR alone, so no other report's files are
        in it; the study folder is left, other versions and reporters write there)."""
        sr_path.unlink(missing_ok=True)
        for obj in objects:
            (self.reports_dir / obj.path).unlink(missing_ok=True)
        try:
            (sr_path.parent / f"{safe_name(sr_uid)}.overlays").rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:  # not empty (a file we did not write) or not ours to remove
            log.warning("overlay_folder_not_removed", sop_instance_uid=sr_uid,
                        error=os.strerror(exc.errno) if exc.errno else type(exc).__name__)

    def _regions(self, inst: StudyInstance) -> tuple[SaliencyRecord | None,
                                                     tuple[Region, ...]]:
        """The stored saliency of a processed image and the regions the SR shows for it."""
        if inst.saliency is None:
            return None, ()
        try:
            record = SaliencyRecord.from_json(inst.saliency)
        except ValueError as exc:
            log.warning("saliency_unreadable", instance_id=inst.id,
                        sop_instance_uid=inst.sop_instance_uid, error=str(exc))
            return None, ()
        if record.method not in SALIENCY_METHODS:
            log.warning("saliency_unreadable", instance_id=inst.id,
                        sop_instance_uid=inst.sop_instance_uid,
                        error=f"method {record.method!r} has no SR code")
            return None, ()
        if self.config.saliency.positive_only and not inst.positive:
            return record, ()
        return record, record.regions

    def _build(self, snap: StudySnapshot
               ) -> tuple[pydicom.Dataset, dict[str, Any], list[_Shown]]:
        """The study's SR, the counts its reports row keeps, and the images with overlays."""
        got = self._gather(snap)
        algorithm = got.algorithm
        assert algorithm is not None  # _gather raised otherwise
        version = snap.reported_version + 1
        sr = build_report(
            got.sources, got.findings, got.unprocessed, algorithm, version=version,
            series_instance_uid=snap.previous_series_uid or generate_uid(),
            predecessor=self._predecessor(snap, version), device_observer_uid=self.device_uid,
            station_ae_title=self.config.node.ae_title, software_version=__version__,
            regions_of_negatives=not self.config.saliency.positive_only)
        probabilities = [f.probability for f in got.findings]
        counts = {
            "instances_total": len(got.findings) + len(got.unprocessed),
            "instances_positive": sum(f.positive for f in got.findings),
            "instances_unprocessed": len(got.unprocessed),
            "max_probability": max(probabilities) if probabilities else None,
            "model_sha256": algorithm.sha256 if got.findings else None,
        }
        return sr, counts, got.shown

    def _gather(self, snap: StudySnapshot) -> _Gathered:
        """Each instance's header from the spool, as a finding (scored) or an unprocessed
        image (with its reason); the algorithm is the one that scored them."""
        got = _Gathered()
        algorithm = self.algorithm
        for inst in snap.instances:
            try:
                header = pydicom.dcmread(self.spool.path(inst.spool_path),
                                         stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                log.warning("report_source_unreadable", instance_id=inst.id,
                            sop_instance_uid=inst.sop_instance_uid, error=type(exc).__name__)
                continue
            got.sources.append(header)
            if inst.state == s.PROCESSED and inst.probability is not None:
                record, regions = self._regions(inst)
                got.findings.append(ImageFinding(
                    sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid,
                    probability=float(inst.probability), positive=bool(inst.positive),
                    regions=regions, saliency_method=record.method if record else "hirescam"))
                if record is not None and regions:
                    got.shown.append(_Shown(inst, header, len(got.findings), record, regions,
                                            float(inst.probability)))
                if inst.model_sha256 and (algorithm is None
                                          or algorithm.sha256 != inst.model_sha256):
                    algorithm = AlgorithmInfo(
                        name=inst.model_name or "", version=inst.model_version or "",
                        sha256=inst.model_sha256, threshold=float(inst.threshold or 0.0),
                        operating_point=inst.operating_point or "")
            else:
                got.unprocessed.append(Unprocessed(
                    sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid,
                    reason=inst.reason or inst.state))
        if not got.sources:
            raise ReportError(f"no instance of study {snap.study_instance_uid} can be read "
                              "from the spool")
        if algorithm is None:
            raise ReportError(f"study {snap.study_instance_uid} has no result and no model is "
                              "loaded on this node to name in the report")
        got.algorithm = algorithm
        return got

    def _predecessor(self, snap: StudySnapshot, version: int) -> pydicom.Dataset | None:
        """The previous SR of the study, which a new version references."""
        if version == 1 or not snap.previous_report_path:
            return None
        try:
            return pydicom.dcmread(self.reports_dir / snap.previous_report_path,
                                   stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ReportError(f"the previous report of study {snap.study_instance_uid} "
                              f"cannot be read ({type(exc).__name__})") from exc

    # Overlays -------------------------------------------------------------------------------
    def _overlays(self, study_uid: str, sr_uid: str, shown: list[_Shown]) -> list[NewObject]:
        """Write the overlays some destination wants for the images with regions; never raises
        for one overlay (it is logged and left out)."""
        if not self.overlay_kinds or not shown:
            return []
        folder = f"{safe_name(study_uid)}/{safe_name(sr_uid)}.overlays"
        made: list[NewObject] = []
        for item in shown:
            for kind in ("sc", "gsps"):
                if kind not in self.overlay_kinds:
                    continue
                try:
                    obj = self._overlay(kind, study_uid, folder, item)
                except Exception as exc:  # an overlay must never hold back the SR
                    log.warning("overlay_failed", kind=kind, study_instance_uid=study_uid,
                                source_sop_instance_uid=item.instance.sop_instance_uid,
                                error=type(exc).__name__,
                                detail="the SR and the other overlays are sent without it")
                    continue
                made.append(obj)
        return made

    def _overlay(self, kind: str, study_uid: str, folder: str, item: _Shown) -> NewObject:
        inst = item.instance
        key = hashlib.sha256("\n".join([
            inst.spool_path, inst.model_sha256 or "", f"{item.probability:.6f}",
            inst.saliency or "", repr(item.regions)]).encode()).hexdigest()
        uid = overlay_instance_uid(kind, inst.sop_instance_uid, key)
        series = overlay_series_uid(study_uid, kind)
        common: dict[str, Any] = {
            "probability": item.probability, "series_instance_uid": series,
            "instance_number": item.number, "model_name": inst.model_name or "",
            "software_version": __version__, "sop_instance_uid": uid}
        if kind == "sc":
            try:
                full = pydicom.dcmread(self.spool.path(inst.spool_path))
            except FileNotFoundError as exc:
                raise ReportError(f"the spool file of image {inst.sop_instance_uid} is gone "
                                  "(retention)") from exc
            image = read_pixels(full)
            heat = item.record.source_map()
            if heat.shape != image.shape:
                raise ReportError(f"the stored heat map of image {inst.sop_instance_uid} is "
                                  f"{heat.shape}, the image {image.shape}")
            ds = build_secondary_capture(item.header, image, heat, item.regions, **common)
        else:
            ds = build_presentation_state(item.header, item.regions, **common)
        relative = f"{folder}/{kind}-{safe_name(uid)}.dcm"
        write_report(ds, Path(self.reports_dir) / relative)
        return NewObject(kind=kind, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=uid,
                         series_instance_uid=series,
                         source_sop_instance_uid=inst.sop_instance_uid, path=relative)

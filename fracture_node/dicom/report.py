"""Report: the fracture result of one study as a DICOM Comprehensive 3D SR (TID 1500).

The document is built with highdicom, layer by layer as the standard names them: value types
(NUM, CODE, TEXT, IMAGE) inside TID 1501 measurement groups inside a TID 1500 Measurement
Report inside a Comprehensive 3D SR instance. ``docs/conformance.md`` (section 6) shows the tree and
lists every code; keep the two in step.

The SR belongs to the study it reports on (same Study Instance UID, patient and study
attributes copied from the received headers by highdicom) and lives in its own series, marked
as an unverified AI result: Preliminary Flag PRELIMINARY, Verification Flag UNVERIFIED.
A corrected report is a new instance in the same series with a higher Instance Number and a
Predecessor Documents Sequence (PS3.3 C.17.2) naming the report it replaces.

Where the model looked (optional): each :class:`SaliencyRegion` of a finding becomes a TID 1410
Planar ROI Measurements group right after the image's TID 1501 group: an IMAGE REGION SCOORD
POLYLINE (closed, in pixel coordinates of the source image, PS3.3 C.18.6.1.1) on that image,
finding type Fracture, the saliency method as Measurement Method (TID 1419) and the region's
peak saliency (relative to the image's maximum) as a NUM with derivation Maximum. By default
only images scored positive carry regions (``regions_of_negatives``).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from fracture_node.errors import ReportError
from fracture_node.logs import get_logger

log = get_logger("report")

SERIES_NUMBER = 9901
"""Series Number of the SR series; high so that viewers list it after the images."""

SERIES_DESCRIPTION = "AI fracture detection - UNVERIFIED - not for diagnosis"

# Codes -------------------------------------------------------------------------------------
# Standard codes come from pydicom's dictionary (generated from PS3.16) where it has them.

FRACTURE = hd.sr.CodedConcept("72704001", "SCT", "Fracture")
"""SNOMED CT 72704001 |Fracture (morphologic abnormality)|."""
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # 49755003, CID 7150
PRESENT = codes.SCT.Present  # 52101004, CID 240/241
ABSENT = codes.SCT.Absent  # 272519000, CID 240/241
PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
MAXIMUM = codes.SCT.Maximum  # 56851009, CID 3488 "Min/Max/Mean"
PROCEDURE = codes.SCT.PlainRadiography  # 168537006, CID 10005
UNIT_PROBABILITY = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
UNIT_IMAGES = hd.sr.CodedConcept("{images}", "UCUM", "images")
SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")

LOCAL_SCHEME = "99FRNODE"
"""Private coding scheme (PS3.3 8.2: designators starting with "99" are private)."""
IMAGES_PROCESSED = hd.sr.CodedConcept("IMGPROC", LOCAL_SCHEME, "Number of images processed")
IMAGES_NOT_PROCESSED = hd.sr.CodedConcept(
    "IMGNOTPROC", LOCAL_SCHEME, "Number of images not processed"
)
IMAGE_NOT_PROCESSED = hd.sr.CodedConcept("NOTPROC", LOCAL_SCHEME, "Image not processed")
SALIENCY_PEAK = hd.sr.CodedConcept("SALPEAK", LOCAL_SCHEME, "Peak saliency")
"""Maximum of the saliency map in the region, relative to the map's maximum over the image."""
UNIT_NONE = hd.sr.CodedConcept("1", "UCUM", "no units")
SALIENCY_METHODS = {
    "gradcam": hd.sr.CodedConcept("GRADCAM", LOCAL_SCHEME, "Grad-CAM saliency"),
    "gradcampp": hd.sr.CodedConcept("GRADCAMPP", LOCAL_SCHEME, "Grad-CAM++ saliency"),
    "hirescam": hd.sr.CodedConcept("HIRESCAM", LOCAL_SCHEME, "HiResCAM saliency"),
    "layercam": hd.sr.CodedConcept("LAYERCAM", LOCAL_SCHEME, "LayerCAM saliency"),
}
"""TID 1419 Measurement Method of a region, by :data:`fracture_node.ml.explain.METHODS` name."""
LOCAL_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME,
    name="fracture-node local codes",
    responsible_organization="fracture-node",
)

_TYPE2_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)
"""Type 2 Patient/General Study attributes that highdicom reads from the first source."""


@dataclass(frozen=True)
class SaliencyRegion:
    """Where the model looked on one image: a closed polygon in the source image's pixels.

    ``polygon`` holds ``(column, row)`` points in continuous pixel coordinates (the top-left
    corner of the first pixel is ``(0, 0)``), first point repeated last;
    ``fracture_node.ml.explain.Region.polygon()`` gives one. ``peak`` is the region's maximum
    saliency relative to the image's maximum, in [0, 1].
    """

    polygon: tuple[tuple[float, float], ...]
    peak: float
    method: str = "hirescam"
    """The saliency method (a key of :data:`SALIENCY_METHODS`); pass the Explainer's."""

    @classmethod
    def of(cls, region: Any, method: str = "hirescam") -> SaliencyRegion:
        """From anything with ``polygon()`` and ``peak`` (an ``explain.Region``)."""
        points = tuple((float(x), float(y)) for x, y in np.asarray(region.polygon()))
        return cls(polygon=points, peak=float(region.peak), method=method)

    @classmethod
    def from_box(cls, x0: float, y0: float, x1: float, y1: float, peak: float,
                 method: str = "hirescam") -> SaliencyRegion:
        """A rectangle ``[x0, x1] x [y0, y1]`` (source pixels) as a closed polygon."""
        x0, y0, x1, y1 = float(x0), float(y0), float(x1), float(y1)
        return cls(polygon=((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)),
                   peak=float(peak), method=method)


@dataclass(frozen=True)
class ImageFinding:
    """The model's result for one processed image."""

    sop_instance_uid: str
    sop_class_uid: str
    probability: float
    positive: bool
    """``probability`` reached the operating threshold."""
    regions: tuple[SaliencyRegion, ...] = ()
    """Where the model looked (hottest first); none by default."""


@dataclass(frozen=True)
class Unprocessed:
    """An image of the study that the model could not read."""

    sop_instance_uid: str
    sop_class_uid: str
    reason: str
    """Short machine-readable code, e.g. ``undecodable`` (see ``NotProcessable``)."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced the result (TID 4019 Algorithm Identification)."""

    name: str
    version: str
    sha256: str
    threshold: float
    operating_point: str


def build_report(
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[ImageFinding],
    unprocessed: Sequence[Unprocessed],
    algorithm: AlgorithmInfo,
    *,
    version: int,
    series_instance_uid: str,
    predecessor: pydicom.Dataset | None = None,
    device_observer_uid: str,
    station_ae_title: str,
    manufacturer: str = "fracture-node",
    software_version: str,
    regions_of_negatives: bool = False,
) -> pydicom.Dataset:
    """Build the Comprehensive 3D SR that reports the fracture result of one study.

    Parameters
    ----------
    sources:
        Headers of the study's received instances (``stop_before_pixels=True`` is enough). All
        must share one Study Instance UID; they may come from several series. Every image named
        in ``findings`` and ``unprocessed`` must be among them.
    findings:
        One item per processed image.
    unprocessed:
        Images of the study that could not be read, with the reason.
    algorithm:
        Model name, version, file SHA-256, threshold and operating point.
    version:
        1 for the first report of the study; a correction has the next number and ``predecessor``.
    series_instance_uid:
        The SR series of this study (the same for every version).
    predecessor:
        Header of the report this one replaces (required when ``version > 1``).
    device_observer_uid, station_ae_title, manufacturer, software_version:
        Identify this node as the device observer (TID 1004) and in the equipment module.
    regions_of_negatives:
        Also write the saliency regions of images scored negative (default: positive only).

    Returns
    -------
    pydicom.Dataset
        The SR (a ``highdicom.sr.Comprehensive3DSR``), ready for :func:`write_report`.

    Raises
    ------
    ReportError
        The input is inconsistent or highdicom refused it; the message names the study UID.
    """
    study_uid = _study_uid(sources)
    _check_inputs(study_uid, findings, unprocessed, version, series_instance_uid, predecessor)
    try:
        evidence = _evidence(sources)
        algorithm_id = hd.sr.AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[
                f"model_sha256={algorithm.sha256}",
                f"threshold={algorithm.threshold:.6g}",
                f"operating_point={algorithm.operating_point}",
            ],
        )
        groups: list[Any] = []
        for i, f in enumerate(findings, start=1):
            groups.append(_image_group(f, i, algorithm_id))
            if f.positive or regions_of_negatives:
                groups.extend(_region_group(f, i, k, r, algorithm_id)
                              for k, r in enumerate(f.regions, start=1))
        groups.append(_summary_group(study_uid, findings, unprocessed, algorithm_id))
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_observer_uid,
                name=station_ae_title,
                manufacturer_name=manufacturer,
                model_name=algorithm.name,
            ),
        )
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURE,
            imaging_measurements=groups,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content[0],
            series_instance_uid=series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=version,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[predecessor] if predecessor is not None else None,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=algorithm.name,
            software_versions=software_version,
            coding_schemes=[LOCAL_SCHEME_ITEM],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(
            f"the SR for study {study_uid} could not be built: {exc}; "
            "fix: check that every image in the findings was received for this study"
        ) from exc
    if predecessor is not None:
        _check_predecessor_reference(sr, predecessor, study_uid)
    log.info(
        "report_built", study_instance_uid=study_uid, sop_instance_uid=str(sr.SOPInstanceUID),
        version=version, images=len(findings), unprocessed=len(unprocessed),
    )
    return sr


def write_report(ds: pydicom.Dataset, path: str | os.PathLike[str]) -> None:
    """Write ``ds`` as a DICOM file atomically: temporary file, fsync, rename, fsync folder.

    A reader sees either no file or the whole file, also after a crash.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Building blocks ---------------------------------------------------------------------------


def _study_uid(sources: Sequence[pydicom.Dataset]) -> str:
    if not sources:
        raise ReportError("the SR cannot be built without the headers of the study's instances")
    uids = {str(s.get("StudyInstanceUID", "")) for s in sources}
    if len(uids) != 1 or "" in uids:
        raise ReportError(
            f"the SR sources belong to {len(uids)} studies ({', '.join(sorted(uids))}); "
            "fix: pass the headers of one study only"
        )
    return uids.pop()


def _check_inputs(
    study_uid: str,
    findings: Sequence[ImageFinding],
    unprocessed: Sequence[Unprocessed],
    version: int,
    series_instance_uid: str,
    predecessor: pydicom.Dataset | None,
) -> None:
    if not findings and not unprocessed:
        raise ReportError(f"the SR for study {study_uid} has no image to report on")
    for f in findings:
        if not 0.0 <= f.probability <= 1.0:
            raise ReportError(
                f"the SR for study {study_uid}: probability {f.probability} of image "
                f"{f.sop_instance_uid} is outside 0..1"
            )
        for r in f.regions:
            _check_region(study_uid, f.sop_instance_uid, r)
    named = [f.sop_instance_uid for f in findings] + [u.sop_instance_uid for u in unprocessed]
    if len(set(named)) != len(named):
        raise ReportError(
            f"the SR for study {study_uid} names an image twice in findings/unprocessed"
        )
    if version < 1:
        raise ReportError(f"the SR for study {study_uid}: version {version} must be 1 or more")
    if version > 1 and predecessor is None:
        raise ReportError(
            f"the SR for study {study_uid}: version {version} needs the predecessor report"
        )
    if predecessor is not None:
        if version == 1:
            raise ReportError(f"the SR for study {study_uid}: version 1 cannot have a predecessor")
        if str(predecessor.get("StudyInstanceUID", "")) != study_uid:
            raise ReportError(
                f"the predecessor {predecessor.get('SOPInstanceUID')} belongs to another study "
                f"than {study_uid}"
            )
        if str(predecessor.get("SeriesInstanceUID", "")) != series_instance_uid:
            raise ReportError(
                f"the SR for study {study_uid}: a new version must stay in the series of its "
                f"predecessor ({predecessor.get('SeriesInstanceUID')})"
            )


def _evidence(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The sources, with absent Type 2 patient/study attributes of the first one added empty.

    highdicom copies these from the first source; real headers sometimes leave them out
    although PS3.3 makes them Type 2 (present, possibly empty).
    """
    first = sources[0]
    missing = [k for k in _TYPE2_FROM_SOURCE if k not in first]
    if missing:
        first = copy.deepcopy(first)
        for keyword in missing:
            setattr(first, keyword, None)
    return [first, *sources[1:]]


def _tracking(key: str, label: str) -> hd.sr.TrackingIdentifier:
    """A tracking identifier whose UID is stable across versions of the report."""
    uid = generate_uid(entropy_srcs=["fracture-node tracking", key])
    return hd.sr.TrackingIdentifier(uid=uid, identifier=label)


def _image_group(
    finding: ImageFinding, index: int, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: finding, probability, present/absent, source image."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.sop_instance_uid, f"Fracture, image {index}"),
        finding_category=FINDING_CATEGORY,
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=float(finding.probability), unit=UNIT_PROBABILITY
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=FRACTURE, value=PRESENT if finding.positive else ABSENT
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            )
        ],
    )


def _check_region(study_uid: str, sop_instance_uid: str, region: SaliencyRegion) -> None:
    points = np.asarray(region.polygon, dtype=np.float64)
    problem = None
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 4:
        problem = "needs at least 3 distinct (column, row) points and the first repeated last"
    elif not np.array_equal(points[0], points[-1]):
        problem = "is not closed (the last point must equal the first)"
    elif not np.isfinite(points).all() or (points < 0).any():
        problem = "has a negative or non-finite coordinate"
    elif not 0.0 <= region.peak <= 1.0:
        problem = f"has peak {region.peak} outside 0..1"
    elif region.method not in SALIENCY_METHODS:
        problem = f"names unknown method {region.method!r}"
    if problem:
        raise ReportError(
            f"the SR for study {study_uid}: a saliency region of image {sop_instance_uid} "
            f"{problem}"
        )


def _region_group(
    finding: ImageFinding, index: int, number: int, region: SaliencyRegion,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one saliency region: the polygon on the image and its peak saliency."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"{finding.sop_instance_uid}/region/{number}",
                                      f"Fracture saliency region {number}, image {index}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(region.polygon, dtype=np.float32),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            ),
        ),
        finding_category=FINDING_CATEGORY,
        finding_type=FRACTURE,
        method=SALIENCY_METHODS[region.method],
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=SALIENCY_PEAK, value=float(region.peak), unit=UNIT_NONE,
                              derivation=MAXIMUM)
        ],
    )


def _summary_group(
    study_uid: str,
    findings: Sequence[ImageFinding],
    unprocessed: Sequence[Unprocessed],
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study: any fracture, maximum probability, counts, unread images.

    It names no source image: it is about every image of the document (highdicom's reading).
    """
    measurements = [
        hd.sr.Measurement(name=IMAGES_PROCESSED, value=len(findings), unit=UNIT_IMAGES),
        hd.sr.Measurement(name=IMAGES_NOT_PROCESSED, value=len(unprocessed), unit=UNIT_IMAGES),
    ]
    evaluations = []
    if findings:
        measurements.insert(0, hd.sr.Measurement(
            name=PROBABILITY,
            value=float(max(f.probability for f in findings)),
            unit=UNIT_PROBABILITY,
            derivation=MAXIMUM,
        ))
        any_positive = any(f.positive for f in findings)
        evaluations.append(
            hd.sr.QualitativeEvaluation(name=FRACTURE, value=PRESENT if any_positive else ABSENT)
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(study_uid, "Fracture, study summary"),
        finding_category=FINDING_CATEGORY,
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    container = group[0]
    for item in unprocessed:
        text = hd.sr.TextContentItem(
            name=IMAGE_NOT_PROCESSED,
            value=item.reason,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        text.ContentSequence = hd.sr.ContentSequence([
            hd.sr.ImageContentItem(
                name=SOURCE,
                referenced_sop_class_uid=item.sop_class_uid,
                referenced_sop_instance_uid=item.sop_instance_uid,
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        ])
        container.ContentSequence.append(text)
    return group


def _check_predecessor_reference(
    sr: pydicom.Dataset, predecessor: pydicom.Dataset, study_uid: str
) -> None:
    """PS3.3 C.17.2: the Predecessor Documents Sequence names the replaced report.

    highdicom 0.28 fills it from ``previous_versions``; this keeps us honest if that changes.
    """
    wanted = (str(predecessor.SeriesInstanceUID), str(predecessor.SOPInstanceUID),
              str(predecessor.SOPClassUID))
    found = {
        (str(series.SeriesInstanceUID), str(ref.ReferencedSOPInstanceUID),
         str(ref.ReferencedSOPClassUID))
        for study in sr.get("PredecessorDocumentsSequence", [])
        if str(study.StudyInstanceUID) == study_uid
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    if wanted not in found:
        raise ReportError(
            f"the SR for study {study_uid} lacks its Predecessor Documents Sequence entry"
        )

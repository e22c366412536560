"""Report: the fracture result of one study as a DICOM Comprehensive 3D SR (TID 1500).

The document is built with highdicom, layer by layer as the standard names them: value types
(NUM, CODE, TEXT, IMAGE) inside TID 1501 measurement groups inside a TID 1500 Measurement
Report inside a Comprehensive 3D SR instance. ``docs/conformance.md`` (section 6) shows the tree and
lists every code; keep the two in step. The tree passes PixelMed's ``DicomSRValidator`` (the
template checker IHE Connectathons use for AI Results) with no error and no warning, and
dciodvfy with no error: the per-image and study decisions (Fracture present/absent) and the
sentences a radiologist reads live in the TID 1500 "Qualitative Evaluations" container (rows
12-14), the per-image probability in the image's TID 1501 group.

The SR belongs to the study it reports on (same Study Instance UID, patient and study
attributes copied from the received headers by highdicom, checked and cleaned first by
:mod:`fracture_node.dicom.header`) and lives in its own series, marked as an unverified AI
result: Preliminary Flag PRELIMINARY, Verification Flag UNVERIFIED, and the sentence
:data:`NOT_FOR_DIAGNOSIS` as the first item a viewer renders. A corrected report is a new
instance in the same series with a higher Instance Number and a Predecessor Documents Sequence
(PS3.3 C.17.2) naming the report it replaces.

IHE AI Results (AIR): the algorithm is a Contributing Equipment Sequence item with Purpose of
Reference (Newcode1, 99IHE, "Processing Algorithm"), its name as Manufacturer's Model Name, its
version and ours as Software Versions, and a Device UID derived from the model file's SHA-256
(:func:`algorithm_device_uid`; the Device Observer UID of the observation context is the same).

Where the model looked (optional): each :class:`fracture_node.saliency.Region` of a finding
becomes a TID 1410 Planar ROI Measurements group right after the image's TID 1501 group: an
IMAGE REGION SCOORD POLYLINE (its box, closed, in pixel coordinates of the source image, PS3.3
C.18.6.1.1) on that image, finding Fracture, the finding's saliency method as Measurement Method
(TID 1419) and the region's
relative saliency (its peak over the image's maximum; not a probability) as a NUM with
derivation Maximum. By default only images scored positive carry regions
(``regions_of_negatives``).
"""

from __future__ import annotations

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

from fracture_node.dicom.header import clean_sources
from fracture_node.dicom.wording import (
    NOT_FOR_DIAGNOSIS,
    decision_text,
    describe_image,
    percent,
    reason_text,
)
from fracture_node.errors import ReportError
from fracture_node.logs import get_logger
from fracture_node.saliency.geometry import Region

log = get_logger("report")

SERIES_NUMBER = 9901
"""Series Number of the SR series; high so that viewers list it after the images."""

SERIES_DESCRIPTION = "AI fracture detection - UNVERIFIED - not for diagnosis"

# Codes -------------------------------------------------------------------------------------
# Standard codes come from pydicom's dictionary (generated from PS3.16) where it has them.

FRACTURE = hd.sr.CodedConcept("72704001", "SCT", "Fracture")
"""SNOMED CT 72704001 |Fracture (morphologic abnormality)|."""
PRESENT = codes.SCT.Present  # 52101004, CID 240/241
ABSENT = codes.SCT.Absent  # 272519000, CID 240/241
PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
MAXIMUM = codes.SCT.Maximum  # 56851009, CID 3488 "Min/Max/Mean"
PROCEDURE = codes.SCT.ImagingProcedure  # 363679005, CID 100
"""CID 100 (the context group of TID 1500 "Procedure reported") has no plain-radiography code;
"Imaging procedure" is its generic member."""
FINDING = codes.DCM.Finding  # (121071, DCM, "Finding")
COMMENT = codes.DCM.Comment  # (121106, DCM, "Comment")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12."""
UNIT_PERCENT = hd.sr.CodedConcept("%", "UCUM", "%")
UNIT_IMAGES = hd.sr.CodedConcept("{images}", "UCUM", "images")

LOCAL_SCHEME = "99FRNODE"
"""Private coding scheme (PS3.3 8.2: designators starting with "99" are private)."""
IMAGES_PROCESSED = hd.sr.CodedConcept("IMGPROC", LOCAL_SCHEME, "Number of images processed")
IMAGES_NOT_PROCESSED = hd.sr.CodedConcept(
    "IMGNOTPROC", LOCAL_SCHEME, "Number of images not processed"
)
IMAGE_NOT_PROCESSED = hd.sr.CodedConcept("NOTPROC", LOCAL_SCHEME, "Image not assessed")
SALIENCY_PEAK = hd.sr.CodedConcept("SALPEAK", LOCAL_SCHEME, "Relative saliency")
"""Maximum of the saliency map in the region over the map's maximum on the image (not a
probability: the hottest region of every image has 1)."""
UNIT_NONE = hd.sr.CodedConcept("1", "UCUM", "no units")
SALIENCY_METHODS = {
    "gradcam": hd.sr.CodedConcept("GRADCAM", LOCAL_SCHEME, "Grad-CAM saliency"),
    "gradcampp": hd.sr.CodedConcept("GRADCAMPP", LOCAL_SCHEME, "Grad-CAM++ saliency"),
    "hirescam": hd.sr.CodedConcept("HIRESCAM", LOCAL_SCHEME, "HiResCAM saliency"),
    "layercam": hd.sr.CodedConcept("LAYERCAM", LOCAL_SCHEME, "LayerCAM saliency"),
}
"""TID 1419 Measurement Method of a region, by :data:`fracture_node.saliency.defaults.METHODS`
name."""
LOCAL_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME,
    name="fracture-node local codes",
    responsible_organization="fracture-node",
)
IHE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator="99IHE",
    name="IHE temporary codes",
    responsible_organization="IHE",
)
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
"""IHE AIR: Purpose of Reference of the algorithm's Contributing Equipment item."""


@dataclass(frozen=True)
class ImageFinding:
    """The model's result for one processed image."""

    sop_instance_uid: str
    sop_class_uid: str
    probability: float
    positive: bool
    """``probability`` reached the operating threshold."""
    regions: tuple[Region, ...] = ()
    """Where the model looked (hottest first, source pixels; each written as the closed
    polygon of its box); none by default."""
    saliency_method: str = "hirescam"
    """The method that made ``regions`` (a key of :data:`SALIENCY_METHODS`)."""


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
    device_observer_uid: str | None = None,
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
        in ``findings`` and ``unprocessed`` must be among them. They are not changed: the values
        copied into the SR are checked and cleaned on copies (:mod:`fracture_node.dicom.header`).
    findings:
        One item per processed image.
    unprocessed:
        Images of the study that were not assessed, with the reason.
    algorithm:
        Model name, version, file SHA-256, threshold and operating point.
    version:
        1 for the first report of the study; a correction has the next number and ``predecessor``.
    series_instance_uid:
        The SR series of this study (the same for every version).
    predecessor:
        Header of the report this one replaces (required when ``version > 1``).
    device_observer_uid:
        Device Observer UID (TID 1004); default :func:`algorithm_device_uid` of the model.
    station_ae_title, manufacturer, software_version:
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
    device_uid = algorithm_device_uid(algorithm.sha256)
    try:
        evidence, charset = clean_sources(sources)
        by_uid = {str(s.get("SOPInstanceUID", "")): s for s in evidence}
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
                uid=device_observer_uid or device_uid,
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
        root = content[0]
        for item in root.ContentSequence:  # the Imaging Measurements and their groups
            if item.ValueType == "CONTAINER":
                item.ContinuityOfContent = "SEPARATE"
                for group in item.get("ContentSequence", []):
                    if group.ValueType == "CONTAINER":
                        group.ContinuityOfContent = "SEPARATE"
        root.ContentSequence.append(
            _qualitative_evaluations(findings, unprocessed, algorithm, by_uid))
        equipment = hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=algorithm.name,
            software_versions=[algorithm.version or "unknown", software_version],
            station_name=station_ae_title,
            contribution_description="Fracture detection on projection radiographs; "
                                     "unverified AI result",
        )
        # IHE AIR's purpose code is not among highdicom's choices: set after construction.
        equipment.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
        equipment.DeviceUID = device_uid
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=root,
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
            coding_schemes=[LOCAL_SCHEME_ITEM, IHE_SCHEME_ITEM],
            contributing_equipment=[equipment],
        )
        if charset:
            sr.SpecificCharacterSet = charset
        elif "SpecificCharacterSet" in sr:
            del sr.SpecificCharacterSet
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(
            f"the SR for study {study_uid} could not be built ({type(exc).__name__}); "
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


def algorithm_device_uid(sha256: str) -> str:
    """The Device UID of the algorithm: derived from its model file, so it changes with it."""
    return str(generate_uid(entropy_srcs=["fracture-node algorithm", sha256.lower()]))


def _text(name: Any, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:_MAX_UT],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


_MAX_UT = 1024


def _qualitative_evaluations(
    findings: Sequence[ImageFinding],
    unprocessed: Sequence[Unprocessed],
    algorithm: AlgorithmInfo,
    headers: dict[str, pydicom.Dataset],
) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 12-14: the statement, the study decision and one sentence per image."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        is_content_continuous=False,  # one paragraph per item in a viewer
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[Any] = [_text(COMMENT, f"{NOT_FOR_DIAGNOSIS} {algorithm.name} "
                                       f"{algorithm.version}, fracture detection on projection "
                                       "radiographs; a radiologist must read the images.")]
    if findings:
        any_positive = any(f.positive for f in findings)
        items.append(hd.sr.CodeContentItem(
            name=FRACTURE, value=PRESENT if any_positive else ABSENT,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    for i, f in enumerate(findings, start=1):
        where = describe_image(headers.get(f.sop_instance_uid))
        decision = decision_text(f.probability, f.positive, algorithm.threshold,
                                 algorithm.operating_point)
        items.append(_text(FINDING, f"Image {i} ({where}): {decision}."))
    for u in unprocessed:
        where = describe_image(headers.get(u.sop_instance_uid))
        items.append(_text(IMAGE_NOT_PROCESSED,
                           f"Not assessed ({where}): {reason_text(u.reason)}. "
                           f"SOP Instance UID {u.sop_instance_uid}"))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


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
        if f.regions and f.saliency_method not in SALIENCY_METHODS:
            raise ReportError(
                f"the SR for study {study_uid}: the saliency regions of image "
                f"{f.sop_instance_uid} name unknown method {f.saliency_method!r}"
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


def _tracking(key: str, label: str) -> hd.sr.TrackingIdentifier:
    """A tracking identifier whose UID is stable across versions of the report."""
    uid = generate_uid(entropy_srcs=["fracture-node tracking", key])
    return hd.sr.TrackingIdentifier(uid=uid, identifier=label)


def _measurement(name: Any, value: float, unit: Any, derivation: Any = None
                 ) -> hd.sr.Measurement:
    """A NUM whose Numeric Value reads as the rounded value: ``37``, ``7.7`` (not ``37.0``)."""
    item = hd.sr.Measurement(name=name, value=value, unit=unit, derivation=derivation)
    item[0].MeasuredValueSequence[0].NumericValue = f"{value:g}"
    return item


def _count(name: Any, value: int) -> hd.sr.Measurement:
    """A NUM holding a whole number, written ``2`` (highdicom writes ``2.0``)."""
    item = hd.sr.Measurement(name=name, value=float(value), unit=UNIT_IMAGES)
    measured = item[0].MeasuredValueSequence[0]
    measured.NumericValue = str(int(value))
    if "FloatingPointValue" in measured:
        del measured.FloatingPointValue
    return item


def _method_is_a_modifier(group: Any) -> Any:
    """TID 1501 row 5 and TID 1419 row 1: Measurement Method is HAS CONCEPT MOD.

    highdicom 0.28 writes CONTAINS; PixelMed's validator (rightly) calls that an error.
    """
    for item in group[0].ContentSequence:
        if (item.ValueType == "CODE"
                and item.ConceptNameCodeSequence[0].CodeValue == "370129005"):
            item.RelationshipType = "HAS CONCEPT MOD"
    return group


def _image_group(
    finding: ImageFinding, index: int, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: finding, algorithm, probability (%), source image.

    The decision in words and the Present/Absent code of the study are in the Qualitative
    Evaluations container (:func:`_qualitative_evaluations`).
    """
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.sop_instance_uid, f"Fracture, image {index}"),
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        measurements=[_measurement(PROBABILITY, percent(finding.probability), UNIT_PERCENT)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            )
        ],
    )


def _check_region(study_uid: str, sop_instance_uid: str, region: Region) -> None:
    box = np.asarray(region.box, dtype=np.float64)
    problem = None
    if not np.isfinite(box).all() or (box < 0).any():
        problem = "has a negative or non-finite coordinate"
    elif region.x1 <= region.x0 or region.y1 <= region.y0:
        problem = "is empty (its box needs x1 > x0 and y1 > y0)"
    elif not 0.0 <= region.peak <= 1.0:
        problem = f"has peak {region.peak} outside 0..1"
    if problem:
        raise ReportError(
            f"the SR for study {study_uid}: a saliency region of image {sop_instance_uid} "
            f"{problem}"
        )


def _region_group(
    finding: ImageFinding, index: int, number: int, region: Region,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one saliency region: the polygon on the image and its relative saliency."""
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"{finding.sop_instance_uid}/region/{number}",
                                      f"Fracture saliency region {number}, image {index}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=region.polygon(),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            ),
        ),
        finding_type=FRACTURE,
        method=SALIENCY_METHODS[finding.saliency_method],
        algorithm_id=algorithm_id,
        measurements=[_measurement(SALIENCY_PEAK, round(float(region.peak), 2), UNIT_NONE,
                                   MAXIMUM)],
    )
    return _method_is_a_modifier(group)


def _summary_group(
    study_uid: str,
    findings: Sequence[ImageFinding],
    unprocessed: Sequence[Unprocessed],
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study: the highest probability and the counts.

    It names no source image: it is about every image of the document (highdicom's reading).
    """
    measurements = [
        _count(IMAGES_PROCESSED, len(findings)),
        _count(IMAGES_NOT_PROCESSED, len(unprocessed)),
    ]
    if findings:
        measurements.insert(0, _measurement(
            PROBABILITY, percent(max(f.probability for f in findings)), UNIT_PERCENT, MAXIMUM))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(study_uid, "Fracture, study summary"),
        finding_type=FRACTURE,
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


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

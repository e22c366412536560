"""build_report / write_report on real radiograph headers from the shared samples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from fracture_node.dicom.report import (
    FINDING,
    FRACTURE,
    IMAGE_NOT_PROCESSED,
    NOT_FOR_DIAGNOSIS,
    PROBABILITY,
    SALIENCY_PEAK,
    SERIES_DESCRIPTION,
    AlgorithmInfo,
    ImageFinding,
    Unprocessed,
    algorithm_device_uid,
    build_report,
    write_report,
)
from fracture_node.dicom.wording import percent
from fracture_node.errors import ReportError
from fracture_node.saliency import Region

ALGORITHM = AlgorithmInfo(
    name="fracture-densenet", version="1.4.0", sha256="0f" * 32, threshold=0.42,
    operating_point="balanced",
)


@pytest.fixture(scope="module")
def study(samples_dir: Path) -> list[pydicom.Dataset]:
    """Four CR headers of one study in two series, made from two real sample files."""
    hip = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)
    hand = pydicom.dcmread(samples_dir / "CR_hand_J2KR_Kakadu_SOTmarker.dcm",
                           stop_before_pixels=True)
    headers: list[pydicom.Dataset] = []
    for i in range(2):
        ds = copy.deepcopy(hip)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        headers.append(ds)
    other_series = generate_uid()
    for _ in range(2):
        ds = copy.deepcopy(hand)
        ds.StudyInstanceUID = hip.StudyInstanceUID
        ds.SeriesInstanceUID = other_series
        ds.SOPInstanceUID = generate_uid()
        headers.append(ds)
    return headers


def finding(ds: pydicom.Dataset, probability: float) -> ImageFinding:
    return ImageFinding(ds.SOPInstanceUID, ds.SOPClassUID, probability, probability >= 0.42)


def build(sources: list[pydicom.Dataset], findings: list[ImageFinding],
          unprocessed: list[Unprocessed] | None = None, **kwargs: Any) -> pydicom.Dataset:
    args: dict[str, Any] = dict(
        version=1, series_instance_uid="1.2.3.4.5.6", device_observer_uid="1.2.3.4.5.7",
        station_ae_title="FRACTURE_NODE", software_version="0.1.0",
    )
    args.update(kwargs)
    return build_report(sources, findings, unprocessed or [], ALGORITHM, **args)


def groups(sr: pydicom.Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    report = cast(hd.sr.MeasurementReport, hd.sr.Comprehensive3DSR.from_dataset(sr).content)
    return list(report.get_image_measurement_groups())


def items_named(group: Any, name: Any) -> list[pydicom.Dataset]:
    return [i for i in group[0].ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == name.value]


def summary(sr: pydicom.Dataset) -> Any:
    return next(g for g in groups(sr) if (g.tracking_identifier or "").endswith("study summary"))


def qualitative(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The items of the TID 1500 Qualitative Evaluations container (rows 12-14)."""
    (container,) = [i for i in sr.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return list(container.ContentSequence)


def named(items: list[pydicom.Dataset], name: Any) -> list[pydicom.Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == name.value]


def test_study_and_patient_attributes_are_copied(study: list[pydicom.Dataset]) -> None:
    """The SR carries the source's Study Instance UID and patient/study attributes."""
    sr = build(study, [finding(study[0], 0.9)])
    src = study[0]
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert sr[keyword].value == src[keyword].value, keyword


def test_sr_is_a_comprehensive_3d_sr_in_its_own_series(study: list[pydicom.Dataset]) -> None:
    """The SR is a new Comprehensive 3D SR instance in the given series, instance = version."""
    sr = build(study, [finding(study[0], 0.9)])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID == "1.2.3.4.5.6"
    assert sr.SOPInstanceUID not in {s.SOPInstanceUID for s in study}
    assert sr.InstanceNumber == 1
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_flags_and_series_description_mark_an_unverified_ai_result(
    study: list[pydicom.Dataset],
) -> None:
    """The SR is PRELIMINARY, UNVERIFIED, COMPLETE and its series says it is unverified AI."""
    sr = build(study, [finding(study[0], 0.9)])
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert "UNVERIFIED" in sr.SeriesDescription and "AI" in sr.SeriesDescription


def test_one_measurement_group_per_finding_plus_a_summary(study: list[pydicom.Dataset]) -> None:
    """Each processed image has its own measurement group, plus one study summary group."""
    sr = build(study, [finding(ds, p) for ds, p in zip(study, (0.9, 0.1, 0.5, 0.2), strict=True)])
    found = groups(sr)
    assert len(found) == 5
    per_image = [g for g in found if g.source_images]
    assert sorted(g.source_images[0].referenced_sop_instance_uid for g in per_image) == sorted(
        ds.SOPInstanceUID for ds in study
    )


def test_each_group_has_its_probability_as_a_percentage(study: list[pydicom.Dataset]) -> None:
    """A group's NUM is the image's probability in %, to two significant digits."""
    probabilities = {study[0].SOPInstanceUID: 0.93412, study[1].SOPInstanceUID: 0.0772}
    sr = build(study[:2], [finding(study[0], 0.93412), finding(study[1], 0.0772)])
    for group in groups(sr):
        if not group.source_images:
            continue
        uid = group.source_images[0].referenced_sop_instance_uid
        assert group.finding_type == FRACTURE
        (num,) = items_named(group, PROBABILITY)
        value = num.MeasuredValueSequence[0]
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
        assert str(value.NumericValue) == {0.93412: "93", 0.0772: "7.7"}[probabilities[uid]]
        assert items_named(group, FRACTURE) == []  # the decision is in words, see below


@pytest.mark.parametrize(("p", "expected"), [
    (0.37431461579215, 37.0), (0.0772, 7.7), (0.00521, 0.52), (0.9971, 99.7), (0.99996, 99.99),
    (1.0, 100), (0.0, 0), (0.22, 22.0),
])
def test_percent_keeps_two_significant_digits(p: float, expected: float) -> None:
    """Probabilities read as 37%, 7.7%, 0.52%; near 100% a third digit, never a false 100%."""
    assert percent(p) == expected


def test_each_image_has_its_decision_in_words(study: list[pydicom.Dataset]) -> None:
    """A sentence per image states the result, the threshold and the operating point."""
    sr = build(study[:2], [finding(study[0], 0.37431461579215), finding(study[1], 0.0772)])
    texts = [i.TextValue for i in named(qualitative(sr), FINDING)]
    assert texts == [
        "Image 1 (CR HIP, series 1, image 1): no fracture suspected: 37%, below the 42% "
        "decision threshold of the balanced operating point.",
        "Image 2 (CR HIP, series 1, image 2): no fracture suspected: 7.7%, below the 42% "
        "decision threshold of the balanced operating point.",
    ]
    positive = build(study[:1], [finding(study[0], 0.84)])
    (text,) = named(qualitative(positive), FINDING)
    assert text.TextValue.endswith("suspected fracture: 84%, at or above the 42% decision "
                                   "threshold of the balanced operating point.")


def test_the_not_for_diagnosis_statement_is_rendered_content(
    study: list[pydicom.Dataset],
) -> None:
    """The first item of the Qualitative Evaluations says: AI result, not verified."""
    sr = build(study, [finding(study[0], 0.9)])
    first = qualitative(sr)[0]
    assert first.ValueType == "TEXT"
    assert first.TextValue.startswith(NOT_FOR_DIAGNOSIS)


def test_summary_says_any_fracture_and_the_maximum_probability(
    study: list[pydicom.Dataset],
) -> None:
    """The study is Present when any image is positive; the summary holds the maximum."""
    sr = build(study, [finding(study[0], 0.2), finding(study[1], 0.81), finding(study[2], 0.3)])
    (evaluation,) = named(qualitative(sr), FRACTURE)
    assert evaluation.ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
    (num,) = items_named(summary(sr), PROBABILITY)
    assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(81)
    assert num.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning == "Maximum"


def test_summary_is_absent_when_no_image_is_positive(study: list[pydicom.Dataset]) -> None:
    """No positive image gives a study-level Absent."""
    sr = build(study[:2], [finding(study[0], 0.2), finding(study[1], 0.1)])
    (evaluation,) = named(qualitative(sr), FRACTURE)
    assert evaluation.ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value


def test_unprocessed_images_are_listed_with_their_reason_in_words(
    study: list[pydicom.Dataset],
) -> None:
    """An image that could not be read has a sentence with its reason; counts are integers."""
    bad = study[3]
    sr = build(study, [finding(study[0], 0.6)],
               [Unprocessed(bad.SOPInstanceUID, bad.SOPClassUID, "undecodable")])
    (text,) = named(qualitative(sr), IMAGE_NOT_PROCESSED)
    assert text.TextValue.startswith("Not assessed (CR HAND, series")
    assert "the pixel data could not be decoded" in text.TextValue
    assert bad.SOPInstanceUID in text.TextValue
    counts = {i.ConceptNameCodeSequence[0].CodeValue: str(i.MeasuredValueSequence[0].NumericValue)
              for i in summary(sr)[0].ContentSequence if i.ValueType == "NUM"}
    assert counts["IMGPROC"] == "1" and counts["IMGNOTPROC"] == "1"


def test_a_study_with_no_readable_image_makes_no_claim(study: list[pydicom.Dataset]) -> None:
    """Only unprocessed images: the summary and the reasons, no present/absent, no probability."""
    bad = study[0]
    sr = build(study[:1], [], [Unprocessed(bad.SOPInstanceUID, bad.SOPClassUID, "colour")])
    (group,) = groups(sr)
    assert items_named(group, PROBABILITY) == []
    assert named(qualitative(sr), FRACTURE) == []
    assert "a colour image" in named(qualitative(sr), IMAGE_NOT_PROCESSED)[0].TextValue


def test_algorithm_identification_names_model_and_parameters(
    study: list[pydicom.Dataset],
) -> None:
    """TID 4019 carries the algorithm name, version, model SHA-256, threshold, operating point."""
    sr = build(study, [finding(study[0], 0.9)])
    for group in groups(sr):
        values: dict[str, list[str]] = {}
        for item in group[0].ContentSequence:
            if item.RelationshipType == "HAS CONCEPT MOD" and item.ValueType == "TEXT":
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                values.setdefault(meaning, []).append(item.TextValue)
        assert values["Algorithm Name"] == ["fracture-densenet"]
        assert values["Algorithm Version"] == ["1.4.0"]
        assert values["Algorithm Parameters"] == [
            f"model_sha256={'0f' * 32}", "threshold=0.42", "operating_point=balanced"
        ]


def test_device_observer_identifies_this_node(study: list[pydicom.Dataset]) -> None:
    """The observation context names a device observer with our UID and AE title."""
    sr = build(study, [finding(study[0], 0.9)])
    report = cast(hd.sr.MeasurementReport, hd.sr.Comprehensive3DSR.from_dataset(sr).content)
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == "1.2.3.4.5.7"
    assert attributes.name == "FRACTURE_NODE"


def test_the_algorithm_is_contributing_equipment_as_ihe_air_asks(
    study: list[pydicom.Dataset],
) -> None:
    """A Contributing Equipment item (Newcode1, 99IHE) names the model and its device UID."""
    sr = build(study, [finding(study[0], 0.9)])
    (item,) = [e for e in sr.ContributingEquipmentSequence
               if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "99IHE", "Processing Algorithm")
    assert item.Manufacturer == "fracture-node"
    assert item.ManufacturerModelName == "fracture-densenet"
    assert list(item.SoftwareVersions) == ["1.4.0", "0.1.0"]
    assert item.DeviceUID == algorithm_device_uid("0f" * 32)
    assert "99IHE" in {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}


def test_the_device_uid_changes_with_the_model_file() -> None:
    """Another model file gives another Device UID; the same file the same one."""
    assert algorithm_device_uid("0f" * 32) == algorithm_device_uid("0F" * 32)
    assert algorithm_device_uid("0f" * 32) != algorithm_device_uid("1f" * 32)


def test_sources_of_several_series_are_all_evidence(study: list[pydicom.Dataset]) -> None:
    """Every source instance, in both series, is listed as current evidence."""
    sr = build(study, [finding(ds, 0.3) for ds in study])
    (item,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert item.StudyInstanceUID == study[0].StudyInstanceUID
    listed = {(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
              for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert listed == {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in study}


def test_version_2_references_its_predecessor(study: list[pydicom.Dataset]) -> None:
    """A second version is a new instance in the same series naming the first (PS3.3 C.17.2)."""
    first = build(study, [finding(study[0], 0.3)])
    second = build(study, [finding(study[0], 0.7)], version=2, predecessor=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2
    (study_item,) = second.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == first.StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = series_item.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == first.SOPClassUID
    assert "PredecessorDocumentsSequence" not in first


def test_version_2_without_predecessor_is_refused(study: list[pydicom.Dataset]) -> None:
    """A correction that does not name the report it replaces is a ReportError."""
    with pytest.raises(ReportError, match=study[0].StudyInstanceUID):
        build(study, [finding(study[0], 0.3)], version=2)


def test_new_version_in_another_series_is_refused(study: list[pydicom.Dataset]) -> None:
    """A new version must stay in the series of its predecessor."""
    first = build(study, [finding(study[0], 0.3)])
    with pytest.raises(ReportError, match="series"):
        build(study, [finding(study[0], 0.3)], version=2, predecessor=first,
              series_instance_uid="1.2.3.4.9")


def test_image_missing_from_sources_is_a_report_error_without_patient_data(
    study: list[pydicom.Dataset],
) -> None:
    """highdicom's refusal is wrapped in ReportError naming the study UID, not the patient."""
    stranger = ImageFinding(generate_uid(), study[0].SOPClassUID, 0.5, True)
    with pytest.raises(ReportError) as caught:
        build(study[:1], [stranger])
    message = str(caught.value)
    assert study[0].StudyInstanceUID in message
    assert str(study[0].PatientName) not in message
    assert str(study[0].PatientID) not in message
    assert isinstance(caught.value.__cause__, ValueError)


def test_sources_from_two_studies_are_refused(study: list[pydicom.Dataset]) -> None:
    """Headers of two studies cannot make one report."""
    other = copy.deepcopy(study[1])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ReportError, match="2 studies"):
        build([study[0], other], [finding(study[0], 0.5)])


def test_probability_outside_0_1_is_refused(study: list[pydicom.Dataset]) -> None:
    """A probability of 1.5 is a programming error, not a result."""
    with pytest.raises(ReportError, match="outside 0..1"):
        build(study, [ImageFinding(study[0].SOPInstanceUID, study[0].SOPClassUID, 1.5, True)])


def test_source_without_type2_attributes_gives_empty_ones(samples_dir: Path) -> None:
    """A header lacking Patient ID and study date still reports, with those attributes empty."""
    ds = pydicom.dcmread(samples_dir / "CR_chest_MONO1_implicitVR_nometa.dcm",
                         stop_before_pixels=True, force=True)
    assert "PatientID" not in ds
    sr = build([ds], [finding(ds, 0.1)])
    for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "StudyID"):
        assert keyword in sr and not sr[keyword].value, keyword
    assert "PatientID" not in ds


def test_write_report_leaves_a_complete_file_and_no_temporary(
    study: list[pydicom.Dataset], tmp_path: Path
) -> None:
    """write_report produces a readable Part 10 file and nothing else in the folder."""
    sr = build(study, [finding(study[0], 0.9)])
    target = tmp_path / "reports" / "sr.dcm"
    write_report(sr, target)
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]
    back = pydicom.dcmread(target)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


# Saliency regions (TID 1410) ---------------------------------------------------------------

SQUARE = ((100.0, 200.0), (300.0, 200.0), (300.0, 400.0), (100.0, 400.0), (100.0, 200.0))
SMALL = ((10.0, 20.0), (30.0, 20.0), (30.0, 45.0), (10.0, 45.0), (10.0, 20.0))


def with_regions(ds: pydicom.Dataset, probability: float, method: str = "hirescam"
                 ) -> ImageFinding:
    return ImageFinding(ds.SOPInstanceUID, ds.SOPClassUID, probability, probability >= 0.42,
                        (Region.from_box(100.0, 200.0, 300.0, 400.0, 1.0),
                         Region.from_box(10.0, 20.0, 30.0, 45.0, 0.63)), method)


def roi_groups(sr: pydicom.Dataset) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    report = cast(hd.sr.MeasurementReport, hd.sr.Comprehensive3DSR.from_dataset(sr).content)
    return list(report.get_planar_roi_measurement_groups())


def test_regions_of_a_positive_image_are_planar_roi_groups(study: list[pydicom.Dataset]) -> None:
    """Each region of a positive image is a TID 1410 group: a closed polyline on that image."""
    sr = build(study, [with_regions(study[0], 0.9)])
    found = roi_groups(sr)
    assert len(found) == 2
    for group, polygon in zip(found, (SQUARE, SMALL), strict=True):
        assert group.finding_type == FRACTURE
        region = group.roi
        assert region is not None
        assert region.GraphicType == "POLYLINE"
        np.testing.assert_allclose(region.value, polygon)
        (source,) = region.ContentSequence
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == study[0].SOPInstanceUID


def test_a_region_carries_its_peak_saliency_and_method(study: list[pydicom.Dataset]) -> None:
    """The group holds the region's peak saliency (derivation Maximum) and the method's code."""
    sr = build(study, [with_regions(study[0], 0.9, "gradcam")])
    peaks, methods = [], []
    for group in roi_groups(sr):
        (num,) = items_named(group, SALIENCY_PEAK)
        peaks.append(float(num.MeasuredValueSequence[0].NumericValue))
        assert num.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning == "Maximum"
        (method,) = [i for i in group[0].ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Method"]
        assert method.RelationshipType == "HAS CONCEPT MOD"  # TID 1419 row 1
        methods.append(method.ConceptCodeSequence[0].CodeValue)
    assert peaks == pytest.approx([1.0, 0.63])
    assert methods == ["GRADCAM", "GRADCAM"]


def test_regions_of_negative_images_are_left_out_by_default(
    study: list[pydicom.Dataset],
) -> None:
    """A negative image's regions appear only with regions_of_negatives=True."""
    findings = [with_regions(study[0], 0.1)]
    assert roi_groups(build(study, findings)) == []
    assert len(roi_groups(build(study, findings, regions_of_negatives=True))) == 2


def test_findings_without_regions_give_no_planar_roi_group(study: list[pydicom.Dataset]) -> None:
    """The default (no regions) keeps the report as it was: TID 1501 groups only."""
    sr = build(study, [finding(study[0], 0.9)])
    assert roi_groups(sr) == []
    assert len(groups(sr)) == 2


def test_region_tracking_uids_are_stable_across_versions(study: list[pydicom.Dataset]) -> None:
    """A new report version keeps the tracking UID of each image's region."""
    first = build(study, [with_regions(study[0], 0.9)])
    second = build(study, [with_regions(study[0], 0.95)], version=2, predecessor=first)
    assert [g.tracking_uid for g in roi_groups(first)] == [
        g.tracking_uid for g in roi_groups(second)]


@pytest.mark.parametrize(("box", "peak", "why"), [
    ((10.0, 10.0, 10.0, 20.0), 1.0, "empty"),
    ((10.0, 30.0, 20.0, 20.0), 1.0, "empty"),
    ((-1.0, 0.0, 5.0, 5.0), 1.0, "negative"),
    ((0.0, 0.0, float("nan"), 5.0), 1.0, "non-finite"),
    ((100.0, 200.0, 300.0, 400.0), 1.5, "outside 0..1"),
])
def test_a_malformed_region_is_refused(study: list[pydicom.Dataset], box: Any, peak: float,
                                       why: str) -> None:
    """An empty, negative or non-finite box, or a peak outside 0..1, is a ReportError."""
    bad = ImageFinding(study[0].SOPInstanceUID, study[0].SOPClassUID, 0.9, True,
                       (Region.from_box(*box, peak),))
    with pytest.raises(ReportError, match=why):
        build(study, [bad])


@pytest.mark.parametrize("name", [
    "Doe^John\\Roe^Jane", "A^B^C^D^E^F=G=H=I=J", "^EDD\\FD=^D=F=EJ^=^FIG\\\\IEHA=FBB",
])
def test_a_malformed_person_name_does_not_stop_the_report(
        study: list[pydicom.Dataset], name: str) -> None:
    """A name with backslashes or too many groups is trimmed, and the SR is built."""
    ds = copy.deepcopy(study[0])
    ds.PatientName = name
    ds.ReferringPhysicianName = name
    sr = build([ds], [finding(ds, 0.9)])
    assert "\\" not in str(sr.PatientName) and str(sr.PatientName).count("=") <= 2
    assert sr.StudyInstanceUID == ds.StudyInstanceUID

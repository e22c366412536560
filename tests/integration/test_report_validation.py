"""Every kind of SR we write passes PixelMed's DicomSRValidator (no error, no warning),
dicom3tools' dciodvfy and DCMTK's dsrdump; so do the overlay objects (Secondary Capture, Grayscale
Softcopy Presentation State)."""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fracture_node.dicom.overlay import build_presentation_state, build_secondary_capture
from fracture_node.dicom.pixels import read_pixels
from fracture_node.dicom.report import (
    AlgorithmInfo,
    ImageFinding,
    Unprocessed,
    build_report,
    write_report,
)
from fracture_node.saliency import Region
from tests.support.saliency import dciodvfy

ALGORITHM = AlgorithmInfo("fracture-densenet", "1.4.0", "ab" * 32, 0.42, "balanced")
SERIES = generate_uid()

# dciodvfy knows only registered coding schemes; ours is a private one ("99" prefix, PS3.3
# 8.2) declared in the Coding Scheme Identification Sequence. Its dictionary predates Device UID
# (0018,1002) in the Contributing Equipment Sequence (the item IHE AIR asks for), hence the
# "Standard Extended" warning.
EXPECTED_WARNINGS = [
    re.compile(r"Unrecognized defined term <99FRNODE> .*Coding Scheme Designator"),
    re.compile(r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID"),
    re.compile(r"contains attributes not present in standard DICOM IOD - this is a Standard "
               r"Extended SOP Class"),
]
# A sample's own Referring Physician's Name (". ?????? ?.?" once cleaned) is a dubious PN; a
# garbage Study Date is emptied, which DICOMDIR would miss.
SOURCE_WARNINGS = [re.compile(r"Referring Physician's Name .*Retired Person Name form"),
                   re.compile(r"needed to build DICOMDIR - Study Date$")]
PIXELMED = ["/usr/share/java/pixelmed.jar", "/usr/share/java/commons-codec.jar"]


def _headers(samples_dir: Path) -> list[pydicom.Dataset]:
    hip = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)
    dx = pydicom.dcmread(samples_dir / "DX_J2KR_1416x1420_u16.dcm", stop_before_pixels=True)
    second = copy.deepcopy(hip)
    second.SOPInstanceUID = generate_uid()
    dx.StudyInstanceUID = hip.StudyInstanceUID
    return [hip, second, dx]


def _finding(ds: pydicom.Dataset, p: float) -> ImageFinding:
    return ImageFinding(ds.SOPInstanceUID, ds.SOPClassUID, p, p >= ALGORITHM.threshold)


def _build(sources: list[pydicom.Dataset], findings: list[ImageFinding],
           unprocessed: list[Unprocessed], version: int = 1,
           predecessor: pydicom.Dataset | None = None,
           regions_of_negatives: bool = False) -> pydicom.Dataset:
    return build_report(
        sources, findings, unprocessed, ALGORITHM, version=version, series_instance_uid=SERIES,
        predecessor=predecessor, device_observer_uid="1.2.826.0.1.3680043.8.498.1",
        station_ae_title="FRACTURE_NODE", software_version="0.1.0",
        regions_of_negatives=regions_of_negatives,
    )


REGIONS = (
    Region.from_box(400.0, 610.5, 720.25, 905.0, 1.0),
    Region.from_box(10.0, 20.0, 60.0, 80.0, 0.64),
)


def _with_regions(ds: pydicom.Dataset, p: float) -> ImageFinding:
    return ImageFinding(ds.SOPInstanceUID, ds.SOPClassUID, p, p >= ALGORITHM.threshold, REGIONS)


def one_finding(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    return _build(h[:1], [_finding(h[0], 0.91)], [])


def several_series(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    return _build(h, [_finding(h[0], 0.91), _finding(h[1], 0.12), _finding(h[2], 0.33)], [])


def with_unprocessed(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    bad = h[2]
    return _build(h, [_finding(h[0], 0.2), _finding(h[1], 0.3)],
                  [Unprocessed(bad.SOPInstanceUID, bad.SOPClassUID, "undecodable")])


def only_unprocessed(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    return _build(h[:1], [], [Unprocessed(h[0].SOPInstanceUID, h[0].SOPClassUID, "colour")])


def version_2(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    first = several_series(h)
    return _build(h, [_finding(h[0], 0.5), _finding(h[1], 0.12), _finding(h[2], 0.33)], [],
                  version=2, predecessor=first)


def with_regions(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    return _build(h, [_with_regions(h[0], 0.91), _with_regions(h[1], 0.12), _finding(h[2], 0.6)],
                  [])


def with_regions_of_negatives(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    return _build(h, [_with_regions(h[0], 0.91), _with_regions(h[1], 0.12)], [],
                  regions_of_negatives=True)


def cyrillic_without_charset(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The DX sample: Cyrillic manufacturer/institution bytes and no Specific Character Set."""
    dx = h[2]
    assert "SpecificCharacterSet" not in dx
    return _build([dx], [_finding(dx, 0.37)], [])


def foreign_dates(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    bad = copy.deepcopy(h[0])
    bad.PatientBirthDate = "1984-03-12"
    bad.StudyTime = "10:30"
    return _build([bad], [_finding(bad, 0.07)], [])


def garbage_values(h: list[pydicom.Dataset]) -> pydicom.Dataset:
    bad = copy.deepcopy(h[0])
    bad.PatientBirthDate = "garbage!"
    bad.PatientSex = "X"
    bad.StudyDate = "20231399"
    bad.PatientAge = "forty"
    bad.AccessionNumber = "A" * 40
    return _build([bad], [_finding(bad, 0.5)], [])


KINDS: list[Callable[[list[pydicom.Dataset]], pydicom.Dataset]] = [
    one_finding, several_series, with_unprocessed, only_unprocessed, version_2, with_regions,
    with_regions_of_negatives, cyrillic_without_charset, foreign_dates, garbage_values,
]




@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_dciodvfy_finds_no_error(kind: Callable[..., pydicom.Dataset], samples_dir: Path,
                                 tmp_path: Path) -> None:
    """dciodvfy reports no error and only the known dictionary warnings."""
    path = tmp_path / "sr.dcm"
    write_report(kind(_headers(samples_dir)), path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    known = EXPECTED_WARNINGS + SOURCE_WARNINGS
    unexpected = [w for w in warnings if not any(p.search(w) for p in known)]
    assert unexpected == []


JAVA_OPTIONS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                "-Djdk.xml.xpathTotalOpLimit=0"]
"""Java 17's XPath limits are lower than the validator's stylesheets need."""


def _issues(out: str) -> tuple[list[str], list[str]]:
    lines = out.splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning")])


def pixelmed(path: Path) -> tuple[list[str], list[str], str]:
    """``DicomSRValidator <path>`` as documented: (errors, warnings, whole output)."""
    run = subprocess.run(["java", "-cp", ":".join(PIXELMED), *JAVA_OPTIONS,
                          "com.pixelmed.validate.DicomSRValidator", str(path)],
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    return (*_issues(out), out)


@pytest.fixture(scope="module")
def pixelmed_outputs(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, str]:
    """Every kind of SR through DicomSRValidator in one JVM (tests/integration/pixelmed)."""
    folder = tmp_path_factory.mktemp("pixelmed")
    paths = []
    for kind in KINDS:
        path = folder / f"{kind.__name__}.dcm"
        write_report(kind(_headers(samples_dir)), path)
        paths.append(str(path))
    many = Path(__file__).parent / "pixelmed" / "ValidateMany.java"
    run = subprocess.run(["java", "-cp", ":".join(PIXELMED), *JAVA_OPTIONS, str(many), *paths],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    outputs = {}
    for chunk in run.stdout.split("==== ")[1:]:
        path, _, out = chunk.partition("\n")
        outputs[Path(path).stem] = out
    assert sorted(outputs) == sorted(k.__name__ for k in KINDS)
    return outputs


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_pixelmed_finds_no_error_and_no_warning(kind: Callable[..., pydicom.Dataset],
                                                pixelmed_outputs: dict[str, str]) -> None:
    """PixelMed's DicomSRValidator checks TID 1500 and finds nothing to say."""
    out = pixelmed_outputs[kind.__name__]
    assert "Found Root Template TID_1500" in out, out
    assert "IOD validation complete" in out, out
    assert _issues(out) == ([], [])


def test_pixelmed_still_sees_a_template_error(samples_dir: Path, tmp_path: Path) -> None:
    """The documented command is live: a procedure code outside CID 100 is an error."""
    sr = one_finding(_headers(samples_dir))
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121058":
            item.ConceptCodeSequence[0].CodeValue = "168537006"
            item.ConceptCodeSequence[0].CodeMeaning = "Plain radiography"
    path = tmp_path / "sr.dcm"
    write_report(sr, path)
    errors, warnings, _ = pixelmed(path)
    assert len(errors) == 1 and "not found in context group 100" in errors[0]
    assert warnings == []


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_dsrdump_reads_the_document(kind: Callable[..., pydicom.Dataset], samples_dir: Path,
                                    tmp_path: Path) -> None:
    """dsrdump parses the content tree without a warning or an error."""
    path = tmp_path / "sr.dcm"
    write_report(kind(_headers(samples_dir)), path)
    run = subprocess.run(["dsrdump", "-ll", "warn", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "Comprehensive 3D SR Document" in run.stdout
    assert "Verification Flag   : UNVERIFIED" in run.stdout
    assert '(72704001,SCT,"Fracture")' in run.stdout


def test_sparse_source_header_only_adds_warnings_about_the_source(
    samples_dir: Path, tmp_path: Path
) -> None:
    """A source without Patient ID/study date gives no dciodvfy error, only DICOMDIR hints."""
    ds = pydicom.dcmread(samples_dir / "CR_chest_MONO1_implicitVR_nometa.dcm",
                         stop_before_pixels=True, force=True)
    path = tmp_path / "sr.dcm"
    write_report(_build([ds], [_finding(ds, 0.7)], []), path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    from_source = [
        re.compile(r"needed to build DICOMDIR - (Patient ID|Study Date|Study Time|Study ID)$"),
        re.compile(r"Patient's Name .*Retired Person Name form"),  # the sample's own name
        *EXPECTED_WARNINGS,
    ]
    assert [w for w in warnings if not any(p.search(w) for p in from_source)] == []


def test_dsrdump_shows_the_region_on_its_image(samples_dir: Path, tmp_path: Path) -> None:
    """The saliency region is a SCOORD POLYLINE selected from the source image."""
    path = tmp_path / "sr.dcm"
    write_report(with_regions(_headers(samples_dir)), path)
    run = subprocess.run(["dsrdump", "-ll", "warn", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.count('SCOORD:(,,"Image Region")=(POLYLINE,400/610.5') == 1
    assert '<selected from IMAGE:(,,"Source")=(CR image,)>' in run.stdout
    assert run.stdout.count('NUM:(,,"Relative saliency")') == 2


# Overlay objects ---------------------------------------------------------------------------

# The hip sample's header (a NEMA WG04 test image) names no laterality; an empty General
# Series Laterality (Type 2C, "unknown") is what we can honestly write.
OVERLAY_WARNINGS = [re.compile(r"permitted to be empty when actually unknown.*<Laterality>")]


@pytest.fixture(scope="module")
def hip_with_pixels(samples_dir: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm")
    image = read_pixels(ds)
    return pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True), image


def test_secondary_capture_passes_dciodvfy(hip_with_pixels: tuple[pydicom.Dataset, np.ndarray],
                                           tmp_path: Path) -> None:
    """The overlay Secondary Capture has no dciodvfy error and only the laterality warning."""
    source, image = hip_with_pixels
    heat = np.zeros(image.shape, dtype=np.float32)
    heat[600:900, 400:720] = 1.0
    sc = build_secondary_capture(source, image, heat, list(REGIONS),
                                 probability=0.91, series_instance_uid=generate_uid(),
                                 model_name="fracture-model", software_version="0.1.0")
    path = tmp_path / "sc.dcm"
    write_report(sc, path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if not any(p.search(w) for p in OVERLAY_WARNINGS)] == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_presentation_state_passes_dciodvfy(hip_with_pixels: tuple[pydicom.Dataset, np.ndarray],
                                            tmp_path: Path) -> None:
    """The overlay GSPS has no dciodvfy error and only the laterality warning."""
    source, _ = hip_with_pixels
    gsps = build_presentation_state(source, list(REGIONS), probability=0.91,
                                    series_instance_uid=generate_uid(),
                                    model_name="fracture-model", software_version="0.1.0")
    path = tmp_path / "gsps.dcm"
    write_report(gsps, path)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if not any(p.search(w) for p in OVERLAY_WARNINGS)] == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    ref = back.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_presentation_state_of_an_undeclared_cyrillic_header_passes_dciodvfy(
        samples_dir: Path, tmp_path: Path) -> None:
    """The DX sample's cp1251 text without a character set is cleaned in the GSPS as well."""
    dx = pydicom.dcmread(samples_dir / "DX_J2KR_1416x1420_u16.dcm", stop_before_pixels=True)
    dx.PatientBirthDate = "1984-03-12"
    gsps = build_presentation_state(dx, list(REGIONS), probability=0.37,
                                    series_instance_uid=generate_uid(),
                                    model_name="fracture-model", software_version="0.1.0")
    path = tmp_path / "gsps.dcm"
    write_report(gsps, path)
    errors, _ = dciodvfy(path)
    assert errors == []
    back = pydicom.dcmread(path)
    assert back.PatientBirthDate == "19840312"
    assert "SpecificCharacterSet" not in back

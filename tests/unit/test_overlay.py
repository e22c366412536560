"""Overlay objects (dicom/overlay.py) and overlay PNGs (cli/predict_saliency.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from fracture_node.cli.predict_saliency import write_overlays
from fracture_node.dicom.overlay import (
    GSPS_LAYER,
    GSPS_SERIES_DESCRIPTION,
    REGION_COLOUR,
    SC_SERIES_DESCRIPTION,
    build_presentation_state,
    build_secondary_capture,
    caption_text,
    overlay_series_uid,
    render_overlay,
)
from fracture_node.dicom.pixels import read_pixels
from fracture_node.errors import ReportError
from fracture_node.ml.infer import Classifier
from fracture_node.saliency import Region

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
REGION = Region.from_box(100.0, 150.0, 220.0, 260.0, 1.0)


@pytest.fixture(scope="module")
def hip(samples_dir: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """A real CR header and its grey image as the model reads it."""
    ds = pydicom.dcmread(samples_dir / "derived" / "CR_hip_RG2_uncompressed_explicitVRLE.dcm")
    image = read_pixels(ds)
    del ds.PixelData
    return ds, image


def heat_at(shape: tuple[int, int], cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 30.0 ** 2)).astype(np.float32)


def test_render_blends_the_heat_and_outlines_the_regions() -> None:
    """Hot pixels turn red, cold ones stay grey, the region's edge is drawn in yellow."""
    image = np.full((400, 300), 0.5, dtype=np.float32)
    out = render_overlay(image, heat_at(image.shape, 160, 200), [REGION])
    assert out.shape == (400, 300, 3) and out.dtype == np.uint8
    hot = out[200, 160].astype(int)
    assert hot[0] > hot[2] + 40  # red over blue
    assert tuple(out[390, 10]) == (128, 128, 128)  # far away: the grey image
    assert tuple(out[150, 160]) == REGION_COLOUR  # the top edge of the region


def test_render_shrinks_to_max_side() -> None:
    """max_side bounds the longest side of the picture, keeping the aspect ratio."""
    out = render_overlay(np.zeros((400, 200), dtype=np.float32), None, [REGION], max_side=100)
    assert out.shape == (100, 50, 3)


def test_secondary_capture_belongs_to_the_study_in_its_own_series(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """The SC carries the study UID and patient attributes, a new series and UNVERIFIED label."""
    source, image = hip
    sc = build_secondary_capture(source, image, heat_at(image.shape, 160, 200), [REGION],
                                 probability=0.81, series_instance_uid="1.2.3.4.5",
                                 model_name="fracture-model", software_version="0.1.0")
    assert sc.SOPClassUID == SC_CLASS
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID"):
        assert (sc[keyword].value or "") == (source[keyword].value or ""), keyword
    assert sc.SeriesInstanceUID == "1.2.3.4.5" != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3


def test_secondary_capture_references_its_source_image(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """The Source Image Sequence names the radiograph the overlay was made from."""
    source, image = hip
    sc = build_secondary_capture(source, image, None, [REGION], probability=0.81,
                                 series_instance_uid="1.2.3.4.5", model_name="m",
                                 software_version="0.1.0")
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_secondary_capture_is_shrunk_to_max_side(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """A 2140-row radiograph gives a picture of at most max_side rows and columns."""
    source, image = hip
    sc = build_secondary_capture(source, image, None, [REGION], probability=0.5,
                                 series_instance_uid="1.2.3.4.5", model_name="m",
                                 software_version="0.1.0", max_side=512)
    assert max(sc.Rows, sc.Columns) == 512
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_secondary_capture_refuses_an_image_of_another_size(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """A grey image that is not the source's pixel matrix is a ReportError naming the UIDs."""
    source, _ = hip
    with pytest.raises(ReportError, match=source.SOPInstanceUID):
        build_secondary_capture(source, np.zeros((10, 10), dtype=np.float32), None, [REGION],
                                probability=0.5, series_instance_uid="1.2.3", model_name="m",
                                software_version="0.1.0")


def test_presentation_state_outlines_the_regions_on_the_source_image(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """The GSPS references the radiograph and carries each region as a PIXEL polyline."""
    source, _ = hip
    second = Region.from_box(10.0, 20.0, 30.0, 50.0, 0.7)
    gsps = build_presentation_state(source, [REGION, second], probability=0.81,
                                    series_instance_uid="1.2.3.4.6", model_name="m",
                                    software_version="0.1.0")
    assert gsps.SOPClassUID == GSPS_CLASS
    assert gsps.StudyInstanceUID == source.StudyInstanceUID
    assert gsps.PatientID == source.PatientID
    assert gsps.SeriesInstanceUID == "1.2.3.4.6"
    assert gsps.SeriesDescription == GSPS_SERIES_DESCRIPTION
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image_ref,) = series.ReferencedImageSequence
    assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.GraphicLayer == GSPS_LAYER
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID)
    graphics = annotation.GraphicObjectSequence
    assert [g.GraphicType for g in graphics] == ["POLYLINE", "POLYLINE"]
    assert all(g.GraphicAnnotationUnits == "PIXEL" for g in graphics)
    np.testing.assert_allclose(np.reshape(graphics[0].GraphicData, (-1, 2)), REGION.polygon())
    assert "AI fracture 81% (unverified), R1" == annotation.TextObjectSequence[0].UnformattedTextValue


def test_presentation_state_without_a_region_is_refused(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """A GSPS with nothing to show is a ReportError."""
    with pytest.raises(ReportError, match="at least one region"):
        build_presentation_state(hip[0], [], probability=0.9, series_instance_uid="1.2.3",
                                 model_name="m", software_version="0.1.0")


def test_write_overlays_writes_one_png_per_readable_input(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Readable images get a PNG of their own size; an unreadable file is skipped."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((90, 120)) * 255).astype(np.uint8)).save(inputs / "a.png")
    Image.fromarray((rng.random((150, 70)) * 255).astype(np.uint8)).save(inputs / "b.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    classifier = Classifier.load(tiny_model, device="cpu")
    written = write_overlays(sorted(inputs.iterdir()), classifier, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == ["a.saliency.png", "b.saliency.png"]
    with Image.open(written[inputs / "b.png"]) as png:
        assert png.size == (70, 150) and png.mode == "RGB"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.saliency.png", "b.saliency.png"]


def test_overlay_series_uid_is_stable_per_study_and_kind() -> None:
    """Each study has one SC series and one GSPS series UID, the same at every call."""
    assert overlay_series_uid("1.2.3", "sc") == overlay_series_uid("1.2.3", "sc")
    assert overlay_series_uid("1.2.3", "sc") != overlay_series_uid("1.2.3", "gsps")
    assert overlay_series_uid("1.2.3", "sc") != overlay_series_uid("1.2.4", "sc")


def test_a_region_from_a_box_is_a_closed_rectangle() -> None:
    """Region.from_box draws as the five corners of the box, first repeated last, its peak
    point at the centre."""
    region = Region.from_box(1, 2, 3, 4, 0.5)
    assert region.polygon().tolist() == [[1.0, 2.0], [3.0, 2.0], [3.0, 4.0], [1.0, 4.0],
                                         [1.0, 2.0]]
    assert region.peak == 0.5 and (region.peak_x, region.peak_y) == (2.0, 3.0)
    assert region.area == 4.0


def test_region_labels_cannot_be_read_as_probabilities(
    hip: tuple[pydicom.Dataset, np.ndarray],
) -> None:
    """Regions are labelled R1, R2 (rank), never with their relative saliency (1.00, 0.94)."""
    regions = [Region.from_box(10, 10, 50, 50, 1.0), Region.from_box(60, 60, 90, 90, 0.94)]
    gsps = build_presentation_state(hip[0], regions, probability=0.37,
                                    series_instance_uid=generate_uid(), model_name="m",
                                    software_version="0.1.0")
    labels = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence
              for t in a.TextObjectSequence]
    assert labels == ["AI fracture 37% (unverified), R1", "R2"]
    assert not any(re.search(r"\b[01]\.\d\d\b", label) for label in labels)
    assert "0.37" not in caption_text(0.37) and "37%" in caption_text(0.37)


def test_predict_overlay_caption_states_percentages_and_the_decision() -> None:
    """The PNG caption reads like the SR (37%, threshold 28%), not a raw 0.374 with 3 decimals."""
    from fracture_node.cli.predict_saliency import overlay_caption

    text = overlay_caption(0.37431461579215, 0.27996, "balanced")
    assert "37%" in text and "28%" in text and "fractured" in text and "UNVERIFIED" in text
    assert "0.374" not in text and "p=" not in text
    assert "normal" in overlay_caption(0.1, 0.28, "balanced")

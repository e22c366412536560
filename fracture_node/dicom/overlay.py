"""Overlay: where the model looked, as DICOM objects a PACS viewer shows beside the image.

Two kinds, per positive image, both in the study of the source image and marked as unverified AI
output (the study's patient and study attributes copied from the source header):

* :func:`build_secondary_capture`: a Secondary Capture Image (PS3.3 A.8.1), RGB, the source
  radiograph as the model read it with the heat map blended in and the regions outlined (burned
  in: Burned In Annotation YES), in its own series ``AI fracture overlay - UNVERIFIED``, with a
  Source Image Sequence naming the radiograph. Every viewer shows it; it is a picture, not a
  measurement.
* :func:`build_presentation_state`: a Grayscale Softcopy Presentation State (PS3.3 A.33.1) on the
  source image: each region a closed POLYLINE graphic (units PIXEL, PS3.3 C.10.5.1.2) in a
  graphic layer ``AI_FRACTURE``, with a text label. The radiograph is shown untouched underneath;
  viewers that support GSPS toggle it.

Both are built with highdicom (``hd.sc.SCImage``, ``hd.pr.GrayscaleSoftcopyPresentationState``).
:func:`render_overlay` draws the RGB picture (also used for the PNGs of ``predict --saliency``).
Regions are :class:`fracture_node.saliency.Region` (boxes in source pixels, drawn as their
polygons); a
heat map here is already in source-image coordinates
(:func:`fracture_node.saliency.geometry.heatmap_to_source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fracture_node.dicom.header import clean_sources
from fracture_node.dicom.wording import percent_text
from fracture_node.errors import ReportError
from fracture_node.images import FloatImage
from fracture_node.logs import get_logger
from fracture_node.saliency.geometry import Region

log = get_logger("overlay")

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI fracture overlay - UNVERIFIED"
GSPS_SERIES_NUMBER = 9903
GSPS_SERIES_DESCRIPTION = "AI fracture regions - UNVERIFIED"
GSPS_LAYER = "AI_FRACTURE"
GSPS_CONTENT_LABEL = "AI_FRACTURE"
SEND_OVERLAY_CHOICES = ("none", "sc", "gsps", "both")
"""Values of the per-destination ``overlays`` key (``fracture_node.destination.OVERLAY_CHOICES``)."""

HEAT_ALPHA = 0.45
"""Opacity of the hottest part of the heat map over the radiograph."""
HEAT_FLOOR = 0.2
"""Heat below this (fraction of the maximum) is not drawn, so the cold image stays readable."""
REGION_COLOUR = (255, 255, 0)
TEXT_COLOUR = (255, 255, 255)
DEFAULT_MAX_SIDE = 2048
"""The Secondary Capture is shrunk to this longest side (a picture for reading, not a copy)."""


def _jet(values: NDArray[np.float32]) -> NDArray[np.float32]:
    """The classic jet colour map: [0, 1] -> RGB in [0, 1] (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)
    return np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0).astype(np.float32)


def render_overlay(image: FloatImage, heatmap: NDArray[np.floating[Any]] | None,
                   regions: Sequence[Region], caption: str | None = None,
                   max_side: int | None = None) -> NDArray[np.uint8]:
    """The radiograph with the heat map blended in and the regions outlined, ``[H, W, 3]`` uint8.

    Parameters
    ----------
    image:
        The normalised grey image ``[H, W]`` in [0, 1] (what the model read).
    heatmap:
        Saliency over the same pixels ``[H, W]`` in [0, 1], or ``None`` (regions only).
    regions:
        Outlined in yellow, labelled by rank (``R1`` the hottest): never with a number that could
        be read as a probability.
    caption:
        Text written at the top left (e.g. the probability and "UNVERIFIED").
    max_side:
        Shrink the picture to this longest side (``None``: full size).
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    h, w = image.shape
    grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if heatmap is not None:
        if heatmap.shape != image.shape:
            raise ValueError(f"heat map shape {heatmap.shape} differs from image {image.shape}")
        heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
        alpha = (HEAT_ALPHA * np.clip((heat - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0.0, 1.0))[..., None]
        rgb = (1 - alpha) * rgb + alpha * _jet(heat)
    picture = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        picture = picture.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    side = max(picture.size)
    width = max(2, round(side / 300))
    font_size = max(12, round(side / 45))
    font = ImageFont.load_default(size=font_size)
    for rank, region in enumerate(regions, start=1):
        points = [(x * scale, y * scale) for x, y in region.polygon()]
        draw.line(points, fill=REGION_COLOUR, width=width, joint="curve")
        x0 = min(p[0] for p in points)
        y0 = min(p[1] for p in points)
        draw.text((x0 + width, max(0.0, y0 - font_size - width)), region_label(rank),
                  fill=REGION_COLOUR, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    if caption:
        draw.text((width * 2, width * 2), caption, fill=TEXT_COLOUR, font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return np.asarray(picture, dtype=np.uint8)


def region_label(rank: int) -> str:
    """``R1``, ``R2``...: where the model looked, hottest first (not a probability)."""
    return f"R{rank}"


def caption_text(probability: float) -> str:
    """The caption of an overlay: the image's probability as the SR states it, unverified."""
    return (f"AI fracture {percent_text(probability)} - UNVERIFIED, not for diagnosis; "
            "R1, R2: where the model looked")


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [_purpose_of_reference()]
    return item


def _purpose_of_reference() -> Dataset:
    """CID 7202 Source Image Purposes of Reference: the radiograph was processed into this."""
    code = Dataset()
    code.CodeValue = "121322"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Source image for image processing operation"
    return code


def _type2_defaults(source: Dataset) -> tuple[Dataset, str | None]:
    """A cleaned copy of the header (no pixels) with absent Type 2 patient/study attributes added
    empty, and the Specific Character Set its text needs (:func:`clean_sources`)."""
    ref = Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:
            ref.add(elem)
    (clean,), charset = clean_sources([ref])
    return clean, charset


def build_secondary_capture(
    source: Dataset,
    image: FloatImage,
    heatmap: NDArray[np.floating[Any]] | None,
    regions: Sequence[Region],
    *,
    probability: float,
    series_instance_uid: str,
    instance_number: int = 1,
    manufacturer: str = "fracture-node",
    model_name: str,
    software_version: str,
    max_side: int | None = DEFAULT_MAX_SIDE,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Secondary Capture of the radiograph with the saliency burned in.

    Parameters
    ----------
    source:
        The radiograph's header (pixels not needed; ``stop_before_pixels=True`` is enough).
    image:
        Its grey image as the model read it (:func:`fracture_node.dicom.pixels.read_pixels`).
    heatmap, regions:
        Saliency over ``image``'s pixels, or ``None``; the regions to outline.
    probability:
        The model's probability for the image, written in the caption.
    series_instance_uid:
        The overlay series of the study (one per study; keep it across report versions).
    sop_instance_uid:
        The object's UID (default: a new one); :func:`overlay_instance_uid` gives a stable one.

    Raises
    ------
    ReportError
        highdicom refused the input; the message names the study and image UIDs.
    """
    study_uid = str(source.get("StudyInstanceUID", ""))
    if image.shape != (int(source.Rows), int(source.Columns)):
        raise ReportError(
            f"overlay for image {source.SOPInstanceUID} of study {study_uid}: the grey image "
            f"{image.shape} does not match Rows x Columns {source.Rows} x {source.Columns}")
    caption = caption_text(probability)
    pixels = render_overlay(image, heatmap, regions, caption, max_side=max_side)
    orientation = _orientation(source)
    header, charset = _type2_defaults(source)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            # highdicom wants one in the patient coordinate system; a source without one gets
            # the Type 2 attribute empty below.
            patient_orientation=orientation or ("L", "F"),
            laterality=None,
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(
            f"the overlay Secondary Capture of image {source.SOPInstanceUID} (study "
            f"{study_uid}) could not be built: {exc}") from exc
    if orientation is None:
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    _copy_from_source(sc, header, charset)
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"{model_name} saliency heat map and regions over the radiograph; unverified AI output")
    sc.ManufacturerModelName = model_name
    sc.SoftwareVersions = software_version
    sc.SourceImageSequence = [_source_reference(source)]
    log.info("overlay_sc_built", study_instance_uid=study_uid,
             source_sop_instance_uid=str(source.SOPInstanceUID),
             sop_instance_uid=str(sc.SOPInstanceUID), regions=len(regions))
    return sc


def _copy_from_source(ds: Dataset, source: Dataset, charset: str | None) -> None:
    """Specific Character Set of the copied (cleaned) text, and General Series Laterality.

    Laterality is Type 2C (PS3.3 C.7.3.1): the source's, else present and empty, since the
    condition (a paired body part without Image Laterality) cannot be judged from every header.
    """
    if charset:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    value = source.get("Laterality") or source.get("ImageLaterality")
    ds.Laterality = value if value in ("R", "L") else None


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    return None


def build_presentation_state(
    source: Dataset,
    regions: Sequence[Region],
    *,
    probability: float,
    series_instance_uid: str,
    instance_number: int = 1,
    manufacturer: str = "fracture-node",
    model_name: str,
    software_version: str,
    device_serial_number: str = "",
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Grayscale Softcopy Presentation State outlining the regions on the radiograph.

    Parameters
    ----------
    source:
        The radiograph's header (Rows, Columns, UIDs, patient/study attributes).
    regions:
        Polygons in the radiograph's pixels (PIXEL units, PS3.3 C.10.5.1.2: the top-left corner
        of the first pixel is 0\\0).
    probability:
        Written in the label of the first region.
    series_instance_uid:
        The presentation-state series of the study.
    sop_instance_uid:
        The object's UID (default: a new one); :func:`overlay_instance_uid` gives a stable one.

    Raises
    ------
    ReportError
        No region, or highdicom refused the input.
    """
    study_uid = str(source.get("StudyInstanceUID", ""))
    if not regions:
        raise ReportError(f"the presentation state for image {source.SOPInstanceUID} of study "
                          f"{study_uid} needs at least one region")
    header, charset = _type2_defaults(source)
    try:
        layer = hd.pr.GraphicLayer(layer_name=GSPS_LAYER, order=1,
                                   description="AI fracture saliency regions (unverified)")
        graphics = [
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=r.polygon(),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
            for r in regions
        ]
        texts = []
        for k, r in enumerate(regions):
            label = (f"AI fracture {percent_text(probability)} (unverified), "
                     f"{region_label(k + 1)}" if k == 0 else region_label(k + 1))
            anchor = (r.x0, max(0.0, r.y0 - 1.0))
            texts.append(hd.pr.TextObject(
                text_value=label,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=anchor,
            ))
        annotation = hd.pr.GraphicAnnotation(
            referenced_images=[header], graphic_layer=layer, graphic_objects=graphics,
            text_objects=texts,
        )
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[header],
            series_instance_uid=series_instance_uid,
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=model_name,
            software_versions=software_version,
            device_serial_number=device_serial_number or "0",
            content_label=GSPS_CONTENT_LABEL,
            content_description="AI fracture saliency - UNVERIFIED",
            graphic_annotations=[annotation],
            graphic_layers=[layer],
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(
            f"the presentation state of image {source.SOPInstanceUID} (study {study_uid}) "
            f"could not be built: {exc}") from exc
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    _copy_from_source(gsps, header, charset)
    log.info("overlay_gsps_built", study_instance_uid=study_uid,
             source_sop_instance_uid=str(source.SOPInstanceUID),
             sop_instance_uid=str(gsps.SOPInstanceUID), regions=len(regions))
    return gsps


def overlay_series_uid(study_instance_uid: str, kind: str) -> str:
    """The Series Instance UID of a study's overlay series (``sc`` or ``gsps``).

    Derived from the study UID, so every report version of the study puts its overlays in the
    same series without storing the UID anywhere.
    """
    if kind not in ("sc", "gsps"):
        raise ValueError(f"overlay kind {kind!r} is not sc or gsps")
    return str(generate_uid(entropy_srcs=["fracture-node overlay", kind, study_instance_uid]))


def overlay_instance_uid(kind: str, source_sop_instance_uid: str, content_key: str) -> str:
    """A stable SOP Instance UID for an overlay of one image (``sc`` or ``gsps``).

    ``content_key`` identifies what the overlay shows (e.g. the result row it is drawn from):
    every report version that shows the same result lists the same object (sent once to each
    destination), instead of piling up copies in the overlay series.
    """
    if kind not in ("sc", "gsps"):
        raise ValueError(f"overlay kind {kind!r} is not sc or gsps")
    return str(generate_uid(entropy_srcs=["fracture-node overlay instance", kind,
                                          source_sop_instance_uid, content_key]))

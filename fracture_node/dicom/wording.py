"""Wording: the numbers and reasons of a report as a radiologist reads them.

Probabilities are percentages with two significant digits (three from 99.5%, never a false 0 or
100), a decision is a sentence that names the threshold and the operating point, a reason code is
a phrase, an image is named by modality, series and instance number (never by patient data).
Used by the SR (:mod:`fracture_node.dicom.report`) and the overlays
(:mod:`fracture_node.dicom.overlay`).
"""

from __future__ import annotations

import math

import pydicom

NOT_FOR_DIAGNOSIS = "AI result, not verified, not for diagnosis."
"""The first sentence a viewer renders (a TEXT in the Qualitative Evaluations container)."""

REASONS = {
    "out_of_scope_modality": "not a projection radiograph (the model reads CR and DX only)",
    "out_of_scope_body_part": "body part outside what the model was trained on",
    "too_small": "image too small to be a radiograph the model was trained on",
    "blank_image": "a blank image (every pixel has the same grey level)",
    "multi_frame": "a multi-frame object (the model reads single images)",
    "colour": "a colour image (the model reads grey-level radiographs)",
    "no_pixel_data": "the object carries no image",
    "bad_dimensions": "image size or shape implausible for a radiograph",
    "bad_pixel_format": "pixel encoding not supported",
    "bad_header": "the header could not be read",
    "unsupported_transfer_syntax": "compression that this node cannot decode",
    "undecodable": "the pixel data could not be decoded",
    "not_dicom": "the file is not readable DICOM",
    "spool_file_missing": "the received file is missing on this node",
    "failed": "processing failed repeatedly",
}
"""Reason codes (``NotProcessable.reason`` and SQL states) in words for the report."""

OPERATING_POINTS = {
    "balanced": "balanced operating point",
    "high_sensitivity": "high-sensitivity operating point",
    "high_specificity": "high-specificity operating point",
}

def percent(probability: float) -> float:
    """A probability as a percentage to two significant digits (three from 99.5%).

    ``0.37431`` -> 37.0, ``0.0772`` -> 7.7, ``0.00521`` -> 0.52, ``0.9971`` -> 99.7; never 100
    or 0 unless the probability is exactly 1 or 0.
    """
    value = 100.0 * float(probability)
    if value <= 0.0 or value >= 100.0:
        return round(value)
    digits = 3 if value >= 99.5 else 2
    rounded = round(value, digits - 1 - math.floor(math.log10(value)))
    if rounded >= 100.0:  # 99.96 -> 99.96, not 100
        rounded = math.floor(value * 100) / 100
    return float(rounded)


def percent_text(probability: float) -> str:
    """:func:`percent` as text: ``37%``, ``7.7%``, ``0.52%``."""
    return f"{percent(probability):g}%"


def operating_point_text(operating_point: str) -> str:
    """The operating point in words (a number or an unknown name: "configured")."""
    return OPERATING_POINTS.get(operating_point, "configured operating point")


def decision_text(probability: float, positive: bool, threshold: float,
                  operating_point: str) -> str:
    """``suspected fracture: 37%, above the 22% decision threshold of the balanced ...``."""
    where = "at or above" if positive else "below"
    verdict = "suspected fracture" if positive else "no fracture suspected"
    return (f"{verdict}: {percent_text(probability)}, {where} the "
            f"{percent_text(threshold)} decision threshold of the "
            f"{operating_point_text(operating_point)}")


def reason_text(reason: str) -> str:
    """A reason code in words (an unknown code is shown as it is)."""
    return REASONS.get(reason, reason.replace("_", " "))


def describe_image(header: pydicom.Dataset | None) -> str:
    """``CR HIP, series 3, image 2`` from the (cleaned) header: modality, Body Part Examined
    (``body part not stated`` when empty), series and instance number; no patient data."""
    if header is None:
        return "image"
    modality = str(header.get("Modality", "") or "").strip() or "image"
    part = str(header.get("BodyPartExamined", "") or "").strip()
    parts = [f"{modality} {part}" if part else f"{modality}, body part not stated"]
    for keyword, label in (("SeriesNumber", "series"), ("InstanceNumber", "image")):
        value = header.get(keyword)
        if value not in (None, ""):
            parts.append(f"{label} {value}")
    return ", ".join(parts)



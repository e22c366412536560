"""What the console shows from the files a study left: header fields and saliency overlays.

Read at request time from the spool (never stored in SQL): the accession number always, the
patient's name and ID only when ``[http] show_patient_data`` allows it. A file that retention
already deleted gives nothing (the SQL rows stay).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from PIL import Image

from fracture_node.errors import FractureNodeError, NoPicture

OVERLAY_MAX_SIDE = 768


def header_fields(path: Path, patient: bool) -> dict[str, str]:
    """``accession_number`` (and ``patient_name``, ``patient_id`` when ``patient``) from the
    header of a spooled file; empty when the file is gone or unreadable."""
    tags = ["AccessionNumber"] + (["PatientName", "PatientID"] if patient else [])
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except Exception:  # a purged or damaged file: show the UIDs only
        return {}
    out = {"accession_number": str(ds.get("AccessionNumber", "") or "")}
    if patient:
        out["patient_name"] = str(ds.get("PatientName", "") or "")
        out["patient_id"] = str(ds.get("PatientID", "") or "")
    return out


def overlay_png(path: Path, saliency_json: str | None, probability: float | None,
                regions_shown: bool = True) -> bytes:
    """The radiograph with the model's heat map and regions drawn in, as a PNG (the same drawing
    as the Secondary Capture overlay, shrunk for the screen); without the regions when not
    ``regions_shown`` (a negative image under ``[saliency] positive_only``, as in the SR)."""
    from fracture_node.dicom.overlay import caption_text, render_overlay
    from fracture_node.dicom.pixels import read_pixels
    from fracture_node.saliency import SaliencyRecord

    if not saliency_json:
        raise NoPicture("this image has no saliency record (saliency off, or not scored)")
    if not path.is_file():
        raise NoPicture("the image's spool file was deleted by retention")
    try:
        record = SaliencyRecord.from_json(saliency_json)
        image = read_pixels(pydicom.dcmread(path, force=True))
        picture = render_overlay(image, record.source_map(),
                                 record.regions if regions_shown else (),
                                 caption_text(probability) if probability is not None else None,
                                 max_side=OVERLAY_MAX_SIDE)
    except (ValueError, KeyError, OSError, FractureNodeError) as exc:
        raise NoPicture(f"the overlay cannot be drawn ({type(exc).__name__})") from exc
    out = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(out, format="PNG")
    return out.getvalue()

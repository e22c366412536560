"""Scope: is this radiograph of the kind the model was trained on? (header only, no pixels)

:func:`fracture_node.dicom.pixels.check_scope` refuses what is not a single grey projection
radiograph (CT, MR, XA, MG, colour, multi-frame...). This module narrows that to what the model
learned, so that the report never speaks about what the model never saw (``[scope]`` in the
configuration, ``docs/conformance.md``):

* ``too_small``: a side shorter than ``[scope] min_side`` pixels (default 64): a thumbnail or an
  icon, not a radiograph of the trained kind (the training images are 300-3000 px a side).
* ``out_of_scope_body_part``: the body part is not in ``[scope] body_parts`` (default: the limb
  regions of the training data, :data:`fracture_node.config.TRAINED_BODY_PARTS`). It is read from
  Body Part Examined (0018,0015); when that is empty or absent, from the words of Study
  Description, Series Description and Protocol Name: a word naming a trained region admits the
  image, one naming another region (chest, skull, spine, abdomen, teeth...) refuses it. When
  nothing names a body part, ``[scope] unknown_body_part`` decides (default ``assess``).

Both raise :class:`~fracture_node.errors.NotProcessable`; the worker records the reason, the
image is "not assessed" in the report and never gets a probability.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from fracture_node.config import ScopeConfig
from fracture_node.errors import NotProcessable

OTHER_REGIONS = frozenset({
    "CHEST", "THORAX", "LUNG", "LUNGS", "RIB", "RIBS", "STERNUM", "HEART", "SKULL", "HEAD",
    "BRAIN", "FACE", "SINUS", "SINUSES", "ORBIT", "MANDIBLE", "JAW", "TEETH", "TOOTH", "DENTAL",
    "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CERVICAL", "THORACIC", "LUMBAR",
    "SACRUM", "COCCYX", "ABDOMEN", "ABDOMINAL", "KUB", "BREAST", "MAMMO",
})
"""Words (Body Part Examined terms and common description words) of untrained regions."""

_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^A-Z]+", text.upper()) if w}


def body_part(ds: Dataset, allowed: frozenset[str]) -> tuple[str, str]:
    """``(verdict, source)``: verdict ``in``, ``out`` or ``unknown``; source the attribute."""
    examined = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if examined:
        if examined in allowed or _words(examined) & allowed and not (
                _words(examined) & OTHER_REGIONS):
            return "in", "BodyPartExamined"
        return "out", "BodyPartExamined"
    words: set[str] = set()
    for keyword in _DESCRIPTIONS:
        words |= _words(str(ds.get(keyword, "") or ""))
    single = {p for p in allowed if " " not in p}
    inside, outside = bool(words & single), bool(words & OTHER_REGIONS)
    if inside and not outside:
        return "in", "description"
    if outside and not inside:
        return "out", "description"
    return "unknown", "description" if inside else "none"


def check_anatomy(ds: Dataset, scope: ScopeConfig) -> None:
    """Refuse an image outside what the model was trained on (see the module docstring).

    Raises
    ------
    NotProcessable
        ``too_small`` or ``out_of_scope_body_part``; the message names the SOP Instance UID and
        the attribute that decided, never its text (a description can hold patient data).
    """
    uid = str(ds.get("SOPInstanceUID", "") or "?")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is not None and cols is not None and min(int(rows), int(cols)) < scope.min_side:
        raise NotProcessable("too_small", f"SOP Instance UID {uid}: {rows} x {cols} pixels is "
                             f"smaller than [scope] min_side = {scope.min_side}")
    allowed = frozenset(p.strip().upper() for p in scope.body_parts)
    verdict, source = body_part(ds, allowed)
    if verdict == "out" or (verdict == "unknown" and scope.unknown_body_part == "not_assessed"):
        what = ("no body part is named" if verdict == "unknown"
                else f"the body part ({source}) is not in [scope] body_parts")
        raise NotProcessable("out_of_scope_body_part", f"SOP Instance UID {uid}: {what}")

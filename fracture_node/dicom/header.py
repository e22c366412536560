"""Header: the values we copy from a received header into our own objects, checked and cleaned.

highdicom copies the Patient and General Study attributes of the first source into an SR (and
its acquisition equipment into the Contributing Equipment Sequence); the overlays copy the same.
Senders get these wrong in ways that must not break our objects or make them invalid:

* a date, time or age in a foreign form (``1984-03-12``, ``10:30``) or garbage: a date or time in
  a known foreign form is rewritten in the DICOM form (PS3.5 6.2: DA ``YYYYMMDD``, TM
  ``HHMMSS.FFFFFF``); anything else is left empty (all are Type 2 or 3 there);
* a number (IS, DS) that is not one, an age (AS) or a code string (CS) that breaks its VR, a
  Patient's Sex other than M, F or O: emptied;
* text longer than its VR allows (PS3.5 Table 6.2-1): cut to the maximum;
* more values than the attribute's Value Multiplicity allows (PS3.6), most often a backslash in
  a name: the first values are kept; a person name with more than three component groups or
  five components in a group (PS3.5 6.2): the extra ones are dropped;
* text with bytes outside the declared character set, most often Cyrillic, Greek or Latin-1 names
  sent without Specific Character Set (0008,0005), which PS3.5 6.1.2.2 then reads as ASCII: bytes
  that are valid UTF-8 are taken as UTF-8 (the usual mistake); other non-ASCII bytes become ``?``.
  Text that is not ASCII after this is written in UTF-8 (``ISO_IR 192``).

Every change is logged with the tag and the kind of change, never the value (it is patient data).
The sources themselves are never changed: :func:`clean_sources` works on copies.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Sequence

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from fracture_node.logs import get_logger

log = get_logger("header")

TYPE2_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)
"""Type 2 Patient/General Study attributes that highdicom reads from the first source."""

UTF8 = "ISO_IR 192"

_MAX_CHARS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240,
              "UC": 65535, "UT": 1 << 20}
"""Maximum length in characters (PN: per component group)."""
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN", "UC", "UT"})
_DA = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_IS = re.compile(r"^\s*[+-]?\d{1,12}\s*$")
_DS = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_CS = re.compile(r"^[A-Z0-9_ ]{0,16}$")


def clean_sources(sources: Sequence[Dataset]) -> tuple[list[Dataset], str | None]:
    """Cleaned copies of ``sources`` and the Specific Character Set their text needs.

    The first copy also gets the absent Type 2 attributes of :data:`TYPE2_FROM_SOURCE` (empty):
    highdicom copies them from the first source, and PS3.3 wants them present.

    Returns
    -------
    (list of pydicom.Dataset, str or None)
        The copies, and ``"ISO_IR 192"`` when a copied text value is not ASCII, else ``None``
        (the default repertoire). The copies' text is Python ``str``; write them in that set.
    """
    cleaned: list[Dataset] = []
    needs_utf8 = False
    for index, source in enumerate(sources):
        ds = copy.deepcopy(source)
        if index == 0:
            for keyword in TYPE2_FROM_SOURCE:
                if keyword not in ds:
                    setattr(ds, keyword, None)
        needs_utf8 |= clean_dataset(ds, str(source.get("SOPInstanceUID", "")))
        cleaned.append(ds)
    return cleaned, (UTF8 if needs_utf8 else None)


def clean_dataset(ds: Dataset, uid: str, charsets: list[str] | None = None) -> bool:
    """Clean ``ds`` in place (sequences too); True when some text is not ASCII."""
    if charsets is None:
        charsets = _charsets(ds)
    non_ascii = False
    for elem in list(ds):
        tag = elem.tag
        if tag.group in (0x0002, 0x7FE0) or tag.is_private or tag == 0x00080005:
            continue
        try:
            elem = ds[tag]  # converts a RawDataElement with the dataset's character set
        except Exception:  # a value pydicom cannot even convert: drop it
            _drop(ds, tag, uid, "unreadable value removed")
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                non_ascii |= clean_dataset(item, uid, charsets)
            continue
        try:
            non_ascii |= _clean_element(ds, elem, uid, charsets)
        except Exception:  # pydicom refused the cleaned value too: cleaning never fails
            _drop(ds, tag, uid, "value that could not be cleaned removed")
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet  # the writer's set applies to our copy
    return non_ascii


def _drop(ds: Dataset, tag: BaseTag, uid: str, what: str) -> None:
    """Remove an element; one of :data:`TYPE2_FROM_SOURCE` is left present and empty."""
    keyword = pydicom.datadict.keyword_for_tag(tag)
    del ds[tag]
    if keyword in TYPE2_FROM_SOURCE:
        setattr(ds, keyword, None)
    _changed(uid, tag, what)


def _charsets(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet")
    if not value:
        return []
    return [str(v) for v in (value if isinstance(value, list | pydicom.multival.MultiValue)
                             else [value])]


def _changed(uid: str, tag: object, what: str) -> None:
    log.warning("source_value_cleaned", sop_instance_uid=uid, tag=str(tag), change=what)


def _clean_element(ds: Dataset, elem: DataElement, uid: str, charsets: list[str]) -> bool:
    vr = elem.VR
    value = elem.value
    if value is None or value == "" or (isinstance(value, bytes) and not value):
        return False
    _limit_multiplicity(elem, uid)
    if vr == "DA":
        _set_checked(ds, elem, uid, _fix_date)
    elif vr == "TM":
        _set_checked(ds, elem, uid, _fix_time)
    elif vr == "AS":
        _set_checked(ds, elem, uid, lambda v: v if _AS.match(v) else None)
    elif vr == "IS":
        _set_checked(ds, elem, uid, lambda v: v.strip() if _IS.match(v) else None)
    elif vr == "DS":
        _set_checked(ds, elem, uid, lambda v: v.strip() if _DS.match(v) and len(v) <= 16
                     else None)
    elif vr == "CS":
        checker = (lambda v: v if v in ("M", "F", "O") else None) \
            if elem.keyword == "PatientSex" else (lambda v: v if _CS.match(v) else None)
        _set_checked(ds, elem, uid, checker)
    elif vr in _TEXT_VRS:
        return _clean_text(elem, uid, charsets)
    return False


def _max_values(tag: BaseTag) -> int | None:
    """The most values PS3.6 allows for ``tag`` (None: no limit or not in the dictionary)."""
    try:
        vm = pydicom.datadict.dictionary_VM(tag)
    except KeyError:
        return None
    top = vm.split("-")[-1]
    return int(top) if top.isdigit() else None


def _limit_multiplicity(elem: DataElement, uid: str) -> None:
    if not isinstance(elem.value, list | pydicom.multival.MultiValue):
        return
    most = _max_values(elem.tag)
    if most is None or len(elem.value) <= most:
        return
    kept = list(elem.value)[:most]
    elem.value = kept[0] if most == 1 else kept
    _changed(uid, elem.tag, f"more values than its multiplicity ({most}) allows: first kept")


def _person_name(text: str) -> tuple[str, bool]:
    """``text`` with at most 3 component groups of at most 5 components; True if changed."""
    groups = text.split("=")[:3]
    groups = ["^".join(g.split("^")[:5]) for g in groups]
    fixed = "=".join(groups)
    return fixed, fixed != text


def _set_checked(ds: Dataset, elem: DataElement, uid: str, fix: object) -> None:
    values = _strings(elem.value)
    fixed = [fix(v) for v in values]  # type: ignore[operator]
    if fixed == values:
        return
    kept = [v for v in fixed if v is not None]
    elem.value = (kept[0] if len(kept) == 1 else kept) if kept else None
    _changed(uid, elem.tag, f"{elem.VR} value not valid: "
                            + ("rewritten" if kept and len(kept) == len(values) else "emptied"))


def _strings(value: object) -> list[str]:
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.decode("ascii", errors="replace")]
    return [str(value)]


def _fix_date(value: str) -> str | None:
    match = _DA.match(value.strip())
    if not match:
        return None
    text = "".join(match.groups())
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return None
    return text


def _fix_time(value: str) -> str | None:
    match = _TM.match(value.strip())
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    return hh + (mm or "") + (ss or "") + (frac or "")


def _clean_text(elem: DataElement, uid: str, charsets: list[str]) -> bool:
    values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) \
        else [elem.value]
    out: list[object] = []
    changed: set[str] = set()
    for v in values:
        text = str(v) if not isinstance(v, bytes) else v.decode("latin-1")
        original = text
        if not charsets and not text.isascii():
            # PS3.5 6.1.2.2: no Specific Character Set means ASCII; pydicom read the bytes as
            # Latin-1, which gives them back unchanged.
            raw = text.encode("latin-1", errors="replace")
            try:
                text = raw.decode("utf-8")
                changed.add("undeclared bytes read as UTF-8")
            except UnicodeDecodeError:
                text = raw.decode("ascii", errors="replace").replace("\ufffd", "?")
                changed.add("undeclared non-ASCII bytes replaced by ?")
        text = "".join(c for c in text if c.isprintable() or c in "\r\n\t\f")
        if not changed and text != original:
            changed.add("control characters removed")
        limit = _MAX_CHARS.get(elem.VR)
        if elem.VR == "PN":
            text, reshaped = _person_name(text)
            if reshaped:
                changed.add("extra name components dropped")
            groups = text.split("=")
            cut = [g[:limit] for g in groups] if limit else groups
            if cut != groups:
                changed.add("cut to the VR's length")
            out.append(PersonName("=".join(cut)))
            continue
        if limit and len(text) > limit:
            text = text[:limit]
            changed.add("cut to the VR's length")
        out.append(text)
    if changed:
        elem.value = out[0] if len(out) == 1 else out
        _changed(uid, elem.tag, "; ".join(sorted(changed)))
    return any(not str(v).isascii() for v in out)

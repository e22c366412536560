"""clean_sources: values copied from received headers into our objects are made valid."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from fracture_node.dicom.header import UTF8, clean_sources


@pytest.fixture
def hip(samples_dir: Path) -> pydicom.Dataset:
    return pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)


@pytest.mark.parametrize(("value", "expected"), [
    ("1984-03-12", "19840312"), ("1984.03.12", "19840312"), ("19840312", "19840312"),
    ("garbage!", ""), ("19841399", ""), ("84-03-12", ""),
])
def test_birth_date_is_fixed_or_emptied(hip: pydicom.Dataset, value: str, expected: str) -> None:
    """A date in a foreign form is rewritten as YYYYMMDD; anything else is left empty."""
    hip.PatientBirthDate = value
    (clean,), _ = clean_sources([hip])
    assert (clean.PatientBirthDate or "") == expected
    assert hip.PatientBirthDate == value  # the source is not touched


@pytest.mark.parametrize(("value", "expected"), [
    ("10:30", "1030"), ("10:30:15.5", "103015.5"), ("103015", "103015"), ("25:00", ""),
    ("noon", ""),
])
def test_study_time_is_fixed_or_emptied(hip: pydicom.Dataset, value: str, expected: str) -> None:
    """A time with colons is rewritten as HHMMSS; an impossible one is left empty."""
    hip.StudyTime = value
    (clean,), _ = clean_sources([hip])
    assert (clean.StudyTime or "") == expected


def test_invalid_sex_age_and_overlong_text_are_cleaned(hip: pydicom.Dataset) -> None:
    """Patient's Sex X and age 'forty' are emptied; a 40-character SH is cut to 16."""
    hip.PatientSex = "X"
    hip.PatientAge = "forty"
    hip.AccessionNumber = "A" * 40
    (clean,), charset = clean_sources([hip])
    assert not clean.PatientSex and not clean.PatientAge
    assert clean.AccessionNumber == "A" * 16
    assert charset is None


def test_undeclared_cyrillic_bytes_become_question_marks(samples_dir: Path) -> None:
    """The DX sample's cp1251 names without Specific Character Set turn into ASCII."""
    dx = pydicom.dcmread(samples_dir / "DX_J2KR_1416x1420_u16.dcm", stop_before_pixels=True)
    assert "SpecificCharacterSet" not in dx
    (clean,), charset = clean_sources([dx])
    assert clean.InstitutionName.isascii() and "?" in clean.InstitutionName
    assert clean.Manufacturer.endswith("(JSC Rentgenprom)")
    assert charset is None


def test_undeclared_utf8_is_read_as_utf8(hip: pydicom.Dataset, tmp_path: Path) -> None:
    """UTF-8 bytes sent without a character set are kept as text and need ISO_IR 192."""
    hip.InstitutionName = "x"
    hip["InstitutionName"].value = "Городская больница".encode()
    hip.save_as(tmp_path / "utf8.dcm")
    back = pydicom.dcmread(tmp_path / "utf8.dcm", stop_before_pixels=True)
    (clean,), charset = clean_sources([back])
    assert clean.InstitutionName == "Городская больница"
    assert charset == UTF8
    assert "SpecificCharacterSet" not in clean


def test_declared_character_set_is_decoded_and_kept(hip: pydicom.Dataset, tmp_path: Path) -> None:
    """A name declared as ISO_IR 144 (Cyrillic) is read right and written in UTF-8."""
    hip.SpecificCharacterSet = "ISO_IR 144"
    hip.PatientName = "Иванов^Иван"
    hip.save_as(tmp_path / "cyr.dcm")
    back = pydicom.dcmread(tmp_path / "cyr.dcm", stop_before_pixels=True)
    (clean,), charset = clean_sources([back])
    assert str(clean.PatientName) == "Иванов^Иван"
    assert charset == UTF8


def test_the_log_names_the_tag_never_the_value(hip: pydicom.Dataset) -> None:
    """A cleaned value is logged with its tag and the kind of change, not the value."""
    hip.PatientBirthDate = "1984-03-12"
    with capture_logs() as logs:
        clean_sources([copy.deepcopy(hip)])
    (event,) = [e for e in logs if e["event"] == "source_value_cleaned"]
    assert event["tag"] == "(0010,0030)"
    assert "1984" not in repr(event)
    assert str(hip.PatientName) not in repr(event)


def test_absent_type2_attributes_are_added_empty_to_the_first(samples_dir: Path) -> None:
    """The first copy gets Patient ID, Study Date... empty when the source lacks them."""
    ds = pydicom.dcmread(samples_dir / "CR_chest_MONO1_implicitVR_nometa.dcm",
                         stop_before_pixels=True, force=True)
    (clean,), _ = clean_sources([ds])
    for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "StudyID"):
        assert keyword in clean and not clean[keyword].value
    assert "PatientID" not in ds


@pytest.mark.parametrize(("keyword", "value", "expected"), [
    ("PatientName", "Doe^John\\Roe^Jane", "Doe^John"),
    ("ReferringPhysicianName", "A^B\\C^D\\E", "A^B"),
    ("PatientID", "12345\\67890", "12345"),
    ("AccessionNumber", "A1\\A2", "A1"),
    ("StudyDate", "20200101\\20200102", "20200101"),
])
def test_more_values_than_the_multiplicity_allows_keep_the_first(
        hip: pydicom.Dataset, keyword: str, value: str, expected: str) -> None:
    """A backslash in a VM 1 attribute (PS3.6) leaves one value: highdicom refuses a list."""
    setattr(hip, keyword, value)
    with capture_logs() as events:
        (clean,), _ = clean_sources([hip])
    assert str(clean[keyword].value) == expected
    assert not isinstance(clean[keyword].value, pydicom.multival.MultiValue)
    assert any("multiplicity" in e.get("change", "") for e in events)


def test_multi_valued_attributes_keep_their_values(hip: pydicom.Dataset) -> None:
    """Image Type (VM 2-n) and Other Patient IDs (VM 1) with one value are left alone."""
    hip.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    (clean,), _ = clean_sources([hip])
    assert list(clean.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]


def test_person_name_with_too_many_groups_or_components_is_trimmed(
        hip: pydicom.Dataset) -> None:
    """PS3.5 6.2: at most three component groups of five components each."""
    hip.PatientName = "A^B^C^D^E^F^G=Alpha=Beta=Gamma=Delta"
    (clean,), _ = clean_sources([hip])
    assert str(clean.PatientName) == "A^B^C^D^E=Alpha=Beta"


def test_a_value_pydicom_refuses_after_cleaning_is_removed_not_raised(
        hip: pydicom.Dataset) -> None:
    """A Patient's Weight of two non-numbers (read leniently) cannot be cut to one DS value:
    it is removed and logged, and cleaning goes on; a bad Type 2 value stays present, empty."""
    for keyword, raw in (("PatientWeight", b"====\\===="), ("PatientName", b"A^B\\C^D")):
        tag = pydicom.tag.Tag(keyword)
        vr = pydicom.datadict.dictionary_VR(tag)
        hip[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(raw), raw, 0, True, True)
    with capture_logs() as events:
        (clean,), _ = clean_sources([hip])
    assert "PatientWeight" not in clean
    assert str(clean.PatientName) == "A^B"
    assert any(e["tag"] == "(0010,1030)" and "removed" in e["change"] for e in events)

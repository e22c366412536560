"""check_anatomy: only radiographs of the trained kind are scored; the rest is not assessed."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest

from fracture_node.config import ScopeConfig
from fracture_node.dicom.pixels import check_scope
from fracture_node.dicom.scope import check_anatomy
from fracture_node.errors import ConfigError, NotProcessable

EXPECTED = {
    "CR_JPLL_ModalityLUTSequence.dcm": "out_of_scope_body_part",  # "MODALITYLUT - TEETH"
    "CR_chest_MONO1_implicitVR_nometa.dcm": "out_of_scope_body_part",
    "CR_chest_RG1_J2KI.dcm": "out_of_scope_body_part",
    "CR_cspine_tiny16x16_explicitVR.dcm": "too_small",
    "CR_extremity_RG3_J2KR.dcm": "assess",
    "CR_hand_J2KR_Kakadu_SOTmarker.dcm": "assess",
    "CR_hip_RG2_JLSL.dcm": "assess",
    "DX_J2KR_1416x1420_u16.dcm": "assess",  # no body part named anywhere: the default assesses
    "DX_chest_J2KR_966_fixed.dcm": "out_of_scope_body_part",
    "MG_JPLL_overlay.dcm": "out_of_scope_modality",
    "XA_JPEGbaseline_multiframe.dcm": "out_of_scope_modality",
    "negative_controls/CT_small.dcm": "out_of_scope_modality",
}


def verdict(ds: pydicom.Dataset, scope: ScopeConfig | None = None) -> str:
    try:
        check_scope(ds)
        check_anatomy(ds, scope or ScopeConfig())
    except NotProcessable as exc:
        return exc.reason
    return "assess"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_gets_its_scope_verdict(samples_dir: Path, name: str) -> None:
    """Chest, teeth and the 16 x 16 image are not assessed; the limb radiographs are."""
    ds = pydicom.dcmread(samples_dir / name, stop_before_pixels=True, force=True)
    assert verdict(ds) == EXPECTED[name]


@pytest.fixture
def hip(samples_dir: Path) -> pydicom.Dataset:
    return pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)


def test_the_description_decides_when_body_part_is_empty(hip: pydicom.Dataset) -> None:
    """Without Body Part Examined, 'XR CHEST PA' refuses and 'Wrist 2 views' admits."""
    hip.BodyPartExamined = ""
    hip.StudyDescription = "XR CHEST PA"
    assert verdict(hip) == "out_of_scope_body_part"
    hip.StudyDescription = "Wrist 2 views"
    assert verdict(hip) == "assess"


def test_unknown_body_part_follows_the_configuration(hip: pydicom.Dataset) -> None:
    """Nothing names a body part: assessed by default, not assessed when configured so."""
    hip.BodyPartExamined = ""
    hip.StudyDescription = ""
    assert verdict(hip) == "assess"
    strict = ScopeConfig(unknown_body_part="not_assessed")
    assert verdict(hip, strict) == "out_of_scope_body_part"


def test_the_allow_list_is_configurable(hip: pydicom.Dataset) -> None:
    """A site that allows only hands refuses the hip; allowing CHEST admits a chest."""
    assert verdict(hip, ScopeConfig(body_parts=("HAND",))) == "out_of_scope_body_part"
    chest = copy.deepcopy(hip)
    chest.BodyPartExamined = "CHEST"
    assert verdict(chest, ScopeConfig(body_parts=("CHEST",))) == "assess"


def test_min_side_is_configurable(samples_dir: Path) -> None:
    """The 16 x 16 image is too small at the default 64 and assessed at min_side 16."""
    ds = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm",
                         stop_before_pixels=True)
    ds.BodyPartExamined = "HAND"
    assert verdict(ds) == "too_small"
    assert verdict(ds, ScopeConfig(min_side=16)) == "assess"


def test_the_message_never_quotes_a_description(hip: pydicom.Dataset) -> None:
    """The refusal names the UID and the attribute, not the text (it can hold patient data)."""
    hip.BodyPartExamined = ""
    hip.StudyDescription = "CHEST for Mrs Smith"
    with pytest.raises(NotProcessable) as caught:
        check_anatomy(hip, ScopeConfig())
    assert "Smith" not in str(caught.value) and hip.SOPInstanceUID in str(caught.value)


@pytest.mark.parametrize("bad", [
    {"unknown_body_part": "maybe"}, {"min_side": 2}, {"body_parts": ()}, {"body_parts": (" ",)},
])
def test_bad_scope_settings_are_refused(bad: dict[str, object]) -> None:
    """An unknown policy, an absurd minimum side or an empty list is a ConfigError."""
    with pytest.raises(ConfigError, match=r"\[scope\]"):
        ScopeConfig(**bad).validate()  # type: ignore[arg-type]

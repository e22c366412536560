"""fracture_node.dicom.pixels on the shared DICOM samples: scope, decoding, polarity, VOI."""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from structlog.testing import capture_logs

from fracture_node import images
from fracture_node.dicom import pixels
from fracture_node.errors import NotProcessable

RADIOGRAPHS = [
    "CR_JPLL_ModalityLUTSequence.dcm",
    "CR_chest_MONO1_implicitVR_nometa.dcm",
    "CR_chest_RG1_J2KI.dcm",
    "CR_chest_RG1_JLSN.dcm",
    "CR_cspine_tiny16x16_explicitVR.dcm",
    "CR_extremity_RG3_J2KI.dcm",
    "CR_extremity_RG3_J2KR.dcm",
    "CR_hand_J2KR_Kakadu_SOTmarker.dcm",
    "CR_hip_RG2_JLSL.dcm",
    "CR_hip_RG2_JLSN.dcm",
    "CR_hip_RG2_JPLL.dcm",
    "CR_hip_RG2_JPLY_fixed.dcm",
    "DX_J2KR_1416x1420_u16.dcm",
    "DX_chest_J2KR_966_fixed.dcm",
    "derived/CR_hip_RG2_RLE.dcm",
    "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm",
]
OUT_OF_SCOPE = [
    ("MG_JPLL_overlay.dcm", "out_of_scope_modality"),
    ("XA_JPEGbaseline_multiframe.dcm", "out_of_scope_modality"),
    ("negative_controls/CT_small.dcm", "out_of_scope_modality"),
    ("negative_controls/MR_small_RLE.dcm", "out_of_scope_modality"),
    ("negative_controls/US_rgb_uncompressed.dcm", "out_of_scope_modality"),
]
MALFORMED = [
    "malformed/CR_hip_RG2_JPLY_badSOS_undecodable.dcm",
    "malformed/DX_chest_J2KR_966_broken_j2k_stream.dcm",
]
RG2_REFERENCE = "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"
RG2_LOSSLESS = ["derived/CR_hip_RG2_RLE.dcm", "CR_hip_RG2_JLSL.dcm", "CR_hip_RG2_JPLL.dcm"]


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()), float(d.mean())


def _boxed(a: np.ndarray) -> np.ndarray:
    return images.letterbox(a, 384)


@pytest.fixture(scope="module")
def rg2_reference(samples_dir: Path) -> np.ndarray:
    return pixels.load_dicom_file(samples_dir / RG2_REFERENCE)


def _header(**attrs: object) -> Dataset:
    """A minimal CR header (no pixel data) with attributes overridden by ``attrs``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = pixels.CR_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 512, 400
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


# --- the samples -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_radiograph_sample_decodes_to_unit_range_image(samples_dir: Path, name: str) -> None:
    """Every CR/DX sample gives a finite, non-flat Rows x Columns float32 image in [0, 1]."""
    header = pydicom.dcmread(samples_dir / name, stop_before_pixels=True, force=True)
    image = pixels.load_dicom_file(samples_dir / name)
    assert image.shape == (header.Rows, header.Columns)
    assert image.dtype == np.float32
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() - image.min() > 0.5


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_check_scope_accepts_radiograph_header_read_without_pixels(
    samples_dir: Path, name: str
) -> None:
    """check_scope passes every CR/DX sample read with stop_before_pixels."""
    pixels.check_scope(pydicom.dcmread(samples_dir / name, stop_before_pixels=True, force=True))


@pytest.mark.parametrize(("name", "reason"), OUT_OF_SCOPE)
def test_out_of_scope_sample_is_refused_by_load(samples_dir: Path, name: str, reason: str) -> None:
    """MG, XA, CT, MR and US samples are refused with out_of_scope_modality."""
    with pytest.raises(NotProcessable) as info:
        pixels.load_dicom_file(samples_dir / name)
    assert info.value.reason == reason


@pytest.mark.parametrize(("name", "reason"), OUT_OF_SCOPE)
def test_out_of_scope_sample_is_refused_from_header_alone(
    samples_dir: Path, name: str, reason: str
) -> None:
    """check_scope refuses the out-of-scope samples from a header read without pixels."""
    header = pydicom.dcmread(samples_dir / name, stop_before_pixels=True, force=True)
    with pytest.raises(NotProcessable) as info:
        pixels.check_scope(header)
    assert info.value.reason == reason


def test_read_pixels_refuses_multi_frame_xa_as_multi_frame(samples_dir: Path) -> None:
    """read_pixels (which does not judge modality) refuses the 96-frame XA as multi_frame."""
    ds = pydicom.dcmread(samples_dir / "XA_JPEGbaseline_multiframe.dcm")
    with pytest.raises(NotProcessable) as info:
        pixels.read_pixels(ds)
    assert info.value.reason == "multi_frame"


def test_read_pixels_refuses_rgb_ultrasound_as_colour(samples_dir: Path) -> None:
    """read_pixels refuses the RGB ultrasound as colour."""
    ds = pydicom.dcmread(samples_dir / "negative_controls/US_rgb_uncompressed.dcm")
    with pytest.raises(NotProcessable) as info:
        pixels.read_pixels(ds)
    assert info.value.reason == "colour"


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_sample_is_undecodable(samples_dir: Path, name: str) -> None:
    """A broken compressed stream gives NotProcessable('undecodable'), not a library error."""
    with pytest.raises(NotProcessable) as info:
        pixels.load_dicom_file(samples_dir / name)
    assert info.value.reason == "undecodable"


@pytest.mark.parametrize("name", MALFORMED)
def test_undecodable_message_names_uids_and_no_patient(samples_dir: Path, name: str) -> None:
    """The undecodable message names SOP Instance UID and transfer syntax, never the patient."""
    header = pydicom.dcmread(samples_dir / name, stop_before_pixels=True)
    with pytest.raises(NotProcessable) as info:
        pixels.load_dicom_file(samples_dir / name)
    message = str(info.value)
    assert str(header.SOPInstanceUID) in message
    assert str(header.file_meta.TransferSyntaxUID) in message
    for value in (header.get("PatientName"), header.get("PatientID")):
        if value and str(value).strip():
            assert str(value) not in message


@pytest.mark.parametrize("name", MALFORMED)
def test_undecodable_sample_logs_no_error_storm(
    samples_dir: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusing an undecodable file leaves no ERROR log record (pydicom logs one per plugin)."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NotProcessable):
        pixels.load_dicom_file(samples_dir / name)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_decoding_in_threads_matches_sequential(samples_dir: Path) -> None:
    """Decoding in a thread pool (as the worker does), malformed files included, gives the same
    arrays and refusals as one after the other."""
    names = ["CR_hip_RG2_JLSL.dcm", MALFORMED[0], "CR_extremity_RG3_J2KI.dcm", MALFORMED[1],
             "CR_chest_MONO1_implicitVR_nometa.dcm"]

    def load(name: str) -> np.ndarray | str:
        try:
            return pixels.load_dicom_file(samples_dir / name)
        except NotProcessable as exc:
            return exc.reason

    sequential = [load(n) for n in names]
    with ThreadPoolExecutor(max_workers=3) as pool:
        threaded = list(pool.map(load, names))
    for one, other in zip(sequential, threaded, strict=True):
        if isinstance(one, str):
            assert one == other
        else:
            np.testing.assert_array_equal(one, other)


# --- parity between encodings of the same picture ----------------------------------------------


@pytest.mark.parametrize("name", RG2_LOSSLESS)
def test_rg2_lossless_encodings_match_uncompressed(
    samples_dir: Path, rg2_reference: np.ndarray, name: str
) -> None:
    """RLE, JPEG-LS lossless and JPEG Lossless RG2 give the uncompressed array exactly."""
    worst, _ = _diff(pixels.load_dicom_file(samples_dir / name), rg2_reference)
    assert worst <= 1e-6


def test_rg2_jpegls_near_lossless_is_close(samples_dir: Path, rg2_reference: np.ndarray) -> None:
    """JPEG-LS near-lossless RG2 is within 0.01 everywhere (measured 0.0045, mean 0.0023)."""
    image = pixels.load_dicom_file(samples_dir / "CR_hip_RG2_JLSN.dcm")
    worst, mean = _diff(image, rg2_reference)
    assert worst < 0.01 and mean < 0.005


def test_rg2_jpeg_lossy_is_close_at_model_size(
    samples_dir: Path, rg2_reference: np.ndarray
) -> None:
    """JPEG Extended RG2 is within 0.02 of lossless once letterboxed to 384 (measured 0.010)."""
    image = pixels.load_dicom_file(samples_dir / "CR_hip_RG2_JPLY_fixed.dcm")
    full_max, full_mean = _diff(image, rg2_reference)
    boxed_max, boxed_mean = _diff(_boxed(image), _boxed(rg2_reference))
    assert full_mean < 0.01 and full_max < 0.2
    assert boxed_max < 0.02 and boxed_mean < 0.002


def test_j2k_lossy_rg3_is_close_to_lossless(samples_dir: Path) -> None:
    """JPEG 2000 lossy RG3 is within 0.005 of the lossless one at model size (measured 0.0014)."""
    lossy = pixels.load_dicom_file(samples_dir / "CR_extremity_RG3_J2KI.dcm")
    lossless = pixels.load_dicom_file(samples_dir / "CR_extremity_RG3_J2KR.dcm")
    assert _diff(lossy, lossless)[1] < 0.002
    assert _diff(_boxed(lossy), _boxed(lossless))[0] < 0.005


def test_two_lossy_rg1_encodings_agree(samples_dir: Path) -> None:
    """JPEG 2000 lossy and JPEG-LS near-lossless RG1 agree within 0.005 at model size."""
    j2k = pixels.load_dicom_file(samples_dir / "CR_chest_RG1_J2KI.dcm")
    jls = pixels.load_dicom_file(samples_dir / "CR_chest_RG1_JLSN.dcm")
    assert _diff(j2k, jls)[1] < 0.005
    assert _diff(_boxed(j2k), _boxed(jls))[0] < 0.005


# --- polarity, VOI, shrink ---------------------------------------------------------------------


def test_monochrome1_is_inverted(samples_dir: Path) -> None:
    """A MONOCHROME1 image is the exact complement of the same pixels declared MONOCHROME2."""
    ds = pydicom.dcmread(samples_dir / "CR_extremity_RG3_J2KR.dcm")
    as_mono1 = pixels.read_pixels(ds)
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(as_mono1, 1.0 - pixels.read_pixels(ds), atol=1e-6)


def test_inverse_presentation_lut_with_monochrome1_inverts_once(samples_dir: Path) -> None:
    """DX MONOCHROME1 with Presentation LUT Shape INVERSE is inverted once, not twice."""
    ds = pydicom.dcmread(samples_dir / "DX_chest_J2KR_966_fixed.dcm")
    assert ds.PresentationLUTShape == "INVERSE"
    with_shape = pixels.read_pixels(ds)
    del ds.PresentationLUTShape
    np.testing.assert_array_equal(with_shape, pixels.read_pixels(ds))


def test_inverse_presentation_lut_inverts_monochrome2(samples_dir: Path) -> None:
    """A MONOCHROME2 image with Presentation LUT Shape INVERSE is the complement of IDENTITY."""
    ds = pydicom.dcmread(samples_dir / RG2_REFERENCE)
    identity = pixels.read_pixels(ds)
    ds.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(pixels.read_pixels(ds), 1.0 - identity, atol=1e-6)


def test_window_outside_the_data_is_ignored(samples_dir: Path) -> None:
    """The DX whose window misses every stored value is read as if it had no window."""
    ds = pydicom.dcmread(samples_dir / "DX_J2KR_1416x1420_u16.dcm")
    with capture_logs() as logs:
        image = pixels.read_pixels(ds)
    np.testing.assert_array_equal(image, pixels.read_pixels(ds, apply_voi=False))
    assert [e["event"] for e in logs].count("voi_ignored") == 1


def test_full_range_window_changes_nothing(samples_dir: Path) -> None:
    """RG2's full-range window (511/1024) gives the same image as no window."""
    ds = pydicom.dcmread(samples_dir / RG2_REFERENCE)
    worst, _ = _diff(pixels.read_pixels(ds), pixels.read_pixels(ds, apply_voi=False))
    assert worst <= 1e-6


def test_clipping_window_is_applied(samples_dir: Path) -> None:
    """A narrow clinical window on RG2 changes the image: the model sees the window."""
    ds = pydicom.dcmread(samples_dir / RG2_REFERENCE)
    ds.WindowCenter, ds.WindowWidth = 500, 300
    _, mean = _diff(pixels.read_pixels(ds), pixels.read_pixels(ds, apply_voi=False))
    assert mean > 0.05


def test_padding_pixels_become_the_darkest_grey(samples_dir: Path) -> None:
    """Pixels equal to Pixel Padding Value are rendered as the image's darkest grey level."""
    ds = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    arr = ds.pixel_array.copy()
    arr[:3, :] = 4095  # a padded band at the top, brightest stored value in MONOCHROME1 = dark
    arr[-3:, :] = 0  # and at the bottom, stored 0 = brightest on display
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 0
    image = pixels.read_pixels(ds)
    assert image[-3:, :].max() == image.min()


def test_modality_lut_sequence_is_applied(samples_dir: Path) -> None:
    """The Modality LUT Sequence sample equals normalize() of its LUT output, inverted."""
    ds = pydicom.dcmread(samples_dir / "CR_JPLL_ModalityLUTSequence.dcm")
    values = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    expected = images.normalize(-values)
    worst, _ = _diff(pixels.read_pixels(ds), expected)
    assert worst <= 1e-5


def test_shrink_to_model_size_keeps_letterbox_identical(samples_dir: Path) -> None:
    """With max_side equal to the letterbox size the model input is unchanged by the shrink."""
    ds = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm")
    small = pixels.read_pixels(ds, max_side=384)
    assert max(small.shape) == 384
    assert abs(small.shape[0] / small.shape[1] - ds.Rows / ds.Columns) < 0.01
    np.testing.assert_array_equal(_boxed(small), _boxed(pixels.read_pixels(ds)))


def test_file_without_meta_decodes_like_its_encoding(samples_dir: Path) -> None:
    """The implicit-VR file without file meta is decoded with the encoding it was read with."""
    ds = pydicom.dcmread(samples_dir / "CR_chest_MONO1_implicitVR_nometa.dcm", force=True)
    assert pixels.transfer_syntax(ds) == pydicom.uid.ImplicitVRLittleEndian


# --- header-only refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"NumberOfFrames": 2}, "multi_frame"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "colour"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour"),
        ({"Rows": None, "Columns": None}, "no_pixel_data"),
        ({"Rows": 4}, "bad_dimensions"),
        ({"Rows": 20000}, "bad_dimensions"),
        ({"Rows": 8000, "Columns": 300}, "bad_dimensions"),
        ({"BitsAllocated": 1, "BitsStored": 1}, "bad_pixel_format"),
        ({"BitsStored": 17}, "bad_pixel_format"),
        ({"Modality": "MG", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2"}, "out_of_scope_modality"),
        ({"Modality": "PX", "SOPClassUID": pixels.DX_FOR_PRESENTATION}, "out_of_scope_modality"),
        ({"Modality": "IO", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.3"}, "out_of_scope_modality"),
        ({"Modality": "RF", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.12.2"},
         "out_of_scope_modality"),
        ({"Modality": "OT", "SOPClassUID": pixels.SECONDARY_CAPTURE}, "out_of_scope_modality"),
        ({"Modality": None, "SOPClassUID": pixels.SECONDARY_CAPTURE, "ConversionType": "SD"},
         "out_of_scope_modality"),
        ({"Modality": None, "SOPClassUID": None}, "out_of_scope_modality"),
    ],
)
def test_check_scope_refuses_header(attrs: dict[str, object], reason: str) -> None:
    """check_scope refuses an out-of-scope header with the matching reason code."""
    with pytest.raises(NotProcessable) as info:
        pixels.check_scope(_header(**attrs))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"SOPClassUID": pixels.DX_FOR_PRESENTATION, "Modality": "DX"},
        {"SOPClassUID": pixels.DX_FOR_PROCESSING, "Modality": "DX"},
        {"SOPClassUID": pixels.SECONDARY_CAPTURE, "Modality": "CR"},
        {"SOPClassUID": pixels.SECONDARY_CAPTURE, "Modality": None, "ConversionType": "WSD"},
        {"SOPClassUID": pixels.SC_GREY_BYTE, "Modality": "DX", "NumberOfFrames": 1},
        {"NumberOfFrames": 1},
        {"PhotometricInterpretation": "MONOCHROME1"},
    ],
)
def test_check_scope_accepts_header(attrs: dict[str, object]) -> None:
    """check_scope accepts single-frame grey CR, DX and radiograph Secondary Capture headers."""
    pixels.check_scope(_header(**attrs))


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_check_scope_refuses_unparsable_header_as_bad_header() -> None:
    """A Number of Frames that is not a number gives bad_header, not a pydicom error."""
    ds = _header()
    tag = pydicom.tag.Tag("NumberOfFrames")
    ds._dict[tag] = RawDataElement(tag, "IS", 4, b"two ", 0, False, True)
    with pytest.raises(NotProcessable) as info:
        pixels.check_scope(ds)
    assert info.value.reason == "bad_header"


def test_check_scope_refuses_transfer_syntax_without_decoder() -> None:
    """A video transfer syntax is refused as unsupported_transfer_syntax before decoding."""
    ds = _header()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    with pytest.raises(NotProcessable) as info:
        pixels.check_scope(ds)
    assert info.value.reason == "unsupported_transfer_syntax"


def test_read_pixels_refuses_dataset_without_pixel_data(samples_dir: Path) -> None:
    """A radiograph header without its Pixel Data element gives no_pixel_data."""
    ds = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    del ds.PixelData
    with pytest.raises(NotProcessable) as info:
        pixels.read_pixels(ds)
    assert info.value.reason == "no_pixel_data"


def test_truncated_native_pixel_data_is_undecodable(samples_dir: Path) -> None:
    """Uncompressed pixel data shorter than Rows x Columns gives undecodable."""
    ds = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    ds = copy.deepcopy(ds)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(NotProcessable) as info:
        pixels.read_pixels(ds)
    assert info.value.reason == "undecodable"


def test_non_dicom_file_is_not_dicom(tmp_path: Path) -> None:
    """A file that is not DICOM is refused as not_dicom."""
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(NotProcessable) as info:
        pixels.load_dicom_file(path)
    assert info.value.reason == "not_dicom"


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_blank_image_is_refused_as_blank_not_scored(samples_dir: Path, photometric: str) -> None:
    """Every pixel one grey level (an empty exposure): blank_image, whatever the polarity, the
    window or the padding; one pixel of contrast is enough to be read."""
    ds = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    ds.PhotometricInterpretation = photometric
    arr = np.full_like(ds.pixel_array, 1234)
    ds.PixelData = arr.tobytes()
    with pytest.raises(NotProcessable) as refused:
        pixels.read_pixels(ds)
    assert refused.value.reason == "blank_image"
    assert ds.SOPInstanceUID in str(refused.value)
    ds.WindowCenter, ds.WindowWidth = 1234, 10  # a window does not make contrast
    with pytest.raises(NotProcessable, match="same grey level"):
        pixels.read_pixels(ds)
    arr[5, 7] = 1300
    ds.PixelData = arr.tobytes()
    del ds.WindowCenter, ds.WindowWidth
    image = pixels.read_pixels(ds)
    assert image.max() - image.min() == pytest.approx(1.0)

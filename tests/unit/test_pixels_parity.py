"""Parity: a dataset JPEG wrapped in DICOM many ways gives the model what the JPEG itself gives.

Each encoding is written to bytes and read back (as the daemon reads its spool), decoded with
:func:`fracture_node.dicom.pixels.read_pixels` and compared with
:func:`fracture_node.images.load_image_file` on the JPEG, at full size and letterboxed to 384.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from fracture_node import images
from fracture_node.dicom import pixels

# Two FracAtlas test images (landscape and portrait, both with pixels >= 250) and one small
# multi-region image.
JPEGS = ["images/fa_IMG0000025.jpg", "images/fa_IMG0000044.jpg", "images/mr_0115bf2b7c75.jpg"]
MODEL_SIZE = 384

Grey = NDArray[np.uint8]


def _base(px: NDArray[np.integer], bits_stored: int, photometric: str = "MONOCHROME2") -> Dataset:
    """A CR dataset (Explicit VR LE) holding ``px`` uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pixels.CR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pixels.CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if px.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.PixelData = px.tobytes()
    return ds


def _explicit_8bit(px: Grey, _: bytes) -> Dataset:
    return _base(px, 8)


def _implicit_8bit(px: Grey, _: bytes) -> Dataset:
    ds = _base(px, 8)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _deflated_8bit(px: Grey, _: bytes) -> Dataset:
    ds = _base(px, 8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def _scaled(px: Grey, bits_stored: int) -> Dataset:
    """16-bit stored values x*16+100 with the Rescale Slope/Intercept that gives x back."""
    ds = _base(px.astype(np.uint16) * 16 + 100, bits_stored)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.0625", "-6.25", "US"
    return ds


def _scaled_12bit(px: Grey, _: bytes) -> Dataset:
    # Bits Stored 12 as the recipe says, although 255*16+100 = 4180 overflows 12 bits.
    return _scaled(px, 12)


def _monochrome1(px: Grey, _: bytes) -> Dataset:
    return _base((255 - px).astype(np.uint8), 8, "MONOCHROME1")


def _compressed(ts: pydicom.uid.UID, sixteen: bool = False) -> Callable[[Grey, bytes], Dataset]:
    def make(px: Grey, _: bytes) -> Dataset:
        ds = _scaled(px, 13) if sixteen else _base(px, 8)
        ds.compress(ts)
        return ds

    return make


def _full_range_window(px: Grey, _: bytes) -> Dataset:
    ds = _base(px, 8)
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    return ds


def _rescaled_window(px: Grey, _: bytes) -> Dataset:
    ds = _scaled(px, 13)
    ds.compress(JPEG2000Lossless)
    ds.WindowCenter, ds.WindowWidth = "128", "256"  # in modality (rescaled) units
    return ds


def _voi_lut(table: NDArray[np.uint16]) -> Callable[[Grey, bytes], Dataset]:
    def make(px: Grey, _: bytes) -> Dataset:
        ds = _base(px, 8)
        item = Dataset()
        item.LUTDescriptor = [256, 0, 16]
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
        ds.VOILUTSequence = [item]
        return ds

    return make


def _monochrome1_jpegls_window(px: Grey, _: bytes) -> Dataset:
    ds = _monochrome1(px, b"")
    ds.compress(JPEGLSLossless)
    ds.WindowCenter, ds.WindowWidth = "127.5", "255"  # clips grey levels 254 and 255 together
    return ds


def _jpeg_wrapped(px: Grey, jpeg: bytes) -> Dataset:
    """The JPEG file's own bytes encapsulated as JPEG Baseline (what img2dcm does)."""
    ds = _base(px, 8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def _clinical_window(px: Grey, _: bytes) -> Dataset:
    ds = _base(px, 8)
    ds.WindowCenter, ds.WindowWidth = "100", "120"
    return ds


EXACT = {
    "explicit_le_8bit": _explicit_8bit,
    "implicit_le_8bit": _implicit_8bit,
    "deflated_le_8bit": _deflated_8bit,
    "rescaled_16bit_stored12": _scaled_12bit,
    "monochrome1_inverted": _monochrome1,
    "jpeg2000_lossless_8bit": _compressed(JPEG2000Lossless),
    "jpegls_lossless_8bit": _compressed(JPEGLSLossless),
    "rle_lossless_8bit": _compressed(RLELossless),
    "jpeg2000_lossless_rescaled_16bit": _compressed(JPEG2000Lossless, sixteen=True),
    "jpegls_lossless_rescaled_16bit": _compressed(JPEGLSLossless, sixteen=True),
    "rle_lossless_rescaled_16bit": _compressed(RLELossless, sixteen=True),
    "voi_window_full_range": _full_range_window,
    "voi_window_full_range_rescaled_j2k": _rescaled_window,
    "jpeg_baseline_wrapped_file": _jpeg_wrapped,
    "voi_lut_sequence_linear": _voi_lut(np.arange(256, dtype=np.uint16) * 200 + 1000),
}
"""Encodings that must give the JPEG's model input to float rounding (measured max 1.2e-7)."""


def _read_back(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()), float(d.mean())


@pytest.fixture(scope="module", params=JPEGS)
def picture(request: pytest.FixtureRequest, dataset_dir: Path) -> tuple[Grey, bytes, np.ndarray]:
    """(8-bit pixels, JPEG bytes, load_image_file's image) of one dataset JPEG."""
    path = dataset_dir / request.param
    with Image.open(path) as img:
        px = np.asarray(img.convert("L"))
    return px, path.read_bytes(), images.load_image_file(path)


@pytest.mark.parametrize("encoding", sorted(EXACT))
def test_encoding_matches_jpeg_model_input(
    picture: tuple[Grey, bytes, np.ndarray], encoding: str
) -> None:
    """A lossless or full-range-window encoding gives the JPEG's image and letterbox to 1e-5."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(EXACT[encoding](px, jpeg)))
    assert image.shape == reference.shape
    assert _diff(image, reference)[0] <= 1e-5
    assert _diff(images.letterbox(image, MODEL_SIZE), images.letterbox(reference, MODEL_SIZE))[0] \
        <= 1e-5


def test_encodings_match_each_other(picture: tuple[Grey, bytes, np.ndarray]) -> None:
    """Every exact encoding of one picture gives the same array as the Explicit VR LE one."""
    px, jpeg, _ = picture
    first = pixels.read_pixels(_read_back(_explicit_8bit(px, jpeg)))
    for make in EXACT.values():
        assert _diff(pixels.read_pixels(_read_back(make(px, jpeg))), first)[0] <= 1e-5


def test_window_clipping_top_grey_level_stays_close(
    picture: tuple[Grey, bytes, np.ndarray],
) -> None:
    """A window that merges the top grey levels (127.5/255, MONOCHROME1) stays within 0.01."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(_monochrome1_jpegls_window(px, jpeg)))
    worst, mean = _diff(image, reference)
    assert worst < 0.01 and mean < 0.005


def test_clinical_window_changes_model_input(picture: tuple[Grey, bytes, np.ndarray]) -> None:
    """A narrow clinical window is applied, so the model input departs from the plain JPEG."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(_clinical_window(px, jpeg)))
    assert _diff(image, reference)[1] > 0.02


def test_clinical_window_ignored_on_request(picture: tuple[Grey, bytes, np.ndarray]) -> None:
    """With apply_voi=False a clinically windowed object gives the JPEG's image again."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(_clinical_window(px, jpeg)), apply_voi=False)
    assert _diff(image, reference)[0] <= 1e-5


def test_in_memory_dataset_without_file_meta_decodes(
    picture: tuple[Grey, bytes, np.ndarray],
) -> None:
    """A dataset built in memory with native pixels and no file meta gives the JPEG's image."""
    px, jpeg, reference = picture
    ds = _explicit_8bit(px, jpeg)
    del ds.file_meta
    assert _diff(pixels.read_pixels(ds), reference)[0] <= 1e-5


def test_saturating_voi_lut_is_ignored(picture: tuple[Grey, bytes, np.ndarray]) -> None:
    """A VOI LUT that maps every grey level to one value is ignored instead of blanking."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(_voi_lut(np.full(256, 4000, np.uint16))(px, jpeg)))
    assert _diff(image, reference)[0] <= 1e-5


def test_shrunk_read_matches_jpeg_at_model_size(picture: tuple[Grey, bytes, np.ndarray]) -> None:
    """read_pixels(max_side=384) letterboxes to exactly the JPEG's model input."""
    px, jpeg, reference = picture
    image = pixels.read_pixels(_read_back(_compressed(JPEG2000Lossless)(px, jpeg)),
                               max_side=MODEL_SIZE)
    boxed = images.letterbox(image, MODEL_SIZE)
    assert _diff(boxed, images.letterbox(reference, MODEL_SIZE))[0] <= 1e-5


def test_file_on_disk_round_trip_matches_jpeg(
    tmp_path: Path, picture: tuple[Grey, bytes, np.ndarray]
) -> None:
    """load_dicom_file on a written RLE file gives the JPEG's image."""
    px, jpeg, reference = picture
    path = tmp_path / "wrapped.dcm"
    pydicom.dcmwrite(path, _compressed(RLELossless)(px, jpeg), enforce_file_format=True)
    assert _diff(pixels.load_dicom_file(path), reference)[0] <= 1e-5


def _dcmtk(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=60)


def test_img2dcm_secondary_capture_matches_jpeg(
    tmp_path: Path, picture: tuple[Grey, bytes, np.ndarray]
) -> None:
    """DCMTK img2dcm's default output (SC, no Modality, the JPEG as is) gives the JPEG's image."""
    px, jpeg, reference = picture
    source, out = tmp_path / "in.jpg", tmp_path / "sc.dcm"
    source.write_bytes(jpeg)
    _dcmtk("img2dcm", source, out)
    assert _diff(pixels.load_dicom_file(out), reference)[0] <= 1e-5


@pytest.mark.parametrize(
    "encoder",
    [("dcmcrle",), ("dcmcjpls",), ("dcmcjpeg", "--encode-lossless-sv1")],
    ids=["rle", "jpeg-ls", "jpeg-lossless"],
)
def test_dcmtk_reencoded_conversion_matches_jpeg(
    tmp_path: Path, picture: tuple[Grey, bytes, np.ndarray], encoder: tuple[str, ...]
) -> None:
    """img2dcm, dcmdjpeg, then a DCMTK lossless encoder give the JPEG's image."""
    px, jpeg, reference = picture
    source = tmp_path / "in.jpg"
    source.write_bytes(jpeg)
    _dcmtk("img2dcm", "-k", "Modality=CR", source, tmp_path / "sc.dcm")
    _dcmtk("dcmdjpeg", tmp_path / "sc.dcm", tmp_path / "native.dcm")
    _dcmtk(*encoder, tmp_path / "native.dcm", tmp_path / "out.dcm")
    assert _diff(pixels.load_dicom_file(tmp_path / "out.dcm"), reference)[0] <= 1e-5


@pytest.mark.parametrize(("orientation", "turn"), [(6, Image.Transpose.ROTATE_90),
                                                  (8, Image.Transpose.ROTATE_270),
                                                  (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path: Path, picture: tuple[Grey, bytes, np.ndarray],
                                     orientation: int, turn: Image.Transpose) -> None:
    """A JPEG stored sideways with an EXIF orientation tag reads as a viewer shows it upright.

    The file holds the picture turned the other way, so applying the tag must give back the
    original image; ignoring it would give a rotated (and, at 90 degrees, transposed) one.
    """
    px, _, reference = picture
    stored = Image.fromarray(px).transpose(turn)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif)
    upright = images.load_image_file(path)
    assert upright.shape == reference.shape
    assert _diff(upright, reference)[0] <= 1e-5

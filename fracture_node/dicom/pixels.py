"""Pixels: from a received DICOM object to the grey-level image the fracture model reads.

The grey-level pipeline follows PS3.4 N.2 (stored values -> Modality LUT -> VOI LUT -> Presentation
LUT), then ends in :func:`fracture_node.images.normalize` like every other pixel source, so that the
same picture gives the same model input whatever encoding carried it.

Scope (:func:`check_scope`, header only)
---------------------------------------
Accepted: single-frame, grey-level projection radiographs of the skeleton:

* Computed Radiography Image Storage (1.2.840.10008.5.1.4.1.1.1), Modality CR, DX or RG;
* Digital X-Ray Image Storage, For Presentation (1.2.840.10008.5.1.4.1.1.1.1) and For Processing
  (1.2.840.10008.5.1.4.1.1.1.1.1), Modality DX, CR or RG. For Processing images are raw detector
  values: they are read through the same pipeline, but the model was trained on display-ready
  pictures, so expect them to be a weaker input;
* Secondary Capture (1.2.840.10008.5.1.4.1.1.7, and the single-frame grey-level multi-frame SC
  classes .7.2/.7.3) when Modality is CR, DX or RG (a digitised or converted radiograph) or absent
  (what DCMTK ``img2dcm`` writes when converting a JPEG), and Conversion Type is not SD, DRW or SYN
  (scanned document, drawing, synthetic). A Secondary Capture with any other Modality (OT, XC,
  DOC, CT...) is rejected: it could be a screenshot, a photograph or a scanned form.

Rejected with ``out_of_scope_modality``: mammography (MG, all MG SOP classes: breast tissue, not
bone), intra-oral and panoramic dental (IO, PX: a different anatomy and geometry from the training
set), angiography and fluoroscopy (XA, RF: contrast-filled vessels, usually cine), and every
cross-sectional or non-X-ray class (CT, MR, US, NM, PT, ...). A dataset without a SOP Class UID is
judged by Modality alone; one with neither is rejected.

Reason codes (``NotProcessable.reason``):

``out_of_scope_modality``  SOP class or Modality outside the list above.
``multi_frame``            Number of Frames > 1.
``colour``                 Samples per Pixel != 1 or Photometric Interpretation not MONOCHROME1/2.
``no_pixel_data``          no Rows/Columns (header) or no Pixel Data element (:func:`read_pixels`).
``bad_dimensions``         a side under 8 or over 16384 pixels, over 64 Mpixel, or aspect > 10.
``bad_pixel_format``       Bits Allocated/Stored or Pixel Representation impossible or unsupported,
                           float pixel data.
``bad_header``             an attribute needed here cannot be parsed.
``unsupported_transfer_syntax``  no installed decoder for the transfer syntax (video, JPEG XL...).
``undecodable``            the pixel data (or its Modality LUT) cannot be decoded.
``not_dicom``              :func:`load_dicom_file` could not parse the file.

Grey levels (:func:`read_pixels`)
---------------------------------
1. Decode frame 0 with pydicom's decoders (pylibjpeg, pyjpegls, openjpeg, RLE plugins; Pillow
   first for 8-bit JPEG, CharLS first for JPEG-LS). Unsigned values are not masked to Bits
   Stored. A dataset without file meta uses the encoding it was read with (native pixels built in
   memory: little endian).
2. Modality LUT Sequence, else Rescale Slope/Intercept (a zero or non-finite slope is ignored).
3. VOI: a VOI LUT Sequence if present, else the first Window Center/Width with VOI LUT Function
   LINEAR (default), LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2). The sender's VOI is applied because
   it is how the picture is meant to be seen, and how a PNG/JPEG export of it (the training data)
   would have been made. A window wider than the robust [0.5, 99.5] percentile range of the data
   (any full-range window, e.g. on a DICOM made from a PNG/JPEG) is exactly cancelled by
   :func:`~fracture_node.images.normalize`, so such objects keep parity with the PNG/JPEG path. A
   narrower (clipping) clinical window deliberately changes the model input: the model then sees
   what the radiologist sees. A bogus VOI (width < 1, non-numeric, or leaving under
   ``MIN_INSIDE_FRACTION`` of the pixels inside the window / off the LUT's end values) is ignored
   and logged (``voi_ignored``); ``apply_voi=False`` ignores every VOI.
4. MONOCHROME1 or Presentation LUT Shape INVERSE: invert, once. In the DX Image Module (PS3.3
   C.8.11.3) INVERSE "shall be used if Photometric Interpretation is MONOCHROME1": both describe
   the same inversion. MONOCHROME2 with INVERSE (non-conformant in DX, seen in the wild) is taken
   literally: one inversion. Pixel Intensity Relationship Sign is not used (the samples contradict
   it).
5. Pixel Padding Value (and Range Limit) pixels, the area outside the exposed image, are set to
   the darkest grey level of the image, as viewers render them (ignored when they would cover
   over 90% of the image).
6. :func:`~fracture_node.images.normalize` at full resolution (the same pixels, hence the same
   percentiles, as :func:`~fracture_node.images.load_image_file` on the same picture), then the
   optional :func:`~fracture_node.images.shrink`. With ``max_side`` equal to the model's input
   size, ``letterbox(read_pixels(ds, max_side=S), S)`` equals ``letterbox(read_pixels(ds), S)``.
   An image whose pixels all have one grey level after these steps is refused as
   ``blank_image`` (an empty exposure or frame: nothing a probability could be about).
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from fracture_node import images
from fracture_node.errors import NotProcessable
from fracture_node.images import FloatImage
from fracture_node.logs import get_logger

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
SC_GREY_BYTE = UID("1.2.840.10008.5.1.4.1.1.7.2")
SC_GREY_WORD = UID("1.2.840.10008.5.1.4.1.1.7.3")

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
RADIOGRAPH_SOP_CLASSES = frozenset({CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING})
SECONDARY_CAPTURE_SOP_CLASSES = frozenset({SECONDARY_CAPTURE, SC_GREY_BYTE, SC_GREY_WORD})
ACCEPTED_SOP_CLASSES = RADIOGRAPH_SOP_CLASSES | SECONDARY_CAPTURE_SOP_CLASSES
SC_REFUSED_CONVERSIONS = frozenset({"SD", "DRW", "SYN"})
"""Secondary Capture Conversion Types (PS3.3 C.8.6.1) never read: scanned document, drawing,
synthetic image."""

MIN_SIDE = 8
MAX_SIDE = 16384
MAX_PIXELS = 64 * 1024 * 1024
MAX_ASPECT = 10.0
MIN_INSIDE_FRACTION = 0.10
"""A VOI leaving fewer pixels than this unsaturated is taken to be bogus and ignored."""

_SAMPLE = 262_144
# Plugins tried first, falling back to every installed one: Pillow for 8-bit JPEG (the same
# libjpeg-turbo as images.load_image_file, so a JPEG file wrapped in DICOM as is gives identical
# pixels, where libjpeg via pylibjpeg differs by +-1 grey level); CharLS (pyjpegls) for JPEG-LS,
# about 3x faster here than libjpeg via pylibjpeg and bit-identical.
_PREFERRED_PLUGIN = {
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: "pillow",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class _QuietWhileDecoding(logging.Filter):
    """Drop pydicom's per-plugin tracebacks logged while this thread decodes in this module.

    pydicom logs one ERROR with a traceback for every plugin that fails before raising one
    summary; :func:`read_pixels` turns that summary into a single NotProcessable instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_DECODING, "active", False) or record.levelno < logging.ERROR


_DECODING = threading.local()
_DECODER_LOGGER = logging.getLogger("pydicom.pixels.decoders.base")
if not any(isinstance(f, _QuietWhileDecoding) for f in _DECODER_LOGGER.filters):
    _DECODER_LOGGER.addFilter(_QuietWhileDecoding())


def _log() -> Any:
    # Not a module global: a logger bound at import keeps the structlog configuration of import
    # time, before logs.configure() ran.
    return get_logger("pixels")


def _uid(ds: Dataset) -> str:
    value = ds.get("SOPInstanceUID", None)
    return str(value) if value else "(no SOP Instance UID)"


def _refuse(ds: Dataset, reason: str, what: str) -> NotProcessable:
    return NotProcessable(reason, f"SOP Instance UID {_uid(ds)}: {what}")


def _int_attr(ds: Dataset, keyword: str) -> int | None:
    """The integer value of ``keyword``, None if absent or empty; ``bad_header`` if unparsable."""
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0]
        return int(value)
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise _refuse(ds, "bad_header", f"{keyword} cannot be read as an integer") from exc


def _str_attr(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, None)
    except Exception as exc:  # pydicom raises many types on a malformed element
        raise _refuse(ds, "bad_header", f"{keyword} cannot be read") from exc
    return "" if value is None else str(value).strip().upper()


def transfer_syntax(ds: Dataset) -> UID | None:
    """The transfer syntax of ``ds``: its file meta, else the encoding it was read with."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID", None):
        return UID(str(file_meta.TransferSyntaxUID))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _one_line(exc: BaseException) -> str:
    """A decoder's error on one line (library text only: it never holds patient data)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _ts_text(ts: UID | None) -> str:
    if ts is None:
        return "transfer syntax unknown"
    name = ts.name if ts.is_valid and ts.name != str(ts) else ""
    return f"transfer syntax {ts}" + (f" ({name})" if name else "")


def _check_sop_class(ds: Dataset) -> None:
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    modality = _str_attr(ds, "Modality")
    if not sop_class and not modality:
        raise _refuse(ds, "out_of_scope_modality",
                      "neither SOP Class UID nor Modality is present: cannot tell a radiograph")
    if sop_class:
        if sop_class not in ACCEPTED_SOP_CLASSES:
            name = UID(sop_class).name if UID(sop_class).is_valid else sop_class
            raise _refuse(ds, "out_of_scope_modality",
                          f"SOP class {sop_class} ({name}), Modality {modality or '-'}, is out of "
                          "scope: only CR and DX projection radiographs are read")
        if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
            conversion = _str_attr(ds, "ConversionType")
            if modality and modality not in RADIOGRAPH_MODALITIES:
                raise _refuse(ds, "out_of_scope_modality",
                              f"a Secondary Capture with Modality {modality} is out of scope: "
                              "only those with Modality CR, DX, RG or none are read")
            if conversion in SC_REFUSED_CONVERSIONS:
                raise _refuse(ds, "out_of_scope_modality",
                              f"a Secondary Capture with Conversion Type {conversion} (document, "
                              "drawing or synthetic) is out of scope")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise _refuse(ds, "out_of_scope_modality",
                      f"Modality {modality} is out of scope: only CR and DX projection radiographs "
                      "are read")


def _check_image_pixel(ds: Dataset) -> None:
    """Image Pixel module checks (PS3.3 C.7.6.3) that need no pixel data."""
    for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            raise _refuse(ds, "bad_pixel_format", f"{keyword} is not a radiograph's pixel data")
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if rows is None or cols is None:
        raise _refuse(ds, "no_pixel_data", "no Rows/Columns: the object carries no image")
    frames = _int_attr(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise _refuse(ds, "multi_frame", f"{frames} frames: only single-frame images are read")
    samples = _int_attr(ds, "SamplesPerPixel")
    photometric = _str_attr(ds, "PhotometricInterpretation")
    if (samples is not None and samples != 1) or photometric not in _MONOCHROME:
        raise _refuse(ds, "colour",
                      f"Samples per Pixel {samples}, Photometric Interpretation "
                      f"{photometric or '-'}: only MONOCHROME1/MONOCHROME2 grey levels are read")
    if (min(rows, cols) < MIN_SIDE or max(rows, cols) > MAX_SIDE or rows * cols > MAX_PIXELS
            or max(rows, cols) > MAX_ASPECT * min(rows, cols)):
        raise _refuse(ds, "bad_dimensions",
                      f"{rows} x {cols} pixels is not a plausible radiograph (sides {MIN_SIDE}.."
                      f"{MAX_SIDE}, at most {MAX_PIXELS} pixels, aspect at most {MAX_ASPECT:g})")
    allocated = _int_attr(ds, "BitsAllocated")
    stored = _int_attr(ds, "BitsStored")
    representation = _int_attr(ds, "PixelRepresentation")
    if (allocated not in (8, 16, 32) or stored is None or not 1 <= stored <= allocated
            or representation not in (0, 1)):
        raise _refuse(ds, "bad_pixel_format",
                      f"Bits Allocated {allocated}, Bits Stored {stored}, Pixel Representation "
                      f"{representation}: not a supported grey-level encoding")


def _check_transfer_syntax(ds: Dataset) -> UID | None:
    ts = transfer_syntax(ds)
    if ts is None:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise _refuse(ds, "unsupported_transfer_syntax",
                      f"no installed decoder for {_ts_text(ts)}; ask the sender for JPEG 2000, "
                      "JPEG-LS, JPEG Lossless, RLE or uncompressed")
    return ts


def check_scope(ds: Dataset) -> None:
    """Refuse, from the header alone, an object that fracture-node does not read.

    Works on a dataset read with ``stop_before_pixels=True`` (pixel data presence is then only
    judged by Rows/Columns; :func:`read_pixels` checks the element itself).

    Raises
    ------
    NotProcessable
        With one of the reason codes in this module's docstring.
    """
    try:
        _check_sop_class(ds)
        _check_image_pixel(ds)
        _check_transfer_syntax(ds)
    except NotProcessable:
        raise
    except Exception as exc:  # a malformed header must give one clear refusal
        raise _refuse(ds, "bad_header", f"header cannot be read ({type(exc).__name__})") from exc


def _decode_frame(ds: Dataset, ts: UID) -> NDArray[Any]:
    """Frame 0 as stored. Unsigned values are not masked to Bits Stored: a sender whose values
    overflow Bits Stored (e.g. 8-bit x*16+100 declared as 12 bits) keeps its grey levels instead of
    wrapping bright pixels to dark ones; retired overlay bit planes, the other cause of high bits,
    then show as bright marks, which normalize() clips like burned-in annotations."""
    decoder = get_decoder(ts)
    opts: dict[str, Any] = {"correct_unused_bits": int(ds.PixelRepresentation) == 1}
    _DECODING.active = True
    try:
        plugin = _PREFERRED_PLUGIN.get(ts, "")
        if plugin == "pillow" and int(ds.BitsStored) > 8:
            plugin = ""
        if plugin in decoder.available_plugins:
            try:
                return decoder.as_array(ds, index=0, decoding_plugin=plugin, **opts)[0]
            except Exception:  # fall back to every other plugin
                pass
        return decoder.as_array(ds, index=0, **opts)[0]
    finally:
        _DECODING.active = False


def _decode(ds: Dataset, ts: UID | None) -> NDArray[Any]:
    if "PixelData" not in ds:
        raise _refuse(ds, "no_pixel_data", "the object has no Pixel Data element")
    if ts is None:
        # Built in memory without file meta: native pixel data is little endian whatever the VR
        # encoding; encapsulated data (it starts with an Item tag) cannot be decoded blind.
        if bytes(ds.PixelData[:4]) == b"\xfe\xff\x00\xe0":
            raise _refuse(ds, "undecodable",
                          "encapsulated pixel data without a Transfer Syntax UID in file meta")
        ts = ExplicitVRLittleEndian
    rows, cols = int(ds.Rows), int(ds.Columns)
    # No warnings.catch_warnings() here or below: decoding runs in the worker's thread pool and
    # catch_warnings swaps process-wide state. pydicom's own warnings go to the warnings module.
    try:
        arr = _decode_frame(ds, ts)
    except MemoryError:
        raise
    except Exception as exc:  # every decoder failure is one refusal
        raise _refuse(ds, "undecodable",
                      f"pixel data cannot be decoded with {_ts_text(ts)}: "
                      f"{_one_line(exc)}") from exc
    if arr.shape != (rows, cols):
        raise _refuse(ds, "undecodable",
                      f"decoded shape {arr.shape} is not Rows x Columns {rows} x {cols} "
                      f"({_ts_text(ts)})")
    stored = int(ds.BitsStored)
    if arr.dtype.kind == "u" and stored < 8 * arr.dtype.itemsize and int(arr.max()) >> stored:
        _log().warning("bits_stored_exceeded", sop_instance_uid=_uid(ds), bits_stored=stored,
                       max_value=int(arr.max()))
    return arr


def _modality(arr: NDArray[Any], ds: Dataset, ts: UID | None) -> NDArray[np.float32]:
    """Stored values to modality values (PS3.3 C.11.1), as float32."""
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception as exc:  # a broken LUT is one refusal
            raise _refuse(ds, "undecodable",
                          f"the Modality LUT Sequence cannot be applied ({type(exc).__name__}, "
                          f"{_ts_text(ts)})") from exc
    values = arr.astype(np.float32)
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
        _log().warning("rescale_ignored", sop_instance_uid=_uid(ds), why="not numeric")
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        _log().warning("rescale_ignored", sop_instance_uid=_uid(ds),
                       why="zero or non-finite slope")
        slope, intercept = 1.0, 0.0
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _sample(values: NDArray[np.float32]) -> NDArray[np.float32]:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // _SAMPLE)]


def _first_number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _voi_lut(values: NDArray[np.float32], ds: Dataset) -> NDArray[np.float32] | None:
    """Apply the first VOI LUT Sequence item, or None when it is unusable or bogus."""
    try:
        out = apply_voi(np.rint(values).astype(np.int64), ds, index=0)
    except Exception as exc:
        _log().warning("voi_ignored", sop_instance_uid=_uid(ds), kind="lut",
                       why=f"cannot be applied ({type(exc).__name__})")
        return None
    out = np.asarray(out, dtype=np.float32)
    sample = _sample(out)
    lo, hi = float(sample.min()), float(sample.max())
    inside = float(np.mean((sample > lo) & (sample < hi))) if hi > lo else 0.0
    if inside < MIN_INSIDE_FRACTION:
        _log().warning("voi_ignored", sop_instance_uid=_uid(ds), kind="lut",
                       why="saturates the image", inside_fraction=round(inside, 4))
        return None
    return out


def _voi_window(values: NDArray[np.float32], ds: Dataset) -> NDArray[np.float32] | None:
    """Apply the first window (PS3.3 C.11.2.1.2) scaled to [0, 1], or None when absent/bogus."""
    center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    if center is None and width is None:
        return None
    function = _str_attr(ds, "VOILUTFunction") or "LINEAR"
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    minimum = 1.0 if function == "LINEAR" else 0.0
    if center is None or width is None or width <= minimum:
        _log().warning("voi_ignored", sop_instance_uid=_uid(ds), kind="window",
                       why="missing or impossible center/width")
        return None
    if function == "LINEAR":
        if width < 2.0:
            _log().warning("voi_ignored", sop_instance_uid=_uid(ds), kind="window",
                           why="width under 2 is a threshold")
            return None
        offset, scale = center - 0.5, width - 1.0
        lo, hi = offset - scale / 2, offset + scale / 2
    elif function == "LINEAR_EXACT":
        offset, scale = center, width
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = center - width, center + width
    sample = _sample(values)
    inside = float(np.mean((sample > lo) & (sample < hi)))
    if inside < MIN_INSIDE_FRACTION:
        _log().warning("voi_ignored", sop_instance_uid=_uid(ds), kind="window",
                       why="saturates the image", inside_fraction=round(inside, 4),
                       window_center=center, window_width=width)
        return None
    # in place: ``values`` is this module's own float32 copy of the stored values
    if function == "SIGMOID":
        values *= np.float32(-4.0 / width)
        values += np.float32(4.0 * center / width)
        with np.errstate(over="ignore"):
            np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    values -= np.float32(offset)
    values *= np.float32(1.0 / scale)
    values += np.float32(0.5)
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _voi(values: NDArray[np.float32], ds: Dataset) -> NDArray[np.float32]:
    if ds.get("VOILUTSequence"):
        out = _voi_lut(values, ds)
        if out is not None:
            return out
    out = _voi_window(values, ds)
    return values if out is None else out


def _padding_mask(arr: NDArray[Any], ds: Dataset) -> NDArray[np.bool_] | None:
    """Pixels marked as padding (PS3.3 C.7.5.1.1.2), or None when there are none to honour."""
    pad = _first_number(ds, "PixelPaddingValue")
    if pad is None:
        return None
    limit = _first_number(ds, "PixelPaddingRangeLimit")
    if limit is None:
        mask = arr == pad
    else:
        mask = (arr >= min(pad, limit)) & (arr <= max(pad, limit))
    share = float(mask.mean())
    if share == 0.0 or share > 0.9:
        return None
    return mask


def _inverted(ds: Dataset) -> bool:
    return (_str_attr(ds, "PhotometricInterpretation") == "MONOCHROME1"
            or _str_attr(ds, "PresentationLUTShape") == "INVERSE")


def read_pixels(ds: Dataset, max_side: int | None = None, *, apply_voi: bool = True) -> FloatImage:
    """Decode ``ds`` into the normalised grey-level image the model reads (bone bright).

    Parameters
    ----------
    ds:
        A single-frame grey-level dataset with its pixel data (any transfer syntax with an
        installed decoder; a dataset read without file meta uses the encoding it was read with).
    max_side:
        Shrink (after normalisation) so that the longest side is at most this many pixels.
    apply_voi:
        Apply the object's VOI LUT or window (see the module docstring); False ignores it.

    Returns
    -------
    A 2-D float32 array in [0, 1] with Rows x Columns pixels (fewer with ``max_side``).

    Raises
    ------
    NotProcessable
        One exception per object; the message names the SOP Instance UID and transfer syntax.
    """
    try:
        _check_image_pixel(ds)
        ts = _check_transfer_syntax(ds)
        arr = _decode(ds, ts)
        padding = _padding_mask(arr, ds)
        values = _modality(arr, ds, ts)
        del arr
        if apply_voi:
            values = _voi(values, ds)
        if _inverted(ds):
            np.negative(values, out=values)
        if padding is not None:
            values[padding] = values[~padding].min()
        out = images.normalize(values)
    except (NotProcessable, MemoryError):
        raise  # out of memory is transient: the worker retries, the object is not at fault
    except Exception as exc:  # one clear refusal per object, never a storm
        raise _refuse(ds, "undecodable",
                      f"pixel processing failed ({type(exc).__name__}, "
                      f"{_ts_text(transfer_syntax(ds))})") from exc
    if not np.isfinite(out).all():
        raise _refuse(ds, "undecodable",
                      f"non-finite grey levels after decoding ({_ts_text(transfer_syntax(ds))})")
    if images.is_blank(out):
        raise _refuse(ds, "blank_image",
                      f"every pixel has the same grey level ({_ts_text(transfer_syntax(ds))})")
    if max_side is not None:
        out = images.shrink(out, max_side)
    return out


def load_dicom_file(path: str | Path, max_side: int | None = None) -> FloatImage:
    """Read a DICOM file, check its scope and return its normalised image.

    Raises
    ------
    NotProcessable
        ``not_dicom`` when the file cannot be parsed, else as :func:`check_scope` and
        :func:`read_pixels`.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        # force=True accepts any bytes: touch the header to make a non-DICOM file fail here.
        if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
            raise ValueError("no SOP Class UID, Modality or Pixel Data")
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage
        raise NotProcessable("not_dicom", f"file cannot be parsed as DICOM "
                             f"({type(exc).__name__})") from exc
    check_scope(ds)
    return read_pixels(ds, max_side=max_side)

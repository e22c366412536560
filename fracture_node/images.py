"""Grey-level images as the model sees them: normalisation and aspect-keeping resize.

This module is the single contract between every source of pixels (DICOM in
:mod:`fracture_node.dicom.pixels`, PNG/JPEG files for ``predict`` and training) and the model.
Every source ends in :func:`normalize`, so the same picture gives the same model input whatever
encoding, bit depth, rescale or polarity carried it (a linear change of grey levels cancels out).
No torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from fracture_node.errors import NotProcessable

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Percentiles are estimated on at most this many pixels (a strided sample), which keeps the cost
# independent of the image size and gives identical results for identical images.
_PERCENTILE_SAMPLE = 262_144

FloatImage = NDArray[np.float32]
_EXIF_ORIENTATION = 0x0112


def normalize(image: NDArray[np.generic]) -> FloatImage:
    """Map grey levels linearly to [0, 1] between robust low and high percentiles, clipped.

    Parameters
    ----------
    image:
        A 2-D array of grey levels, bright meaning dense (bone), any numeric dtype.

    Returns
    -------
    A float32 array of the same shape in [0, 1].
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey-level image, got shape {image.shape}")
    data = np.asarray(image, dtype=np.float32)
    flat = data.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    low, high = np.percentile(flat[::step], [LOW_PERCENTILE, HIGH_PERCENTILE])
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 1e-6:
        low, high = float(np.min(flat)), float(np.max(flat))
    if high - low <= 1e-6:
        return np.zeros_like(data, dtype=np.float32)
    out = (data - np.float32(low)) * np.float32(1.0 / (high - low))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def is_blank(image: FloatImage) -> bool:
    """True for a :func:`normalize` output whose source had one grey level everywhere.

    :func:`normalize` maps the robust range to [0, 1], so every pixel is 0 only then: a blank
    exposure or an empty frame, nothing a probability could be about (reason ``blank_image``).
    """
    return not image.any()


def shrink(image: FloatImage, max_side: int) -> FloatImage:
    """Downscale (never upscale) so that the longest side is at most ``max_side``, keeping aspect."""
    h, w = image.shape
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image, mode="F").resize(size, Image.Resampling.BILINEAR),
                      dtype=np.float32)


def letterbox(image: FloatImage, size: int) -> FloatImage:
    """Resize to fit a ``size`` x ``size`` square keeping the aspect ratio; pad with 0, centred."""
    h, w = image.shape
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize(
            (nw, nh), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def load_image_file(path: str | Path) -> FloatImage:
    """Read a PNG/JPEG/TIFF/BMP file as a normalised grey-level image.

    An EXIF orientation tag (a photo or an export that stores the picture sideways) is applied,
    so the model sees the image as a viewer shows it. Colour images are converted to luminance;
    16-bit PNGs keep their depth. Raises
    :class:`~fracture_node.errors.NotProcessable` (reason ``undecodable``) when the file cannot be
    read.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            img: Image.Image = opened
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise NotProcessable("undecodable", f"{Path(path).name}: cannot decode image ({exc})") from None
    if arr.ndim != 2:
        arr = arr[..., 0]
    return normalize(arr)

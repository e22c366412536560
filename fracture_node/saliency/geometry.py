"""Saliency geometry: model-input maps to source-image maps, regions and points, no torch.

:class:`Letterbox` is the exact inverse of :func:`fracture_node.images.letterbox` (scale per axis
and centring offset), used by :func:`heatmap_to_source` (a map in source pixels),
:func:`peak_point` and :func:`find_regions` (connected components above a threshold, as boxes in
source pixels with their peak value). Coordinates are continuous pixel coordinates: pixel
``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``, so its centre is
``(col + 0.5, row + 0.5)``. :class:`Region` is the one representation of a region everywhere
(the worker's record, the SR, the overlays, ``predict``). The localisation scores
(:func:`box_iou`, :func:`point_in_boxes`, :func:`wilson_interval`) serve the benchmarks and the
model card.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from fracture_node.saliency.defaults import DEFAULT_MAX_REGIONS, DEFAULT_THRESHOLD

MIN_REGION_FRACTION = 0.002
"""Components smaller than this fraction of the image area are dropped (noise)."""


# Geometry: model input <-> source image -----------------------------------------------------


@dataclass(frozen=True)
class Letterbox:
    """Where a ``height`` x ``width`` source image lies in the ``size`` x ``size`` model input.

    The same arithmetic as :func:`fracture_node.images.letterbox`: scale ``size / max(h, w)``,
    rounded content size ``nw`` x ``nh``, centred at offset ``(left, top)``.
    """

    size: int
    height: int
    width: int
    top: int
    left: int
    nh: int
    nw: int

    @classmethod
    def of(cls, source_shape: tuple[int, int], size: int) -> Letterbox:
        h, w = int(source_shape[0]), int(source_shape[1])
        if h < 1 or w < 1:
            raise ValueError(f"source shape {source_shape} has an empty side")
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        return cls(size=size, height=h, width=w, top=(size - nh) // 2, left=(size - nw) // 2,
                   nh=nh, nw=nw)

    @property
    def scale_x(self) -> float:
        """Source pixels per model-input pixel, horizontally."""
        return self.width / self.nw

    @property
    def scale_y(self) -> float:
        return self.height / self.nh

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """A point in model-input coordinates to source coordinates (continuous)."""
        return (x - self.left) * self.scale_x, (y - self.top) * self.scale_y

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """A point in source coordinates to model-input coordinates (continuous)."""
        return x / self.scale_x + self.left, y / self.scale_y + self.top

    def crop(self, heatmap: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
        """The part of a model-input map that covers the source image."""
        if heatmap.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size} x {self.size} map, got {heatmap.shape}")
        return np.asarray(heatmap[self.top : self.top + self.nh, self.left : self.left + self.nw],
                          dtype=np.float32)


def _normalised_crop(heatmap: NDArray[np.floating[Any]], box: Letterbox) -> NDArray[np.float32]:
    crop = np.clip(box.crop(heatmap), 0.0, None)
    peak = float(crop.max()) if crop.size else 0.0
    return crop / peak if peak > 0 else np.zeros_like(crop)


def heatmap_to_source(heatmap: NDArray[np.floating[Any]], source_shape: tuple[int, int],
                      input_size: int | None = None) -> NDArray[np.float32]:
    """A model-input heat map as a map over the source image ``[H, W]``, in [0, 1].

    The letterbox padding is cut off, the rest resized (bilinear) to the source size and divided
    by its maximum over the image (so the maximum is 1, or the map is all zero).
    """
    size = int(input_size or heatmap.shape[0])
    box = Letterbox.of(source_shape, size)
    crop = _normalised_crop(heatmap, box)
    if crop.max() <= 0:
        return np.zeros((box.height, box.width), dtype=np.float32)
    resized = np.clip(np.asarray(Image.fromarray(np.ascontiguousarray(crop), mode="F").resize(
        (box.width, box.height), Image.Resampling.BILINEAR), dtype=np.float32), 0.0, None)
    peak = float(resized.max())
    return resized / peak if peak > 0 else resized


def peak_point(heatmap: NDArray[np.floating[Any]], source_shape: tuple[int, int],
               input_size: int | None = None) -> tuple[float, float] | None:
    """The source coordinates ``(x, y)`` of the map's maximum over the image; None if all zero."""
    size = int(input_size or heatmap.shape[0])
    box = Letterbox.of(source_shape, size)
    crop = box.crop(heatmap)
    if crop.size == 0 or float(crop.max()) <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(crop)), crop.shape)
    return box.to_source(box.left + col + 0.5, box.top + row + 0.5)


@dataclass(frozen=True)
class Region:
    """A connected area of the heat map above the threshold, in source-image pixels.

    ``x0, y0, x1, y1`` bound it (continuous coordinates, ``x1``/``y1`` exclusive edges);
    ``peak`` is its maximum (relative to the image's maximum, so 1.0 for the hottest region) at
    ``(peak_x, peak_y)``; ``area`` is its area in source pixels.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    peak: float
    peak_x: float
    peak_y: float
    area: float

    @classmethod
    def from_box(cls, x0: float, y0: float, x1: float, y1: float, peak: float) -> Region:
        """A rectangular region ``[x0, x1] x [y0, y1]`` (source pixels), its peak at the centre."""
        x0, y0, x1, y1 = float(x0), float(y0), float(x1), float(y1)
        return cls(x0=x0, y0=y0, x1=x1, y1=y1, peak=float(peak), peak_x=(x0 + x1) / 2,
                   peak_y=(y0 + y1) / 2, area=max(0.0, x1 - x0) * max(0.0, y1 - y0))

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1

    def polygon(self) -> NDArray[np.float32]:
        """The bounding box as a closed polyline ``[5, 2]`` of ``(column, row)`` points."""
        return np.array([[self.x0, self.y0], [self.x1, self.y0], [self.x1, self.y1],
                         [self.x0, self.y1], [self.x0, self.y0]], dtype=np.float32)


@dataclass(frozen=True)
class _Runs:
    """The horizontal runs of a boolean mask in raster order, with their component numbers."""

    rows: NDArray[np.intp]
    starts: NDArray[np.intp]
    """First column of each run."""
    ends: NDArray[np.intp]
    """One past the last column of each run."""
    component: NDArray[np.intp]
    """1..count, numbered in raster order of each component's first pixel."""
    count: int


def _component_runs(mask: NDArray[np.bool_]) -> _Runs:
    """4-connected components of ``mask`` as runs (see :func:`label_components`).

    Runs of adjacent rows that share a column are found with two sorted searches (no loop over
    rows) and joined with union-find, so the Python work grows with the number of joins.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    empty = np.zeros(0, dtype=np.intp)
    if h == 0 or w == 0 or not mask.any():
        return _Runs(empty, empty, empty, empty, 0)
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    # Run a (row r - 1) and run b (row r) share a column when start_a < end_b and start_b <
    # end_a. On one line of all rows (key = row * stride + column) both the starts and the ends
    # increase, so the runs of the row above that b touches are one slice [lo, hi).
    stride = w + 1
    at = np.flatnonzero(edges)
    rising = edges.reshape(-1)[at] > 0
    start_keys, end_keys = at[rising], at[~rising]  # alternate within each row
    rows, starts = np.divmod(start_keys, stride)
    ends = end_keys - rows * stride
    above = (rows - 1) * stride
    lo = np.searchsorted(end_keys, above + starts, side="right")
    hi = np.searchsorted(start_keys, above + ends, side="left")
    joins = np.maximum(hi - lo, 0)
    parent = list(range(len(rows)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if joins.any():
        b_of = np.repeat(np.arange(len(rows)), joins)
        a_of = np.repeat(lo - np.cumsum(joins) + joins, joins) + np.arange(int(joins.sum()))
        for a, b in zip(a_of.tolist(), b_of.tolist(), strict=True):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = [find(k) for k in range(len(parent))]
    numbers: dict[int, int] = {}
    component = np.fromiter((numbers.setdefault(root, len(numbers) + 1) for root in roots),
                            dtype=np.intp, count=len(roots))
    return _Runs(rows.astype(np.intp), starts.astype(np.intp), ends.astype(np.intp), component,
                 len(numbers))


def label_components(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """4-connected components of a boolean mask: labels (0 = background, 1..n) and n.

    Run-based: the runs of each row are joined (union-find) with the runs of the row above that
    share a column, so the cost grows with the number of runs, not of pixels. Labels are numbered
    in raster order of each component's first pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    runs = _component_runs(mask)
    for r, a, b, k in zip(runs.rows.tolist(), runs.starts.tolist(), runs.ends.tolist(),
                          runs.component.tolist(), strict=True):
        labels[r, a:b] = k
    return labels, runs.count


def find_regions(heatmap: NDArray[np.floating[Any]], source_shape: tuple[int, int],
                 input_size: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                 max_regions: int = DEFAULT_MAX_REGIONS,
                 min_fraction: float = MIN_REGION_FRACTION) -> list[Region]:
    """Connected regions where the map reaches ``threshold`` of its maximum, in source pixels.

    Components are found on the model-input grid (cheap; exact up to one model pixel, i.e.
    ``max(H, W) / S`` source pixels) and their bounding boxes mapped back through the letterbox.
    Each component's extent, area and peak (its first hottest pixel in raster order) come from
    its runs (:func:`_component_runs`), without a pass over the whole map per component.

    Parameters
    ----------
    heatmap:
        One ``[S, S]`` map from :meth:`Explainer.explain_batch`.
    source_shape:
        ``(rows, columns)`` of the source image that was letterboxed.
    threshold:
        Fraction of the map's maximum over the image, in (0, 1].
    max_regions:
        Keep at most this many, hottest first.
    min_fraction:
        Drop components smaller than this fraction of the image (unless it is the hottest).

    Returns
    -------
    Regions sorted by peak, hottest first; empty when the map is all zero.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside (0, 1]")
    size = int(input_size or heatmap.shape[0])
    box = Letterbox.of(source_shape, size)
    crop = _normalised_crop(heatmap, box)
    if crop.max() <= 0:
        return []
    runs = _component_runs(crop >= threshold)
    count = runs.count
    lengths = runs.ends - runs.starts
    k = runs.component - 1
    area = np.bincount(k, weights=lengths, minlength=count)
    row0 = np.full(count, crop.shape[0], dtype=np.intp)
    row1 = np.full(count, -1, dtype=np.intp)
    col0 = np.full(count, crop.shape[1], dtype=np.intp)
    col1 = np.full(count, -1, dtype=np.intp)
    np.minimum.at(row0, k, runs.rows)
    np.maximum.at(row1, k, runs.rows)
    np.minimum.at(col0, k, runs.starts)
    np.maximum.at(col1, k, runs.ends - 1)
    # Every run's pixels, one after the other: the hottest of each run, then of each component.
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    pixels = (np.repeat(runs.rows * crop.shape[1] + runs.starts - offsets, lengths)
              + np.arange(int(lengths.sum())))
    values = crop.reshape(-1)[pixels]
    run_peak = np.maximum.reduceat(values, offsets)
    peak = np.full(count, -np.inf, dtype=np.float64)
    np.maximum.at(peak, k, run_peak)
    pixel_area = box.scale_x * box.scale_y
    regions: list[Region] = []
    for c in range(count):
        # The first run (raster order) that holds the component's peak, then its first pixel.
        run = int(np.flatnonzero((k == c) & (run_peak == peak[c]))[0])
        first = int(offsets[run])
        at = int(np.argmax(values[first : first + int(lengths[run])]))
        row, col = int(runs.rows[run]), int(runs.starts[run]) + at
        x0, y0 = box.to_source(box.left + int(col0[c]), box.top + int(row0[c]))
        x1, y1 = box.to_source(box.left + int(col1[c]) + 1, box.top + int(row1[c]) + 1)
        px, py = box.to_source(box.left + col + 0.5, box.top + row + 0.5)
        regions.append(Region(
            x0=max(0.0, x0), y0=max(0.0, y0), x1=min(float(box.width), x1),
            y1=min(float(box.height), y1), peak=float(values[first + at]), peak_x=px, peak_y=py,
            area=float(int(area[c]) * pixel_area)))
    regions.sort(key=lambda r: (-r.peak, -r.area))
    image_area = float(box.height * box.width)
    kept = [r for i, r in enumerate(regions) if i == 0 or r.area >= min_fraction * image_area]
    return kept[:max_regions]


def heatmap_png(heatmap: NDArray[np.floating[Any]]) -> bytes:
    """A heat map as an 8-bit grey PNG (a 384 x 384 map takes a few kB), to keep beside results.

    Written with zlib's default effort: ``optimize`` made the worker's 64 x 64 maps 3% smaller
    (827 against 851 bytes on val maps) for 2.5-5x the time (0.5-1.0 ms against 0.2 ms each).
    """
    grey = np.round(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0) * 255)
    out = io.BytesIO()
    Image.fromarray(grey.astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def heatmap_from_png(data: bytes) -> NDArray[np.float32]:
    """The heat map written by :func:`heatmap_png`, in [0, 1] (8-bit precision)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


# Localisation scores (benchmarks, model card) -----------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def point_in_boxes(point: tuple[float, float] | None, boxes: Sequence[Sequence[float]],
                   tolerance: float = 0.0) -> bool:
    """The pointing game's hit: the point lies in a box (grown by ``tolerance`` pixels)."""
    if point is None:
        return False
    x, y = point
    return any(b[0] - tolerance <= x <= b[2] + tolerance and b[1] - tolerance <= y <= b[3]
               + tolerance for b in boxes)


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

"""Saliency records: where the model looked on one image, as kept in ``results.saliency``.

The worker makes a :class:`SaliencyRecord` from the heat map that
:meth:`fracture_node.ml.explain.Explainer.explain_batch` (or the ONNX graph's evidence output)
returns (model-input coordinates) and the
image's source shape; the reporter reads it back to write the SR's regions and to draw the
overlays. Stored as one JSON object (``docs/audit.md`` shows the fields and SQL to query them)::

    {"version": 1, "method": "hirescam", "layer": "last", "threshold": 0.5,
     "input_size": 384, "source_shape": [rows, columns],
     "heatmap": {"encoding": "png_base64", "size": 64, "data": "iVBORw0..."},
     "regions": [{"box": [x0, y0, x1, y1], "peak": 1.0, "peak_point": [x, y], "area": 1234.5}]}

Regions are in source-image pixels (continuous coordinates: the top-left corner of the first
pixel is ``(0, 0)``; ``x`` is the column), hottest first. The heat map is the model-input map
(``input_size`` square, letterbox included) shrunk to ``size`` x ``size`` (at most 64: the
maps are bicubic upsamplings of a 12 x 12 to 32 x 32 grid, so little is lost) and kept as an
8-bit PNG, about 2 kB; :meth:`SaliencyRecord.source_map` turns it back into a map over the image.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from fracture_node.saliency.geometry import (
    Region,
    find_regions,
    heatmap_from_png,
    heatmap_png,
    heatmap_to_source,
)

FORMAT_VERSION = 1
STORED_GRID = 64
"""Side of the stored heat map (smaller when the model input is smaller)."""


@dataclass(frozen=True)
class SaliencyRecord:
    """Where the model looked on one image (see the module docstring for the JSON)."""

    method: str
    layer: str
    threshold: float
    input_size: int
    source_shape: tuple[int, int]
    heatmap: NDArray[np.float32]
    """The model-input map shrunk to ``[g, g]``, values in [0, 1]."""
    regions: tuple[Region, ...]

    @classmethod
    def from_map(cls, heatmap: NDArray[np.floating[Any]], source_shape: tuple[int, int], *,
                 method: str, layer: str, threshold: float, max_regions: int
                 ) -> SaliencyRecord:
        """Regions (:func:`find_regions`) and the shrunk map of one ``[S, S]`` model-input map."""
        size = int(heatmap.shape[0])
        shape = (int(source_shape[0]), int(source_shape[1]))
        regions = find_regions(heatmap, shape, threshold=threshold,
                               max_regions=max_regions) if max_regions > 0 else []
        grid = min(STORED_GRID, size)
        small = np.asarray(heatmap, dtype=np.float32)
        if grid != size:
            small = np.asarray(Image.fromarray(np.ascontiguousarray(small), mode="F").resize(
                (grid, grid), Image.Resampling.BILINEAR), dtype=np.float32)
        return cls(
            method=method, layer=layer, threshold=float(threshold), input_size=size,
            source_shape=shape, heatmap=np.clip(small, 0.0, 1.0),
            regions=tuple(Region(
                x0=_r(r.x0), y0=_r(r.y0), x1=_r(r.x1), y1=_r(r.y1), peak=round(float(r.peak), 4),
                peak_x=_r(r.peak_x), peak_y=_r(r.peak_y), area=_r(r.area)) for r in regions))

    def to_json(self) -> str:
        return json.dumps({
            "version": FORMAT_VERSION, "method": self.method, "layer": self.layer,
            "threshold": self.threshold, "input_size": self.input_size,
            "source_shape": list(self.source_shape),
            "heatmap": {"encoding": "png_base64", "size": int(self.heatmap.shape[0]),
                        "data": base64.b64encode(heatmap_png(self.heatmap)).decode("ascii")},
            "regions": [{"box": [r.x0, r.y0, r.x1, r.y1], "peak": r.peak,
                         "peak_point": [r.peak_x, r.peak_y], "area": r.area}
                        for r in self.regions],
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SaliencyRecord:
        """Read a stored record.

        Raises
        ------
        ValueError
            Not a record of a known version (the message quotes no value).
        """
        try:
            raw = json.loads(text)
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"saliency record version {raw.get('version')!r} is unknown")
            heat = raw["heatmap"]
            if heat.get("encoding") != "png_base64":
                raise ValueError("saliency heat map encoding is unknown")
            regions = tuple(
                Region(x0=float(r["box"][0]), y0=float(r["box"][1]),
                             x1=float(r["box"][2]), y1=float(r["box"][3]), peak=float(r["peak"]),
                             peak_x=float(r["peak_point"][0]), peak_y=float(r["peak_point"][1]),
                             area=float(r["area"]))
                for r in raw["regions"])
            rows, cols = (int(v) for v in raw["source_shape"])
            return cls(method=str(raw["method"]), layer=str(raw["layer"]),
                       threshold=float(raw["threshold"]), input_size=int(raw["input_size"]),
                       source_shape=(rows, cols),
                       heatmap=heatmap_from_png(base64.b64decode(heat["data"], validate=True)),
                       regions=regions)
        except (KeyError, TypeError, IndexError, AttributeError, binascii.Error, OSError,
                json.JSONDecodeError) as exc:
            raise ValueError(f"saliency record is malformed ({type(exc).__name__})") from None

    def model_map(self) -> NDArray[np.float32]:
        """The heat map back at model-input size ``[S, S]`` (bilinear)."""
        if self.heatmap.shape[0] == self.input_size:
            return self.heatmap.astype(np.float32, copy=False)
        return np.clip(np.asarray(Image.fromarray(np.ascontiguousarray(self.heatmap), mode="F")
                                  .resize((self.input_size, self.input_size),
                                          Image.Resampling.BILINEAR), dtype=np.float32),
                       0.0, 1.0)

    def source_map(self) -> NDArray[np.float32]:
        """The heat map over the source image ``[rows, columns]``, maximum 1 (or all zero)."""
        return heatmap_to_source(self.model_map(), self.source_shape, self.input_size)


def _r(value: float) -> float:
    return round(float(value), 2)

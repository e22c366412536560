"""``fracture-node predict --saliency DIR``: one overlay PNG per input, where the model looked.

Each readable input gives ``DIR/<name>.saliency.png``: the image as the model read it (normalised
grey levels, full size), the saliency heat map blended in, the regions above the threshold
outlined with their peak value, and the probability in the caption. Unreadable inputs are
skipped (the CSV of ``predict`` says why). Names that collide get ``-2``, ``-3``... appended.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fracture_node.dicom.overlay import render_overlay
from fracture_node.dicom.wording import percent_text
from fracture_node.errors import NotProcessable
from fracture_node.images import FloatImage
from fracture_node.inputs import load_any
from fracture_node.logs import get_logger
from fracture_node.ml.explain import Explainer
from fracture_node.saliency.defaults import DEFAULT_MAX_REGIONS, DEFAULT_METHOD, DEFAULT_THRESHOLD
from fracture_node.saliency.geometry import find_regions, heatmap_to_source

log = get_logger("predict.saliency")

SUFFIX = ".saliency.png"


def _output_name(path: Path, taken: set[str]) -> str:
    stem = path.stem or "image"
    name, n = f"{stem}{SUFFIX}", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}{SUFFIX}"
    taken.add(name)
    return name


class OverlayWriter:
    """Writes overlay PNGs into one folder, giving colliding names ``-2``, ``-3``..."""

    def __init__(self, out_dir: Path, cut: float, operating_point: str, *,
                 method: str = DEFAULT_METHOD, threshold: float = DEFAULT_THRESHOLD,
                 max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.cut = float(cut)
        self.operating_point = operating_point
        self.method = method
        self.threshold = threshold
        self.max_regions = max_regions
        self._taken: set[str] = set()

    def write(self, path: Path, image: FloatImage, heat: np.ndarray, probability: float) -> Path:
        """The overlay of one input (``heat``: its model-input map); returns the PNG written."""
        return _write_one(self.out_dir / _output_name(path, self._taken), image, heat,
                          float(probability), self.cut, self.operating_point, self.threshold,
                          self.max_regions)


def write_overlays(paths: Iterable[Path], classifier: Any, out_dir: Path, *,
                   method: str = DEFAULT_METHOD, threshold: float = DEFAULT_THRESHOLD,
                   max_regions: int = DEFAULT_MAX_REGIONS, batch_size: int = 8,
                   operating_point: str = "balanced") -> dict[Path, Path]:
    """Write one overlay PNG per readable input into ``out_dir``.

    ``predict`` itself scores and draws in one pass (:class:`OverlayWriter`); this is the same
    for a list of files, for callers that want only the pictures.

    Parameters
    ----------
    paths:
        Image or DICOM files (read like ``predict`` does).
    classifier:
        A loaded :class:`fracture_node.ml.infer.Classifier`.
    out_dir:
        Created if needed.
    method, threshold, max_regions:
        Saliency method and region extraction (see :mod:`fracture_node.ml.explain`).
    operating_point:
        Names the threshold written in the caption (positive / negative).

    Returns
    -------
    Input path -> PNG written, for the inputs that could be read.
    """
    explainer = Explainer(classifier, method=method)
    writer = OverlayWriter(out_dir, float(classifier.threshold(operating_point)), operating_point,
                           method=method, threshold=threshold, max_regions=max_regions)
    files = list(paths)
    written: dict[Path, Path] = {}
    for start in range(0, len(files), max(1, batch_size)):
        chunk: list[tuple[Path, FloatImage]] = []
        for path in files[start : start + batch_size]:
            try:
                chunk.append((path, load_any(path)))
            except NotProcessable as exc:
                log.warning("saliency_input_skipped", file=path.name, reason=exc.reason)
        if not chunk:
            continue
        batch = np.stack([classifier.prepare(img) for _, img in chunk])
        probabilities, maps = explainer.explain_batch(batch)
        for (path, img), p, heat in zip(chunk, probabilities, maps, strict=True):
            written[path] = writer.write(path, img, heat, float(p))
    log.info("saliency_written", images=len(written), out_dir=str(out_dir), method=method)
    return written


def overlay_caption(probability: float, cut: float, operating_point: str) -> str:
    """The PNG's caption: the probability as the SR states it, the decision and its threshold."""
    label = "fractured" if probability >= cut else "normal"
    return (f"AI fracture {percent_text(probability)}: {label} ({operating_point} threshold "
            f"{percent_text(cut)}) - UNVERIFIED, not for diagnosis")


def _write_one(target: Path, image: FloatImage, heat: np.ndarray, probability: float,
               cut: float, operating_point: str, threshold: float, max_regions: int) -> Path:
    regions = find_regions(heat, image.shape, threshold=threshold, max_regions=max_regions)
    caption = overlay_caption(probability, cut, operating_point)
    pixels = render_overlay(image, heatmap_to_source(heat, image.shape), regions, caption)
    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")
    tmp.replace(target)
    return target

"""``fracture-node predict``: score image and DICOM files offline and write a CSV.

Every input gets one row; an input that cannot be read gets ``status=not_processed`` and the
reason, never a crash. As in the daemon, an image with a side shorter than ``--min-side`` pixels
(default 64, ``[scope] min_side``) is a thumbnail or an icon, not a radiograph of the kind the
model learned (reason ``too_small``), and an image whose pixels all have one grey level is blank
(reason ``blank_image``): neither gets a probability. Inputs are found and read by
:mod:`fracture_node.inputs`: DICOM files (``.dcm`` or a ``DICM`` preamble) through
:func:`fracture_node.dicom.pixels.load_dicom_file`, other files through
:func:`fracture_node.images.load_image_file`.

Where the model looked: with ``--locate`` (columns only) or ``--saliency DIR`` (columns and an
overlay PNG per image), each scored row also gets ``peak_x`` and ``peak_y``, the maximum of the
saliency map in the source image's pixels (continuous coordinates: origin at the top-left corner
of the image, x to the right, y down; the centre of pixel ``(col, row)`` is
``(col + 0.5, row + 0.5)``; for an image file, the image as a viewer shows it, EXIF orientation
applied), and ``regions``, the regions above the saliency threshold as a JSON list of
``[x0, y0, x1, y1]`` boxes in the same coordinates, hottest first. Scores and maps come from one
pass of the model per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fracture_node.config import ScopeConfig
from fracture_node.errors import FractureNodeError, NotProcessable
from fracture_node.images import FloatImage, is_blank
from fracture_node.inputs import iter_inputs, load_any
from fracture_node.logs import configure, get_logger

log = get_logger("predict")

COLUMNS = ("path", "probability", "label", "threshold", "operating_point", "model_sha256",
           "status", "reason")
LOCATION_COLUMNS = ("peak_x", "peak_y", "regions")
"""Added after :data:`COLUMNS` when ``--locate`` or ``--saliency`` is given."""


def _min_side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1-4096)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fracture-node predict", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path,
                   help="files or folders (recursed); PNG/JPEG exported as a viewer shows them, "
                        "bone bright")
    p.add_argument("--output", type=Path, default=Path("-"),
                   help="CSV to write; - (the default) is standard output, with the log on "
                        "standard error")
    p.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--engine", default="auto",
                   choices=["auto", "torch", "openvino", "onnxruntime"],
                   help="what runs the network (as [model] engine): auto takes openvino (else "
                        "onnxruntime) on the CPU, exporting <model>.onnx beside the model file "
                        "when needed")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of the engine (0: its default)")
    p.add_argument("--operating-point", default="balanced",
                   help="balanced, high_sensitivity, or a probability threshold")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--min-side", type=_min_side, default=ScopeConfig().min_side, metavar="PX",
                   help="an image with a shorter side is not scored (reason too_small), as "
                        "[scope] min_side in the daemon (default %(default)s; 1 scores all)")
    p.add_argument("--saliency", type=Path, default=None, metavar="DIR",
                   help="also write an overlay PNG per image (heat map and regions) into DIR; "
                        "implies --locate")
    p.add_argument("--locate", action="store_true",
                   help="add where the model looked to each row: peak_x, peak_y (source "
                        "pixels, origin top left) and regions (JSON [x0, y0, x1, y1] boxes)")
    return p.parse_args(argv)


@dataclass
class _Input:
    """One input after decoding: the model's array, the source shape, the image if kept."""

    prepared: np.ndarray | None
    shape: tuple[int, int] = (0, 0)
    image: FloatImage | None = None
    reason: str = ""
    message: str = ""


def _prepare(args: tuple[Path, Any, bool, int]) -> _Input:
    path, clf, keep_image, min_side = args
    try:
        img = load_any(path)
        if min(img.shape) < min_side:
            raise NotProcessable("too_small", f"{path.name}: {img.shape[0]} x {img.shape[1]} "
                                 f"pixels is smaller than --min-side {min_side}")
        if is_blank(img):
            raise NotProcessable("blank_image", f"{path.name}: every pixel has the same grey level")
        return _Input(clf.prepare(img), (int(img.shape[0]), int(img.shape[1])),
                      img if keep_image else None)
    except NotProcessable as exc:
        return _Input(None, reason=exc.reason, message=str(exc))
    except Exception as exc:  # one bad input never stops the others
        return _Input(None, reason="error", message=f"{path.name}: {type(exc).__name__}: {exc}")


def location_columns(heat: np.ndarray, shape: tuple[int, int], threshold: float,
                     max_regions: int) -> dict[str, str]:
    """``peak_x``, ``peak_y`` and ``regions`` of one model-input map, in source pixels."""
    from fracture_node.saliency.geometry import find_regions, peak_point

    peak = peak_point(heat, shape)
    regions = find_regions(heat, shape, threshold=threshold, max_regions=max_regions)
    return {
        "peak_x": "" if peak is None else f"{peak[0]:.1f}",
        "peak_y": "" if peak is None else f"{peak[1]:.1f}",
        "regions": json.dumps([[round(v, 1) for v in r.box] for r in regions],
                              separators=(",", ":")),
    }


def run(args: argparse.Namespace) -> tuple[int, int]:
    """Write the CSV; return (processed, not processed)."""
    from fracture_node.ml.explain import Explainer
    from fracture_node.ml.infer import Classifier
    from fracture_node.saliency.defaults import (
        DEFAULT_LAYER,
        DEFAULT_MAX_REGIONS,
        DEFAULT_METHOD,
        DEFAULT_THRESHOLD,
    )

    locate = bool(args.locate or args.saliency is not None)
    clf = Classifier.load(args.model, device=args.device, engine=args.engine,
                          threads=args.threads,
                          saliency=(DEFAULT_METHOD, DEFAULT_LAYER) if locate else None)
    threshold = clf.threshold(args.operating_point)
    explainer = Explainer(clf, method=DEFAULT_METHOD) if locate else None
    overlays = None
    if args.saliency is not None:
        from fracture_node.cli.predict_saliency import OverlayWriter

        overlays = OverlayWriter(args.saliency, threshold, args.operating_point,
                                 method=DEFAULT_METHOD, threshold=DEFAULT_THRESHOLD,
                                 max_regions=DEFAULT_MAX_REGIONS)
    files = list(iter_inputs(args.paths))
    to_stdout = str(args.output) == "-"
    if not to_stdout:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    ok = bad = drawn = 0
    with (contextlib.nullcontext(sys.stdout) if to_stdout
          else args.output.open("w", newline="")) as fh, \
            ThreadPoolExecutor(max(1, args.workers)) as pool:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + (LOCATION_COLUMNS if locate else ()))
        writer.writeheader()
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            prepared = list(pool.map(_prepare, [(f, clf, overlays is not None, args.min_side)
                                              for f in chunk]))
            good = [i for i, item in enumerate(prepared) if item.prepared is not None]
            probs: dict[int, float] = {}
            maps: dict[int, np.ndarray] = {}
            if good:
                batch = np.stack([prepared[i].prepared for i in good])  # type: ignore[misc]
                if explainer is not None:
                    p_batch, heat = explainer.explain_batch(batch)
                    maps = dict(zip(good, heat, strict=True))
                else:
                    p_batch = clf.predict_batch(batch)
                probs = {i: float(p) for i, p in zip(good, p_batch, strict=True)}
            for i, path in enumerate(chunk):
                row = {"path": str(path), "threshold": f"{threshold:.6f}",
                       "operating_point": args.operating_point, "model_sha256": clf.sha256}
                item = prepared[i]
                if i in probs:
                    row.update(probability=f"{probs[i]:.6f}",
                               label="fractured" if probs[i] >= threshold else "normal",
                               status="ok", reason="")
                    if i in maps:
                        row.update(location_columns(maps[i], item.shape, DEFAULT_THRESHOLD,
                                                    DEFAULT_MAX_REGIONS))
                        if overlays is not None and item.image is not None:
                            overlays.write(path, item.image, maps[i], probs[i])
                            drawn += 1
                    ok += 1
                else:
                    row.update(probability="", label="", status="not_processed",
                               reason=item.reason)
                    log.warning("input_not_processed", file=path.name, reason=item.reason,
                                detail=item.message)
                    bad += 1
                writer.writerow(row)
    log.info("predict_done", processed=ok, not_processed=bad,
             output="stdout" if to_stdout else str(args.output), model_sha256=clf.sha256,
             operating_point=args.operating_point, threshold=threshold,
             saliency_method=DEFAULT_METHOD if locate else None)
    if overlays is not None:
        log.info("saliency_written", images=drawn, folder=str(args.saliency))
    return ok, bad


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # The log goes to stderr: stdout may be the CSV (and is a terminal's, for people).
    configure(stream=sys.stderr)
    try:
        run(args)
    except FractureNodeError as exc:
        log.error("predict_failed", error=str(exc))
        print(f"fracture-node predict: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

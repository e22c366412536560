"""Localisation of the saliency maps on the FracAtlas fracture boxes, as JSON.

Usage: ``python benchmarks/saliency.py --model F [--split test] [--methods gradcam,hirescam]
[--layers last,stride16] [--threshold 0.5]``.

For every image of the split that has boxes in ``boxes.csv`` (FracAtlas fractured images, boxes
in stored-image pixels), the image goes through the daemon's path (``load_image_file``,
``Classifier.prepare``, :class:`fracture_node.ml.explain.Explainer`) and is scored by:

* pointing game: the map's maximum over the image lies inside one of the image's boxes
  (``hit_rate``, with a Wilson 95% interval; ``hit_rate_tol15`` allows 15 source pixels, the
  tolerance of Zhang et al. 2016);
* ``mean_iou``: IoU of the top region's bounding box (:func:`find_regions` at ``--threshold``)
  with the best-matching box, 0 when there is no region; ``iou_ge_0_1`` the share above 0.1;
* ``centre_baseline_hit_rate``: the pointing game played by the image centre, for scale.

``overhead`` times ``predict_batch`` against ``explain_batch`` (primary method) on one batch of
these images: median of ``--repeats`` alternating runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fracture_node.images import load_image_file
from fracture_node.logs import configure
from fracture_node.ml.explain import Explainer
from fracture_node.ml.infer import Classifier
from fracture_node.saliency.defaults import (
    DEFAULT_LAYER,
    DEFAULT_METHOD,
    DEFAULT_THRESHOLD,
    METHODS,
)
from fracture_node.saliency.geometry import (
    box_iou,
    find_regions,
    peak_point,
    point_in_boxes,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "datasets" / "fracture-xr"


def load_boxes(data: Path, split: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Boxes per image file of ``split``, in stored-image pixels."""
    with (data / "labels.csv").open() as fh:
        splits = {r["file"]: r["split"] for r in csv.DictReader(fh)}
    boxes: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    with (data / "boxes.csv").open() as fh:
        for r in csv.DictReader(fh):
            if splits.get(r["file"]) == split:
                boxes[r["file"]].append(
                    (float(r["x0"]), float(r["y0"]), float(r["x1"]), float(r["y1"])))
    return dict(sorted(boxes.items()))


def score(hits: list[bool], hits_tol: list[bool], ious: list[float]) -> dict[str, Any]:
    n = len(hits)
    low, high = wilson_interval(sum(hits), n)
    return {
        "images": n, "hits": sum(hits), "hit_rate": round(sum(hits) / n, 4) if n else None,
        "hit_ci95": [round(low, 4), round(high, 4)],
        "hit_rate_tol15": round(sum(hits_tol) / n, 4) if n else None,
        "mean_iou": round(float(np.mean(ious)), 4) if n else None,
        "iou_ge_0_1": round(float(np.mean([i >= 0.1 for i in ious])), 4) if n else None,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", default=DEFAULT_LAYER)
    p.add_argument("--method", default=DEFAULT_METHOD, help="the primary method (overhead)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--iou-thresholds", default="",
                   help="also report mean IoU at these region thresholds, e.g. 0.3,0.5,0.7")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--repeats", type=int, default=5, help="overhead timing runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    configure(level="warning")  # stdout carries the JSON only
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    layers = [x for x in args.layers.split(",") if x]
    clf = Classifier.load(args.model, device=args.device)
    threshold = clf.threshold("balanced")
    boxes = load_boxes(args.data, args.split)
    files = list(boxes)[: args.limit or None]
    explainers = {layer: Explainer(clf, method=args.method, layer=layer) for layer in layers}
    keys = [f"{m}@{layer}" for layer in layers for m in methods]
    hits: dict[str, list[bool]] = defaultdict(list)
    hits_tol: dict[str, list[bool]] = defaultdict(list)
    ious: dict[str, list[float]] = defaultdict(list)
    extra = [float(t) for t in args.iou_thresholds.split(",") if t]
    ious_at: dict[tuple[str, float], list[float]] = defaultdict(list)
    positive: list[bool] = []
    centre: list[bool] = []
    started = time.perf_counter()
    overhead_batch: np.ndarray | None = None
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = [load_image_file(args.data / f) for f in chunk]
        batch = np.stack([clf.prepare(img) for img in images])
        if overhead_batch is None and len(chunk) == args.batch_size:
            overhead_batch = batch
        for layer, explainer in explainers.items():
            probabilities, maps = explainer.explain_methods(batch, methods)
            if layer == layers[0]:
                positive.extend(bool(q >= threshold) for q in probabilities)
            for m in methods:
                for k, (f, img) in enumerate(zip(chunk, images, strict=True)):
                    truth = boxes[f]
                    point = peak_point(maps[m][k], img.shape)
                    hits[f"{m}@{layer}"].append(point_in_boxes(point, truth))
                    hits_tol[f"{m}@{layer}"].append(point_in_boxes(point, truth, 15.0))
                    regions = find_regions(maps[m][k], img.shape, threshold=args.threshold)
                    ious[f"{m}@{layer}"].append(
                        max(box_iou(regions[0].box, b) for b in truth) if regions else 0.0)
                    for t in extra:
                        top = find_regions(maps[m][k], img.shape, threshold=t, max_regions=1)
                        ious_at[(f"{m}@{layer}", t)].append(
                            max(box_iou(top[0].box, b) for b in truth) if top else 0.0)
        for f, img in zip(chunk, images, strict=True):
            h, w = img.shape
            centre.append(point_in_boxes((w / 2, h / 2), boxes[f]))
    seconds = time.perf_counter() - started
    results = {k: score(hits[k], hits_tol[k], ious[k]) for k in keys}
    for k in keys:
        if extra:
            results[k]["mean_iou_at"] = {
                str(t): round(float(np.mean(ious_at[(k, t)])), 4) for t in extra}
    positives_only = {
        k: score([h for h, q in zip(hits[k], positive, strict=True) if q],
                 [h for h, q in zip(hits_tol[k], positive, strict=True) if q],
                 [i for i, q in zip(ious[k], positive, strict=True) if q])
        for k in keys
    }
    primary = f"{args.method}@{layers[0]}"
    overhead: dict[str, Any] = {}
    if overhead_batch is not None:
        explainer = explainers[layers[0]]
        clf.predict_batch(overhead_batch)
        explainer.explain_batch(overhead_batch)
        predict_s, explain_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            clf.predict_batch(overhead_batch)
            t1 = time.perf_counter()
            explainer.explain_batch(overhead_batch)
            t2 = time.perf_counter()
            predict_s.append(t1 - t0)
            explain_s.append(t2 - t1)
        predict_ms = 1000 * statistics.median(predict_s)
        explain_ms = 1000 * statistics.median(explain_s)
        overhead = {
            "batch_size": args.batch_size, "repeats": args.repeats, "device": clf.device,
            "torch_threads": torch.get_num_threads(),
            "predict_batch_ms": round(predict_ms, 1), "explain_batch_ms": round(explain_ms, 1),
            "overhead_pct": round(100 * (explain_ms / predict_ms - 1), 1),
        }
    print(json.dumps({
        "benchmark": "saliency", "model": str(args.model), "model_name": clf.name,
        "model_version": clf.version, "model_sha256": clf.sha256,
        "architecture": clf.card["architecture"], "input_size": clf.input_size,
        "split": args.split, "images": len(files),
        "boxes": sum(len(boxes[f]) for f in files),
        "region_threshold": args.threshold, "primary": primary,
        "hit_rate": results[primary]["hit_rate"] if primary in results else None,
        "hit_ci95": results[primary]["hit_ci95"] if primary in results else None,
        "mean_iou": results[primary]["mean_iou"] if primary in results else None,
        "centre_baseline_hit_rate": round(float(np.mean(centre)), 4) if centre else None,
        "scored_positive": int(sum(positive)), "balanced_threshold": round(threshold, 4),
        "results": results, "positives_only": positives_only, "overhead": overhead,
        "seconds": round(seconds, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

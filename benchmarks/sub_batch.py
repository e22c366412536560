"""Images per pass of the network (``[model] sub_batch``): the worker's call on each engine, one run.

    .venv/bin/python benchmarks/sub_batch.py [--model F] [--engines torch,onnxruntime,openvino]
        [--sizes 0,8,4,2,1] [--batch 16] [--rounds 6] [--threads 2]

The worker scores a claimed batch (``[model] max_batch``, 16) with flip TTA and the saliency map
(:meth:`fracture_node.ml.explain.Explainer.explain_batch`); the classifier runs the network in
passes of ``sub_batch`` images (0: the whole batch in one pass). On a CPU the activations of a
whole batch at 384 px are far larger than the caches, so the size of a pass changes the speed,
never the result. For each engine and size this prints the images/s of the worker's call on a
batch of real val radiographs; the measurements are interleaved (every size once per round) so
that a neighbour's load on a shared machine falls on all of them alike, and each line gives the
median, lowest and highest of the rounds, the ratio of the median to the whole batch's, and the
largest difference of probability from the whole batch's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from fracture_node.images import letterbox, load_image_file  # noqa: E402
from fracture_node.ml.data import load_records, split_records  # noqa: E402
from fracture_node.ml.explain import Explainer  # noqa: E402
from fracture_node.ml.infer import CPU_SUB_BATCH, Classifier  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model file (default: bundled)")
    p.add_argument("--engines", default="torch,onnxruntime,openvino")
    p.add_argument("--sizes", default="0,8,4,2,1", help="pass sizes; 0: the whole batch")
    p.add_argument("--batch", type=int, default=16, help="the serving batch size")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if 0 not in sizes:
        sizes.insert(0, 0)
    explainers: dict[str, Explainer] = {}
    for engine in args.engines.split(","):
        clf = Classifier.load(args.model, "cpu", engine=engine, threads=args.threads,
                              saliency=("hirescam", "last"))
        explainers[engine] = Explainer(clf, "hirescam", "last")
    size = next(iter(explainers.values())).input_size
    val = split_records(load_records(SHARED / "datasets" / "fracture-xr"), "val")
    batch = np.stack([letterbox(load_image_file(r.path), size) for r in val[:args.batch]])

    def call(engine: str, sub_batch: int) -> np.ndarray:
        explainer = explainers[engine]
        explainer.classifier.sub_batch = sub_batch
        return explainer.explain_batch(batch)[0]

    reference = {(e, s): call(e, s) for e in explainers for s in sizes}  # also the warm-up
    rates: dict[tuple[str, int], list[float]] = {k: [] for k in reference}
    for _ in range(args.rounds):
        for engine, sub_batch in rates:
            started = time.perf_counter()
            call(engine, sub_batch)
            rates[(engine, sub_batch)].append(len(batch) / (time.perf_counter() - started))
    common = {"model": explainers[next(iter(explainers))].classifier.name,
              "model_sha256": explainers[next(iter(explainers))].classifier.sha256[:12],
              "batch": args.batch, "threads": args.threads, "rounds": args.rounds}
    for (engine, sub_batch), values in rates.items():
        whole = statistics.median(rates[(engine, 0)])
        print(json.dumps({
            "benchmark": "sub_batch", "engine": engine, "sub_batch": sub_batch,
            "images_per_s_median": round(statistics.median(values), 2),
            "images_per_s_low": round(min(values), 2), "images_per_s_high": round(max(values), 2),
            "median_to_whole_batch": round(statistics.median(values) / whole, 2),
            "max_probability_difference": float(np.max(np.abs(
                reference[(engine, sub_batch)] - reference[(engine, 0)]))),
            **common}), flush=True)
    print(json.dumps({"benchmark": "sub_batch_summary", "date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()} {os.cpu_count()} CPUs {cpu_name()}",
                      "load_average": round(os.getloadavg()[0], 2),
                      "default_cpu_sub_batch": CPU_SUB_BATCH, **common}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

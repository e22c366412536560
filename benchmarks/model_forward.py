"""Raw forward throughput of the bundled fracture model (images/s) as JSON.

Usage: ``python benchmarks/model_forward.py [--batch-size 16] [--device auto] [--model F]``.
Times ``Classifier.predict_batch`` on random prepared images (no decoding, no letterbox),
after warm-up batches, so it measures the network (and flip TTA when the card enables it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fracture_node.ml.infer import Classifier


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = Classifier.load(args.model, device=args.device)
    batch = np.random.default_rng(0).random(
        (args.batch_size, clf.input_size, clf.input_size), dtype=np.float32)
    for _ in range(args.warmup):
        clf.predict_batch(batch)
    if clf.device.startswith("cuda"):
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while True:
        clf.predict_batch(batch)  # returns numpy, so the device has finished
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= args.min_seconds and n >= 3:
            break
    print(json.dumps({
        "benchmark": "model_forward", "model": clf.name, "version": clf.version,
        "sha256": clf.sha256, "architecture": clf.card["architecture"],
        "input_size": clf.input_size, "tta": clf.tta, "device": clf.device,
        "device_name": (torch.cuda.get_device_name() if clf.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "batches": n, "seconds": round(elapsed, 3),
        "images_per_s": round(n * args.batch_size / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / n, 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

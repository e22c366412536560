"""Evaluate a fracture model on one split: metrics with confidence intervals, and figures.

Writes into ``--out``: ``metrics.json`` (everything below), ``figures.json`` (the data behind every
figure), ``predictions.csv`` (file name, label, probability, source, body part) and PNG figures:
``loss_curves.png`` (from the training history in the card), ``roc.png``, ``confusion.png``,
``reliability.png`` and ``samples.png``. Operating points are the card's thresholds, which were
chosen on val; use ``--split test`` only for a final model.

Run as ``fracture-node evaluate --data DIR --out DIR [--model FILE]`` (the arguments:
:mod:`fracture_node.cli.evaluate`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from fracture_node.errors import FractureNodeError
from fracture_node.logs import get_logger
from fracture_node.ml import metrics
from fracture_node.ml.data import Record, load_records, prepare_exact, split_records
from fracture_node.ml.infer import OPERATING_POINTS, Classifier
from fracture_node.ml.model import load_model_file, save_model_file

log = get_logger("ml.evaluate")


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def subgroup_table(y: np.ndarray, p: np.ndarray, keys: list[str], threshold: float
                   ) -> dict[str, dict[str, Any]]:
    """Per-subgroup counts, AUROC with DeLong CI, and sensitivity/specificity at ``threshold``."""
    out: dict[str, dict[str, Any]] = {}
    arr = np.asarray(keys)
    for key in sorted(set(keys)):
        m = arr == key
        auc, lo, hi = metrics.delong_ci(y[m], p[m])
        op = metrics.at_threshold(y[m], p[m], threshold)
        out[key] = {"n": int(m.sum()), "positives": int(y[m].sum()), "auroc": _f(auc),
                    "auroc_ci95": [_f(lo), _f(hi)], "sensitivity": _f(op.sensitivity),
                    "specificity": _f(op.specificity), "accuracy": _f(op.accuracy)}
    return out


def compute_metrics(y: np.ndarray, p: np.ndarray, thresholds: dict[str, float],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every headline metric of one split (no subgroups)."""
    auc, lo, hi = metrics.delong_ci(y, p)
    _, blo, bhi = metrics.bootstrap_ci(y, p, n_boot=n_boot, seed=seed)
    s90, s90lo, s90hi = metrics.bootstrap_ci(
        y, p, stat=lambda a, b: metrics.sensitivity_at_specificity(a, b, 0.90), n_boot=n_boot,
        seed=seed)
    e, table = metrics.ece(y, p)
    return {
        "n": int(len(y)), "positives": int(y.sum()),
        "auroc": _f(auc), "auroc_ci95_delong": [_f(lo), _f(hi)],
        "auroc_ci95_bootstrap": [_f(blo), _f(bhi)],
        "sensitivity_at_specificity_0.90": _f(s90),
        "sensitivity_at_specificity_0.90_ci95_bootstrap": [_f(s90lo), _f(s90hi)],
        "operating_points": {name: metrics.at_threshold(y, p, t).as_dict()
                             for name, t in thresholds.items()},
        "ece": e, "reliability": table,
        "brier": float(np.mean((p - y) ** 2)),
    }


def loss_curves(out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """``loss_curves.png`` from the card's training history; for an ensemble, whose card has
    none of its own, one curve per member (``members[].history``). Returns the figure's data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = card.get("history") or []
    series = [("", hist)] if hist else [
        (f"{m.get('architecture')} {m.get('version')}", m.get("history") or [])
        for m in card.get("members") or []]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for k, (name, h) in enumerate(s for s in series if s[1]):
        ep = [e["epoch"] for e in h]
        prefix = f"{name}: " if name else ""
        ax[0].plot(ep, [e["train_loss"] for e in h], color=f"C{2 * k}",
                   label=f"{prefix}train (augmented, weighted)")
        ax[0].plot(ep, [e["val_loss"] for e in h], color=f"C{2 * k + 1}", label=f"{prefix}val")
        ax[1].plot(ep, [e["val_auroc"] for e in h], color=f"C{2 * k}", label=name or None)
    ax[0].set(xlabel="epoch", ylabel="BCE loss", title="loss")
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="epoch", ylabel="AUROC", title="val AUROC (EMA weights)")
    if len(series) > 1:
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=80)
    plt.close(fig)
    return {"history": hist} if hist else {"members": [{"name": n, "history": h}
                                                        for n, h in series]}


def _plots(out: Path, card: dict[str, Any], y: np.ndarray, p: np.ndarray, images: np.ndarray,
           recs: list[Record], result: dict[str, Any], split: str) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, Any] = {"loss_curves": loss_curves(out, card)}
    fpr, tpr, thr = metrics.roc_curve(y, p)
    ops = {k: (1 - v["specificity"], v["sensitivity"], v["threshold"])
           for k, v in result["operating_points"].items()}
    figures["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                      "thresholds": [None if not np.isfinite(t) else float(t) for t in thr],
                      "auroc": result["auroc"], "operating_points": ops}
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {result['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    for k, (x0, y0, t) in ops.items():
        ax.scatter([x0], [y0], zorder=3, label=f"{k} (t={t:.3f})")
    ax.axvline(0.10, ls="--", lw=0.7, color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({split})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=80)
    plt.close(fig)

    figures["confusion"] = {k: v["confusion_matrix"] for k, v in result["operating_points"].items()}
    fig, axes = plt.subplots(1, len(figures["confusion"]), figsize=(7, 3.2))
    for ax, (k, cm) in zip(np.atleast_1d(axes), figures["confusion"].items(), strict=True):
        ax.imshow(np.array(cm), cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "fractured"],
               yticklabels=["normal", "fractured"], xlabel="predicted", ylabel="true", title=k)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=80)
    plt.close(fig)

    table = result["reliability"]
    figures["reliability"] = {"bins": table, "ece": result["ece"]}
    fig, ax = plt.subplots(figsize=(4, 4))
    mids = [(b["low"] + b["high"]) / 2 for b in table]
    frac = [b["fraction_fractured"] if b["count"] else np.nan for b in table]
    ax.bar(mids, frac, width=0.09, alpha=0.7, label="observed fraction fractured")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="predicted probability", ylabel="fraction fractured",
           title=f"reliability (ECE {result['ece']:.3f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=80)
    plt.close(fig)

    t = result["operating_points"]["balanced"]["threshold"] if "balanced" in \
        result["operating_points"] else 0.5
    rng = np.random.default_rng(0)
    picks: list[tuple[str, int]] = []
    for name, mask in (("TP", (y == 1) & (p >= t)), ("FN", (y == 1) & (p < t)),
                       ("FP", (y == 0) & (p >= t)), ("TN", (y == 0) & (p < t))):
        idx = np.flatnonzero(mask)
        for i in rng.permutation(idx)[:4]:
            picks.append((name, int(i)))
    figures["samples"] = [{"kind": k, "file": recs[i].path.name, "label": int(y[i]),
                           "probability": float(p[i])} for k, i in picks]
    if picks:
        cols = 4
        rows = int(np.ceil(len(picks) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 2, rows * 2.2))
        for ax in np.atleast_1d(axes).ravel():
            ax.axis("off")
        for ax, (k, i) in zip(np.atleast_1d(axes).ravel(), picks, strict=False):
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{k} p={p[i]:.2f}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=60)
        plt.close(fig)
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    clf = Classifier.load(args.model, device=args.device)
    recs = split_records(load_records(args.data), args.split)
    if args.limit:
        rng = np.random.default_rng(0)
        recs = [recs[i] for i in sorted(rng.permutation(len(recs))[: args.limit])]
    images, recs = prepare_exact(recs, clf.input_size, args.workers, args.split)
    if not recs:
        raise FractureNodeError(f"no readable images in split {args.split}")
    y = np.array([r.label for r in recs], dtype=np.int64)
    p = np.concatenate([clf.predict_batch(images[i : i + args.batch_size])
                        for i in range(0, len(images), args.batch_size)])
    thresholds = {k: clf.threshold(k) for k in OPERATING_POINTS}
    result = compute_metrics(y, p, thresholds, n_boot=args.bootstrap)
    result["split"] = args.split
    result["model"] = {"name": clf.name, "version": clf.version, "sha256": clf.sha256,
                       "tta": clf.tta, "input_size": clf.input_size,
                       "calibration": clf.card.get("calibration")}
    if clf.calibration is not None:
        # What calibration bought on this split: the ECE of the network's own sigmoid output.
        slope, intercept = clf.calibration
        raw = metrics.platt((metrics.logit(p) - intercept) / slope, 1.0, 0.0)
        result["ece_uncalibrated"] = metrics.ece(y, raw)[0]
    result["per_source"] = subgroup_table(y, p, [r.source for r in recs], thresholds["balanced"])
    result["per_body_part"] = subgroup_table(y, p, [r.body_part for r in recs],
                                             thresholds["balanced"])
    if any("hardware" in r.extra for r in recs):
        result["per_hardware"] = subgroup_table(
            y, p, [f"{r.source}:hardware={r.extra.get('hardware') or 'n/a'}" for r in recs],
            thresholds["balanced"])
    args.out.mkdir(parents=True, exist_ok=True)
    figures = _plots(args.out, clf.card, y, p, images, recs, result, args.split)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    with (args.out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "probability", "source", "body_part"])
        for r, prob in zip(recs, p, strict=True):
            w.writerow([r.path.name, "fractured" if r.label else "normal", f"{prob:.6f}",
                        r.source, r.body_part])
    if args.write_card:
        mf = load_model_file(clf.path)
        card = dict(mf.card)
        card[f"{args.split}_metrics"] = {k: v for k, v in result.items() if k != "reliability"}
        save_model_file(clf.path, mf.state_dict, card)
        log.info("card_updated", path=str(clf.path), key=f"{args.split}_metrics")
    log.info("evaluated", split=args.split, n=len(y), auroc=result["auroc"],
             ci=result["auroc_ci95_delong"], out=str(args.out))
    return result


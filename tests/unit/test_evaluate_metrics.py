"""Evaluation metrics on known arrays (numpy only)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fracture_node.ml import metrics
from fracture_node.ml.evaluate import compute_metrics, subgroup_table


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_perfect_scorer_has_auroc_one() -> None:
    """Scores that rank every fractured image above every normal one give AUROC 1."""
    y = np.array([0, 0, 0, 1, 1])
    assert metrics.auroc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0


def test_inverted_scorer_has_auroc_zero() -> None:
    """Scores that rank every normal image above every fractured one give AUROC 0."""
    y = np.array([0, 0, 1, 1])
    assert metrics.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_constant_scorer_has_auroc_one_half() -> None:
    """Ties count one half, so a constant score gives AUROC 0.5."""
    assert metrics.auroc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5


def test_random_scorer_is_near_one_half() -> None:
    """Scores independent of the labels give AUROC near 0.5 on a large sample."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 20_000)
    assert abs(metrics.auroc(y, rng.random(20_000)) - 0.5) < 0.02


def test_auroc_equals_pairwise_definition_with_ties() -> None:
    """The rank formula equals the pairwise definition, ties included."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert metrics.auroc(y, s) == pytest.approx(_pairwise_auc(y, s))


def test_confidence_intervals_contain_the_point_estimate() -> None:
    """DeLong and bootstrap intervals both contain the AUROC they are built around."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = y * 0.8 + rng.normal(0, 0.6, 300)
    auc, lo, hi = metrics.delong_ci(y, s)
    b_auc, blo, bhi = metrics.bootstrap_ci(y, s, n_boot=300)
    assert lo < auc < hi and blo <= b_auc <= bhi
    assert auc == pytest.approx(b_auc)
    assert hi - lo == pytest.approx(bhi - blo, rel=0.3)


def test_delong_interval_narrows_with_more_data() -> None:
    """A wider sample narrows the DeLong interval."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 2000)
    s = y + rng.normal(0, 1, 2000)
    _, lo_small, hi_small = metrics.delong_ci(y[:200], s[:200])
    _, lo_big, hi_big = metrics.delong_ci(y, s)
    assert hi_big - lo_big < hi_small - lo_small


def test_sensitivity_threshold_reaches_target() -> None:
    """The high-sensitivity threshold keeps at least the requested sensitivity."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 500)
    s = 1 / (1 + np.exp(-(y * 1.5 + rng.normal(0, 1, 500))))
    t = metrics.threshold_for_sensitivity(y, s, 0.9)
    assert metrics.at_threshold(y, s, t).sensitivity >= 0.9


def test_youden_threshold_separates_separable_scores() -> None:
    """On separable scores the balanced threshold gives sensitivity and specificity 1."""
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    op = metrics.at_threshold(y, s, metrics.threshold_youden(y, s))
    assert (op.sensitivity, op.specificity) == (1.0, 1.0)


def test_confusion_matrix_counts() -> None:
    """The confusion matrix is [[TN, FP], [FN, TP]] at the threshold (>= is fractured)."""
    op = metrics.at_threshold([0, 0, 1, 1, 1], [0.1, 0.6, 0.5, 0.4, 0.9], 0.5)
    assert op.as_dict()["confusion_matrix"] == [[1, 1], [1, 2]]


def test_sensitivity_at_specificity_of_perfect_scorer() -> None:
    """A perfect scorer reaches sensitivity 1 at specificity 0.9."""
    y = np.r_[np.zeros(50), np.ones(50)]
    assert metrics.sensitivity_at_specificity(y, np.r_[np.zeros(50), np.ones(50)] + y * 0) == 1.0


def test_ece_of_calibrated_scores_is_small() -> None:
    """Labels drawn from the scores themselves give an ECE near 0."""
    rng = np.random.default_rng(6)
    s = rng.random(50_000)
    y = (rng.random(50_000) < s).astype(int)
    assert metrics.ece(y, s)[0] < 0.02


def test_ece_of_overconfident_scores_is_large() -> None:
    """Scores of 0.99 on a set that is half fractured give an ECE near 0.49."""
    y = np.r_[np.zeros(100), np.ones(100)]
    assert metrics.ece(y, np.full(200, 0.99))[0] == pytest.approx(0.49)


def test_compute_metrics_reports_both_operating_points() -> None:
    """The summary holds AUROC with both CIs and one entry per operating point."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    s = np.clip(y * 0.4 + rng.random(200) * 0.6, 0, 1)
    out = compute_metrics(y, s, {"balanced": 0.5, "high_sensitivity": 0.3}, n_boot=100)
    assert set(out["operating_points"]) == {"balanced", "high_sensitivity"}
    lo, hi = out["auroc_ci95_delong"]
    assert lo <= out["auroc"] <= hi


def test_subgroups_partition_the_images() -> None:
    """Per-subgroup counts add up to the whole split."""
    y = np.array([0, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3])
    table = subgroup_table(y, s, ["hand", "hand", "leg", "leg", "hip", "hip"], 0.5)
    assert sum(v["n"] for v in table.values()) == 6
    assert table["hand"]["auroc"] == 1.0


def test_evaluate_writes_figures_and_json(tmp_path: Path, dataset_dir: Path) -> None:
    """evaluate on a few real val images writes metrics, figure data and every PNG."""
    import json

    import torch

    from fracture_node.cli.evaluate import main
    from fracture_node.ml.model import build_model, load_model_file, save_model_file

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_model_file(model, build_model("mobilenet_v3_small"), {
        "name": "tiny", "version": "0", "architecture": "mobilenet_v3_small", "input_size": 64,
        "normalisation": {"mean": 0.3, "std": 0.3},
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3}, "tta": False,
        "history": [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_auroc": 0.6}]})
    out = tmp_path / "eval"
    rc = main(["--data", str(dataset_dir), "--model", str(model), "--split", "val",
               "--limit", "24", "--out", str(out), "--bootstrap", "50", "--workers", "1",
               "--device", "cpu"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["n"] == 24
    for name in ("loss_curves", "roc", "confusion", "reliability", "samples"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert name in json.loads((out / "figures.json").read_text())
    assert result["model"]["calibration"] is None and "ece_uncalibrated" not in result

    # The same weights with a calibration: the report names it, and its ECE of the uncalibrated
    # output is the plain model's ECE.
    card = dict(load_model_file(model).card,
                calibration={"method": "platt", "slope": 0.5, "intercept": 0.1})
    save_model_file(model, load_model_file(model).state_dict, card)
    rc = main(["--data", str(dataset_dir), "--model", str(model), "--split", "val",
               "--limit", "24", "--out", str(tmp_path / "cal"), "--bootstrap", "50",
               "--workers", "1", "--device", "cpu"])
    assert rc == 0
    calibrated = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert calibrated["model"]["calibration"]["slope"] == 0.5
    assert calibrated["ece_uncalibrated"] == pytest.approx(result["ece"], abs=1e-6)
    assert calibrated["auroc"] == pytest.approx(result["auroc"], abs=1e-9)


def test_platt_fit_recovers_a_known_miscalibration() -> None:
    """Labels drawn from sigmoid(2 z - 1): the fit finds slope 2 and intercept -1, the calibrated
    scores have a small ECE where the raw ones do not, and the ranking (AUROC) is unchanged."""
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 1.5, 40_000)
    y = (rng.random(z.size) < 1.0 / (1.0 + np.exp(-(2.0 * z - 1.0)))).astype(int)
    slope, intercept = metrics.fit_platt(y, z)
    assert slope == pytest.approx(2.0, abs=0.08)
    assert intercept == pytest.approx(-1.0, abs=0.06)
    raw = 1.0 / (1.0 + np.exp(-z))
    calibrated = 1.0 / (1.0 + np.exp(-(slope * z + intercept)))
    assert metrics.ece(y, raw)[0] > 0.05
    assert metrics.ece(y, calibrated)[0] < 0.015
    assert metrics.auroc(y, calibrated) == pytest.approx(metrics.auroc(y, raw), abs=1e-12)


def test_platt_fit_of_separable_scores_stays_finite() -> None:
    """Perfectly separated labels have no finite optimum; the ridge keeps the answer finite and
    the slope positive."""
    z = np.r_[np.linspace(-3, -1, 50), np.linspace(1, 3, 50)]
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    slope, intercept = metrics.fit_platt(y, z)
    assert np.isfinite(slope) and np.isfinite(intercept) and slope > 0


def test_logit_inverts_the_sigmoid() -> None:
    z = np.linspace(-20, 20, 81)
    np.testing.assert_allclose(metrics.logit(1.0 / (1.0 + np.exp(-z))), z, atol=1e-6)

"""Binary classification metrics in numpy: AUROC with confidence intervals, operating points, ECE.

Labels are 1 (fractured) and 0 (normal); scores are probabilities of ``fractured``. A score at or
above a threshold is called fractured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _check(y: ArrayLike, s: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    yy = np.asarray(y).astype(np.int64).reshape(-1)
    ss = np.asarray(s, dtype=np.float64).reshape(-1)
    if yy.shape != ss.shape:
        raise ValueError(f"labels and scores differ in length: {yy.shape} vs {ss.shape}")
    if not np.isin(yy, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return yy, ss


def _midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y: ArrayLike, s: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half). NaN without both classes."""
    yy, ss = _check(y, s)
    n1, n0 = int(yy.sum()), int((1 - yy).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _midranks(ss)
    return float((r[yy == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def delong_ci(y: ArrayLike, s: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """AUROC with its DeLong confidence interval (logit-free, clipped to [0, 1]).

    Returns ``(auc, low, high)``. DeLong et al., Biometrics 1988; fast midrank algorithm of
    Sun and Xu, IEEE SPL 2014.
    """
    yy, ss = _check(y, s)
    pos, neg = ss[yy == 1], ss[yy == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        a = auroc(yy, ss)
        return a, float("nan"), float("nan")
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.r_[pos, neg])
    auc = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    v01 = (tz[:m] - tx) / n
    v10 = 1.0 - (tz[m:] - ty) / m
    var = float(np.var(v01, ddof=1) / m + np.var(v10, ddof=1) / n)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    half = z * np.sqrt(max(var, 0.0))
    return auc, float(max(0.0, auc - half)), float(min(1.0, auc + half))


def bootstrap_ci(
    y: ArrayLike, s: ArrayLike, stat: Any = None, n_boot: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A statistic (AUROC by default) with a stratified percentile bootstrap interval."""
    yy, ss = _check(y, s)
    fn = stat or auroc
    point = float(fn(yy, ss))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(yy == 1), np.flatnonzero(yy == 0)
    if len(pos) == 0 or len(neg) == 0:
        return point, float("nan"), float("nan")
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        vals[b] = fn(yy[idx], ss[idx])
    lo, hi = np.nanpercentile(vals, [50 * (1 - level), 100 - 50 * (1 - level)])
    return point, float(lo), float(hi)


def roc_curve(y: ArrayLike, s: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                                    NDArray[np.float64]]:
    """False-positive rates, true-positive rates and thresholds (decreasing, starting at +inf)."""
    yy, ss = _check(y, s)
    order = np.argsort(-ss, kind="mergesort")
    ys, st = yy[order], ss[order]
    distinct = np.r_[np.flatnonzero(np.diff(st)), len(st) - 1]
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(int(yy.sum()), 1), max(int((1 - yy).sum()), 1)
    tpr = np.r_[0.0, tps / p]
    fpr = np.r_[0.0, fps / n]
    thr = np.r_[np.inf, st[distinct]]
    return fpr, tpr, thr


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    @property
    def accuracy(self) -> float:
        total = self.tp + self.fp + self.tn + self.fn
        return (self.tp + self.tn) / total if total else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(sensitivity=self.sensitivity, specificity=self.specificity,
                 accuracy=self.accuracy,
                 sensitivity_ci95=wilson_ci(self.tp, self.tp + self.fn),
                 specificity_ci95=wilson_ci(self.tn, self.tn + self.fp),
                 confusion_matrix=[[self.tn, self.fp], [self.fn, self.tp]])
        return d


def at_threshold(y: ArrayLike, s: ArrayLike, threshold: float) -> OperatingPoint:
    """Counts when scores ``>= threshold`` are called fractured."""
    yy, ss = _check(y, s)
    pred = ss >= threshold
    return OperatingPoint(threshold=float(threshold), tp=int((pred & (yy == 1)).sum()),
                          fp=int((pred & (yy == 0)).sum()), tn=int((~pred & (yy == 0)).sum()),
                          fn=int((~pred & (yy == 1)).sum()))


def _candidate_thresholds(ss: NDArray[np.float64]) -> NDArray[np.float64]:
    u = np.unique(ss)
    # midpoints between distinct scores generalise better than the scores themselves
    mids = (u[:-1] + u[1:]) / 2.0 if len(u) > 1 else u
    return np.r_[u[0] - 1e-6 if len(u) else 0.5, mids, (u[-1] + 1e-6) if len(u) else 0.5]


def threshold_youden(y: ArrayLike, s: ArrayLike) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the "balanced" point)."""
    yy, ss = _check(y, s)
    best_t, best_j = 0.5, -np.inf
    for t in _candidate_thresholds(ss):
        op = at_threshold(yy, ss, t)
        j = op.sensitivity + op.specificity - 1
        if j > best_j:
            best_t, best_j = float(t), j
    return float(np.clip(best_t, 0.0, 1.0))


def threshold_for_sensitivity(y: ArrayLike, s: ArrayLike, target: float = 0.90) -> float:
    """The highest threshold whose sensitivity is at least ``target``."""
    yy, ss = _check(y, s)
    pos = np.sort(ss[yy == 1])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above the threshold
    kth = pos[max(k, 1) - 1]
    below = ss[ss < kth]
    t = (kth + below.max()) / 2.0 if below.size else kth
    return float(np.clip(t, 0.0, 1.0))


def sensitivity_at_specificity(y: ArrayLike, s: ArrayLike, spec: float = 0.90) -> float:
    """The best sensitivity among thresholds whose specificity is at least ``spec``."""
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= 1.0 - spec + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def ece(y: ArrayLike, s: ArrayLike, bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width bins, and the reliability table."""
    yy, ss = _check(y, s)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(ss, edges[1:-1], right=False), 0, bins - 1)
    total, table = 0.0, []
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        conf = float(ss[mask].mean()) if n else float("nan")
        acc = float(yy[mask].mean()) if n else float("nan")
        if n:
            total += n / len(yy) * abs(conf - acc)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                      "mean_probability": conf, "fraction_fractured": acc})
    return float(total), table


def logit(p: ArrayLike, eps: float = 1e-12) -> NDArray[np.float64]:
    """The log-odds of probabilities (clipped away from 0 and 1)."""
    pp = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(pp) - np.log1p(-pp)


def platt(z: ArrayLike, slope: float, intercept: float) -> NDArray[np.float64]:
    """``sigmoid(slope * z + intercept)``: Platt-scaled probabilities of the logits ``z``."""
    return 1.0 / (1.0 + np.exp(-(slope * np.asarray(z, dtype=np.float64) + intercept)))


def fit_platt(y: ArrayLike, z: ArrayLike, iterations: int = 100) -> tuple[float, float]:
    """Platt scaling: ``(slope, intercept)`` such that ``sigmoid(slope * z + intercept)`` of the
    logits ``z`` minimises the log-loss on the labels ``y`` (Newton's method, with a tiny ridge on
    the slope so separable data still gives a finite answer).

    A monotone map: it changes what a probability means, never how images rank (AUROC).
    """
    yy, zz = _check(y, z)
    a, b = 1.0, 0.0
    ridge = 1e-6

    def loss(a: float, b: float) -> float:
        t = a * zz + b
        return float(np.mean(np.logaddexp(0.0, t) - yy * t) + 0.5 * ridge * a * a)

    current = loss(a, b)
    for _ in range(iterations):
        p = platt(zz, a, b)
        r, w = p - yy, p * (1.0 - p)
        grad = np.array([np.mean(r * zz) + ridge * a, np.mean(r)])
        hess = np.array([[np.mean(w * zz * zz) + ridge, np.mean(w * zz)],
                         [np.mean(w * zz), np.mean(w) + 1e-12]])
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            na, nb = a - scale * float(step[0]), b - scale * float(step[1])
            new = loss(na, nb)
            if new <= current:
                break
            scale /= 2.0
        else:
            break
        converged = abs(current - new) < 1e-12
        a, b, current = na, nb, new
        if converged:
            break
    return a, b

"""Classification metrics with intervals: Wilson for proportions, bootstrap for AUC and
balanced accuracy. Pure numpy, shared by evaluation (training) and the screening statistics."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: float, n: float, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """Point estimate and Wilson score interval for k successes in n trials (None when n == 0)."""
    if n <= 0:
        return None, None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def rank(x) -> np.ndarray:
    """1-based ranks; tied values share their average rank."""
    _, inverse, counts = np.unique(np.asarray(x, float), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of each distinct value's last copy
    return (last - (counts - 1) / 2)[inverse]


def roc_auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve via the Mann-Whitney statistic (ties count half)."""
    y_bin, score = np.asarray(y_bin, bool), np.asarray(score, float)
    n_pos, n_neg = int(y_bin.sum()), int((~y_bin).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rank(score)
    return float((ranks[y_bin].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """TP/TN/FP/FN and the derived rates, each with a Wilson 95% interval."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, tn = int((t & p).sum()), int((~t & ~p).sum())
    fp, fn = int((~t & p).sum()), int((t & ~p).sum())
    out: dict = {"tp": tp, "tn": tn, "fp": fp, "fn": fn}
    for name, k, n in (
        ("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn), ("accuracy", tp + tn, tp + tn + fp + fn),
    ):
        est, lo, hi = wilson(k, n)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = est, lo, hi
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return out


def balanced_accuracy_of(cm: np.ndarray) -> float:
    """Mean recall over the classes present, from a confusion matrix (rows: true class)."""
    rec = [cm[i, i] / cm[i].sum() for i in range(len(cm)) if cm[i].sum() > 0]
    return float(np.mean(rec)) if rec else float("nan")


def _f1s(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def balanced_accuracy(y_true, y_pred, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (NaN when it is empty)."""
    return balanced_accuracy_of(confusion_matrix(y_true, y_pred, n_classes))


def macro_f1(y_true, y_pred, n_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class never true nor predicted scores 0)."""
    return float(_f1s(confusion_matrix(y_true, y_pred, n_classes)).mean())


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    ece = 0.0
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


class ResampledAuc:
    """`roc_auc` of bootstrap resamples of one (labels, scores) pair, without sorting each resample.

    The scores are ranked once (ties share a code); a resample's Mann-Whitney statistic is then a
    counting sort of its codes: positives times (negatives below + half the negatives tied). Both
    this and `roc_auc`'s rank sum are exact in float64 (half-integers far below 2**52), so every
    value equals ``roc_auc(y_bin[idx], score[idx])``.
    """

    def __init__(self, y_bin, score):
        _, code = np.unique(np.asarray(score, float), return_inverse=True)
        self.m = int(code.max()) + 1 if len(code) else 0
        self.code = code.astype(np.int64) * 2 + np.asarray(y_bin, bool)  # (score code, positive)

    def __call__(self, idx: np.ndarray) -> float | None:
        counts = np.bincount(self.code[idx], minlength=2 * self.m).reshape(self.m, 2)
        nc, pc = counts[:, 0], counts[:, 1]
        n_pos = int(pc.sum())
        n_neg = len(idx) - n_pos
        if n_pos == 0 or n_neg == 0:
            return None
        u = (pc * ((np.cumsum(nc) - nc) + 0.5 * nc)).sum()
        return float(u / (n_pos * n_neg))


def _resampled_cm(y: np.ndarray, pred: np.ndarray, k: int):
    """idx -> `confusion_matrix(y[idx], pred[idx], k)` (one bincount per resample)."""
    code = np.asarray(y, np.int64) * k + np.asarray(pred, np.int64)
    return lambda idx: np.bincount(code[idx], minlength=k * k).reshape(k, k)


def _valid(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _bootstrap_many(fns: dict, n: int, seed: int, size: int) -> dict[str, tuple[float | None, float | None]]:
    """Percentile 95% intervals of several statistics over the same ``n`` resamples.

    ``fns``: name -> (idx -> value). The resamples are the ones a separate bootstrap per statistic
    would draw (a fresh generator per statistic, seeded alike, draws the same indices), so sharing
    them changes no number.
    """
    rng = np.random.default_rng(seed)
    vals: dict[str, list] = {name: [] for name in fns}
    for _ in range(n):
        idx = rng.integers(0, size, size)
        for name, fn in fns.items():
            v = fn(idx)
            if _valid(v):
                vals[name].append(v)
    return {name: (None, None) if len(v) < n * 0.5 else (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
            for name, v in vals.items()}


def classification_report(y_true, probs, classes: tuple[str, ...], pred=None, n_boot: int = 1000,
                          seed: int = 0) -> dict:
    """Everything the evaluation table shows, for one model's predictions.

    Args:
        y_true: true class indices.
        probs: (n, k) class probabilities.
        classes: class names.
        pred: predicted indices (default argmax of ``probs``; fusion methods may differ).

    Returns:
        Nested dict: overall metrics with intervals, and per class TP/TN/FP/FN, sensitivity,
        specificity, PPV, NPV, F1 and one-vs-rest AUC.
    """
    y = np.asarray(y_true, int)
    probs = np.asarray(probs, float)
    pred = probs.argmax(1) if pred is None else np.asarray(pred, int)
    k = len(classes)
    cm = confusion_matrix(y, pred, k)
    f1 = _f1s(cm)
    support = cm.sum(1)
    acc, acc_lo, acc_hi = wilson(int(np.trace(cm)), len(y))
    resampled_cm = _resampled_cm(y, pred, k)
    fns = {"bal": lambda idx: balanced_accuracy_of(resampled_cm(idx)),
           "mf1": lambda idx: float(_f1s(resampled_cm(idx)).mean())}
    fns.update({i: ResampledAuc(y == i, probs[:, i]) for i in range(k)})
    ci = _bootstrap_many(fns, n_boot, seed, len(y))
    onehot = np.eye(k)[y]
    report = {
        "n": int(len(y)), "confusion_matrix": cm.tolist(), "classes": list(classes),
        "accuracy": acc, "accuracy_lo": acc_lo, "accuracy_hi": acc_hi,
        "balanced_accuracy": balanced_accuracy_of(cm), "balanced_accuracy_lo": ci["bal"][0],
        "balanced_accuracy_hi": ci["bal"][1],
        "macro_f1": float(f1.mean()), "macro_f1_lo": ci["mf1"][0], "macro_f1_hi": ci["mf1"][1],
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "brier": float(((probs - onehot) ** 2).sum(1).mean()),
        "ece": expected_calibration_error(y, probs),
        "per_class": {},
    }
    for i, name in enumerate(classes):
        row = binary_counts(y == i, pred == i)
        row["support"] = int(support[i])
        row["auc"] = roc_auc(y == i, probs[:, i])
        row["auc_lo"], row["auc_hi"] = ci[i]
        report["per_class"][name] = row
    return report


def _paired_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    k = p.shape[1]
    return {"balanced_accuracy": balanced_accuracy(y, p.argmax(1), k),
            "auc_osteoporosis": roc_auc(y == k - 1, p[:, k - 1]),
            "auc_low_bmd": roc_auc(y >= 1, p[:, 1:].sum(1)),
            "brier": float(((p - np.eye(k)[y]) ** 2).sum(1).mean())}


def _resampled_paired_metrics(y: np.ndarray, p: np.ndarray):
    """idx -> `_paired_metrics(y[idx], p[idx])`, the same values from per-row terms computed once
    (argmax, the low-BMD score and the Brier terms are per-row, so resampling commutes with them)."""
    k = p.shape[1]
    cm = _resampled_cm(y, p.argmax(1), k)
    op, low = ResampledAuc(y == k - 1, p[:, k - 1]), ResampledAuc(y >= 1, p[:, 1:].sum(1))
    brier = ((p - np.eye(k)[y]) ** 2).sum(1)
    return lambda idx: {"balanced_accuracy": balanced_accuracy_of(cm(idx)), "auc_osteoporosis": op(idx),
                        "auc_low_bmd": low(idx), "brier": float(brier[idx].mean())}


def paired_bootstrap(y_true, probs_a, probs_b, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """What predictor A adds over predictor B on the same images, with 95% intervals.

    Each resample draws images with replacement and scores both predictors on the same draw, so
    the interval is of the difference itself (narrower than comparing two separate intervals).

    Returns:
        metric -> {"a", "b", "diff" (a - b), "lo", "hi", "p_a_better"} for balanced accuracy,
        osteoporosis-vs-rest AUC, low-BMD AUC and Brier score (lower Brier is better).
    """
    y = np.asarray(y_true, int)
    a, b = np.asarray(probs_a, float), np.asarray(probs_b, float)
    point_a, point_b = _paired_metrics(y, a), _paired_metrics(y, b)
    on_a, on_b = _resampled_paired_metrics(y, a), _resampled_paired_metrics(y, b)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in point_a}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        ma, mb = on_a(idx), on_b(idx)
        for m in draws:
            if ma[m] is not None and mb[m] is not None and not (math.isnan(ma[m]) or math.isnan(mb[m])):
                draws[m].append(ma[m] - mb[m])
    out = {}
    for m, d in draws.items():
        ok = point_a[m] is not None and point_b[m] is not None and len(d) >= n_boot * 0.5
        better = np.asarray(d) < 0 if m == "brier" else np.asarray(d) > 0
        out[m] = {"a": point_a[m], "b": point_b[m], "diff": point_a[m] - point_b[m] if ok else None,
                  "lo": float(np.percentile(d, 2.5)) if ok else None, "hi": float(np.percentile(d, 97.5)) if ok else None,
                  "p_a_better": float(better.mean()) if ok else None}
    return out


def partial_spearman(score, target, covariates, n_perm: int = 2000, seed: int = 0) -> dict:
    """Spearman partial correlation of ``score`` and ``target`` given ``covariates``, with a
    two-sided permutation p-value.

    Both variables are rank-transformed, each rank is regressed on the covariates (with an
    intercept) and the residuals are correlated; permuting one residual vector gives the null.
    Used as the pre-stated test of whether the image score carries T-score information beyond
    age and sex.

    Returns:
        {"rho", "p_value", "n", "n_perm"}; rho None when fewer than 8 complete rows.
    """
    s, t = np.asarray(score, float), np.asarray(target, float)
    c = np.asarray(covariates, float).reshape(len(s), -1)
    ok = np.isfinite(s) & np.isfinite(t) & np.isfinite(c).all(1)
    if ok.sum() < 8:
        return {"rho": None, "p_value": None, "n": int(ok.sum()), "n_perm": n_perm}
    design = np.column_stack([np.ones(ok.sum()), c[ok]])

    def resid(v):
        r = rank(v)
        beta, *_ = np.linalg.lstsq(design, r, rcond=None)
        e = r - design @ beta
        return e / (np.linalg.norm(e) + 1e-12)

    es, et = resid(s[ok]), resid(t[ok])
    rho = float(es @ et)
    rng = np.random.default_rng(seed)
    null = np.array([rng.permutation(es) @ et for _ in range(n_perm)])
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (n_perm + 1)
    return {"rho": rho, "p_value": float(p), "n": int(ok.sum()), "n_perm": n_perm}

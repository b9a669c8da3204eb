"""Ensemble fusion, temperature scaling and operating thresholds (numpy + a little torch).

Every fusion function takes a list of (n, k) member probability arrays and returns
``(probs, pred)``: fused class probabilities (used for risk scores, calibration and thresholds)
and the predicted class index. For soft and weighted voting ``pred`` is the argmax of ``probs``;
majority vote and fuzzy rank decide the class their own way and report the soft-vote
probabilities beside it.
"""

from __future__ import annotations

import numpy as np

FUSION_METHODS = ("soft", "weighted", "majority", "fuzzy_rank")


def soft_vote(probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    p = np.mean(np.stack(probs), axis=0)
    return p, p.argmax(1)


def weighted_vote(probs: list[np.ndarray], weights) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(weights, float)
    if w.shape != (len(probs),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(probs)} non-negative numbers with a positive sum, got {weights}")
    p = np.tensordot(w / w.sum(), np.stack(probs), axes=1)
    return p, p.argmax(1)


def majority_vote(probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each member votes its argmax; ties go to the class with the higher mean probability."""
    stack = np.stack(probs)
    k = stack.shape[2]
    votes = np.zeros(stack.shape[1:])
    for member in stack:
        votes[np.arange(len(member)), member.argmax(1)] += 1
    soft = stack.mean(0)
    pred = (votes + soft / (k + 1)).argmax(1)  # soft/(k+1) < 1 only breaks ties
    return soft, pred


def fuzzy_rank_scores(probs: list[np.ndarray]) -> np.ndarray:
    """Fuzzy rank-based fusion scores (lower is better), per the knee-osteoporosis research:
    R1 = 1 - exp(-(1 - p)^2 / 2), R2 = 1 - tanh((1 - p)^2 / 2), RS = sum_m R1 * R2,
    CFS = 1 - mean_m p, fused = RS * CFS."""
    stack = np.stack(probs)
    d = (1 - stack) ** 2 / 2
    rs = ((1 - np.exp(-d)) * (1 - np.tanh(d))).sum(0)
    cfs = 1 - stack.mean(0)
    return rs * cfs


def fuzzy_rank(probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(np.stack(probs), axis=0), fuzzy_rank_scores(probs).argmin(1)


def fuse(method: str, probs: list[np.ndarray], weights=None) -> tuple[np.ndarray, np.ndarray]:
    if method == "soft":
        return soft_vote(probs)
    if method == "weighted":
        return weighted_vote(probs, weights if weights is not None else [1.0] * len(probs))
    if method == "majority":
        return majority_vote(probs)
    if method == "fuzzy_rank":
        return fuzzy_rank(probs)
    raise ValueError(f"unknown fusion method {method!r}; valid: {', '.join(FUSION_METHODS)}")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (numerically stable); the one used by every model here.

    With fewer than 8 columns (3 classes) the row max and sum run column by column, in place:
    the same numbers as ``z.max(1)`` / ``e.sum(1)`` (NumPy adds fewer than 8 values in order; from
    8 it sums pairwise, so wider inputs take that path), ~4x faster on 85,000 x 3 (the stackers
    and covariate models call it tens of thousands of times per training, tests/test_train_columns).
    """
    if z.ndim != 2 or not 1 < z.shape[1] < 8 or z.dtype.kind != "f":
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
    m = z[:, 0].copy()
    for j in range(1, z.shape[1]):
        np.maximum(m, z[:, j], out=m)
    e = z - m[:, None]
    np.exp(e, out=e)
    s = e[:, 0].copy()
    for j in range(1, z.shape[1]):
        s += e[:, j]
    e /= s[:, None]
    return e


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T > 0 minimising validation NLL of softmax(logits / T) (1-D search on log T)."""
    logits, y = np.asarray(logits, float), np.asarray(y, int)

    def nll(t: float) -> float:
        p = softmax(logits / t)
        return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 200))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    lo, hi = best / 1.05, best * 1.05
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 50))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def apply_temperature(logits: np.ndarray, t: float) -> np.ndarray:
    return softmax(np.asarray(logits, float) / t)


def fit_weights(probs: list[np.ndarray], y: np.ndarray, steps: int = 300, seed: int = 0) -> list[float]:
    """Non-negative member weights (summing to 1) that minimise validation NLL of the weighted
    average; softmax-parameterised, plain gradient descent (a handful of members, a few hundred
    validation images: milliseconds)."""
    stack = np.stack([np.asarray(p, float) for p in probs])  # (m, n, k)
    y = np.asarray(y, int)
    target = stack[:, np.arange(len(y)), y]  # (m, n): each member's prob of the true class
    theta = np.zeros(len(probs))
    for _ in range(steps):
        w = np.exp(theta - theta.max())
        w /= w.sum()
        mix = w @ target + 1e-12
        grad_w = -(target / mix).mean(1)  # dNLL/dw
        grad_theta = w * (grad_w - (w * grad_w).sum())
        theta -= 1.0 * grad_theta
    w = np.exp(theta - theta.max())
    return (w / w.sum()).tolist()


def choose_threshold(score: np.ndarray, positive: np.ndarray, target_sensitivity: float = 0.9) -> dict:
    """Highest threshold whose sensitivity (score >= t) reaches the target on this data.

    Returns:
        dict with threshold, the sensitivity and specificity achieved, and n positives/negatives.
    """
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    if positive.sum() == 0:
        raise ValueError("no positive cases to set a sensitivity threshold on")
    candidates = np.unique(score)[::-1]
    chosen = candidates[-1]
    for t in candidates:
        sens = (score[positive] >= t).mean()
        if sens >= target_sensitivity:
            chosen = t
            break
    flag = score >= chosen
    neg = ~positive
    return {
        "threshold": float(chosen), "target_sensitivity": target_sensitivity,
        "sensitivity": float(flag[positive].mean()),
        "specificity": float((~flag[neg]).mean()) if neg.any() else None,
        "n_positive": int(positive.sum()), "n_negative": int(neg.sum()),
    }

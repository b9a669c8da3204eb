"""The T-score estimate: a linear model on out-of-fold predictions, with a split-conformal interval.

Candidates, each a ridge-regularised linear regression on the rows that carry a reference
T-score, cross-fitted over the training folds (fold f's model never saw fold f):

- ``covariates``: age and sex (`covariate_features`: age z-score, female, missing indicators);
- ``image``: the image ensemble's out-of-fold low-BMD and osteoporosis log-odds;
- ``fused``: both.

The rule (`T_SCORE_RULE`): the candidate with the lowest cross-fitted mean absolute error; one
other than ``covariates`` is deployed only when a paired bootstrap says it beats ``covariates``
in MAE with probability at least ``confidence`` (0.9), as for the classifiers
(`kneescreen.model.selection`). The interval is split-conformal: the half-width is the
ceil((n + 1) * coverage)-th smallest cross-fitted absolute residual, so a new film exchangeable
with the training films is covered with probability at least ``coverage`` (marginally).
"""

from __future__ import annotations

import math

import numpy as np

from kneescreen.metrics import wilson
from kneescreen.model.covariates import covariate_features

T_SCORE_RULE = ("min cross-fitted mean absolute error; a candidate other than covariates must beat covariates in "
                "MAE with paired-bootstrap probability >= confidence, else covariates is deployed; interval: "
                "split-conformal, half-width = ceil((n+1)*coverage)-th smallest cross-fitted |residual|")
MIN_T_SCORE_ROWS = 30
FEATURES = {"covariates": ("age_z", "female", "age_missing", "sex_missing"),
            "image": ("image_low_bmd_logit", "image_osteoporosis_logit")}
FEATURES["fused"] = FEATURES["covariates"] + FEATURES["image"]
RIDGE = 1e-2


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def design(kind: str, cov_x: np.ndarray | None, image_probs: np.ndarray | None) -> np.ndarray:
    """The candidate's feature matrix (no intercept column)."""
    parts = []
    if kind in ("covariates", "fused"):
        parts.append(np.asarray(cov_x, float))
    if kind in ("image", "fused"):
        p = np.asarray(image_probs, float)
        parts.append(np.column_stack([_logit(p[:, 1] + p[:, 2]), _logit(p[:, 2])]))
    return np.column_stack(parts)


def fit_linear(x: np.ndarray, t: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
    """(coef, intercept) of a ridge regression (the intercept is not penalised)."""
    mu, tm = x.mean(0), t.mean()
    xc = x - mu
    coef = np.linalg.solve(xc.T @ xc + ridge * len(t) * np.eye(x.shape[1]), xc.T @ (t - tm))
    return coef, float(tm - mu @ coef)


def cross_fitted(x: np.ndarray, t: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions: fold f by the model fit on the other folds."""
    out = np.full(len(t), float(t.mean()))
    for f in np.unique(folds):
        fit = folds != f
        if fit.sum() >= 3:
            coef, icpt = fit_linear(x[fit], t[fit])
            out[~fit] = x[~fit] @ coef + icpt
    return out


def conformal_half_width(abs_residuals, coverage: float = 0.9) -> float | None:
    """The ceil((n + 1) * coverage)-th smallest absolute residual (None: too few rows for it)."""
    r = np.sort(np.asarray(abs_residuals, float))
    k = math.ceil((len(r) + 1) * coverage)
    return float(r[k - 1]) if 1 <= k <= len(r) else None


def pearson_r(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def paired_bootstrap_mae(t, pred_a, pred_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """MAE of A and B on the same rows, the difference (A - B) with a 95% interval, P(A better)."""
    ea, eb = np.abs(np.asarray(pred_a) - t), np.abs(np.asarray(pred_b) - t)
    rng = np.random.default_rng(seed)
    d = np.array([ea[i].mean() - eb[i].mean() for i in (rng.integers(0, len(t), len(t)) for _ in range(n_boot))])
    return {"a": float(ea.mean()), "b": float(eb.mean()), "diff": float(ea.mean() - eb.mean()),
            "lo": float(np.percentile(d, 2.5)), "hi": float(np.percentile(d, 97.5)), "p_a_better": float((d < 0).mean())}


def regression_summary(t, est, lo=None, hi=None) -> dict:
    """MAE, Pearson r and (with an interval) empirical coverage with its Wilson interval."""
    t, est = np.asarray(t, float), np.asarray(est, float)
    out = {"n": int(len(t)), "mae": float(np.abs(est - t).mean()) if len(t) else None, "pearson_r": pearson_r(est, t)}
    if lo is not None and hi is not None:
        inside = (np.asarray(lo, float) <= t) & (t <= np.asarray(hi, float))
        out["coverage"], out["coverage_lo"], out["coverage_hi"] = wilson(int(inside.sum()), len(t))
    return out


def select_t_score(t, folds, cov_x, image_probs, coverage: float = 0.9, confidence: float = 0.9,
                   n_boot: int = 2000) -> dict:
    """Cross-fit every candidate, choose the deployed one by `T_SCORE_RULE`, fit it on all rows.

    Args:
        t, folds: reference T-scores and fold ids of the rows that have one.
        cov_x: `covariate_features` of those rows (None: no age/sex in the collection).
        image_probs: the image ensemble's out-of-fold probabilities on those rows.

    Returns:
        The manifest's ``t_score`` record: predictor, features, coef, intercept, half_width,
        coverage, n, rule, per-candidate cross-fitted metrics and ``vs_covariates``.
    """
    t, folds = np.asarray(t, float), np.asarray(folds)
    kinds = (["covariates", "image", "fused"] if cov_x is not None else ["image"]) if image_probs is not None \
        else ["covariates"]
    oof = {k: cross_fitted(design(k, cov_x, image_probs), t, folds) for k in kinds}
    cands = {k: regression_summary(t, p) for k, p in oof.items()}
    for k in kinds:
        if k != "covariates" and "covariates" in oof:
            cands[k]["vs_covariates"] = paired_bootstrap_mae(t, oof[k], oof["covariates"], n_boot)
    best = min(kinds, key=lambda k: (round(cands[k]["mae"], 9), len(FEATURES[k])))
    record: dict = {"rule": T_SCORE_RULE, "confidence": confidence, "candidates": cands}
    if "covariates" in oof and best != "covariates" and cands[best]["vs_covariates"]["p_a_better"] < confidence:
        record["not_deployed"] = {"name": best, "p_better_than_covariates": cands[best]["vs_covariates"]["p_a_better"]}
        best = "covariates"
    coef, icpt = fit_linear(design(best, cov_x, image_probs), t)
    resid = np.abs(oof[best] - t)
    return {"predictor": best, "features": FEATURES[best], "coef": tuple(float(c) for c in coef), "intercept": icpt,
            "half_width": conformal_half_width(resid, coverage), "coverage": coverage, "n": int(len(t)),
            "selection": record}


def predict_t_score(record, ages, sexes, image_probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, lower, upper) per row from a manifest ``t_score`` record (NaN when it has none)."""
    n = len(image_probs)
    if record is None or record.predictor is None:
        nan = np.full(n, np.nan)
        return nan, nan.copy(), nan.copy()
    cov_x = covariate_features(ages, sexes, record.age_mean, record.age_sd)[0] if record.predictor != "image" else None
    est = design(record.predictor, cov_x, image_probs) @ np.asarray(record.coef) + record.intercept
    hw = np.inf if record.half_width is None else record.half_width
    return est, est - hw, est + hw

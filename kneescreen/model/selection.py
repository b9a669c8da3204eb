"""Choosing the deployed predictor on pooled out-of-fold predictions: never worse than age + sex.

Candidates, each scored on every training image by a model that did not see it (patient-level
k-fold over the whole training collection):

- ``covariates_only``: the age/sex logistic model, the clinical baseline;
- ``image:<rule>``: the image ensemble under each fusion rule;
- ``fused:<rule>``: covariate log-probabilities + beta x image log-probabilities + class biases,
  cross-fitted (the stacker for fold f is fit on the other folds' out-of-fold predictions); beta
  is chosen by log-loss on a grid that includes 0, so an image that adds nothing gets weight 0.

Rows without age or sex fall back to the image ensemble in every candidate, as in screening.

The rule (`SELECTION_RULE`, written into the manifest): the candidate with the highest pooled
out-of-fold balanced accuracy, ties going to fewer inputs; a candidate other than
``covariates_only`` is deployed only when the paired bootstrap says it beats ``covariates_only``
with probability at least ``confidence`` (default 0.9). Otherwise the clinical baseline is
deployed: on small data a lucky image model must not displace age and sex.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneescreen.labels import CLASSES
from kneescreen.metrics import classification_report, paired_bootstrap
from kneescreen.model.covariates import ProductStacker

SELECTION_RULE = ("max pooled out-of-fold balanced accuracy (ties: fewer inputs); a candidate other than "
                  "covariates_only must beat covariates_only in balanced accuracy with paired-bootstrap "
                  "probability >= confidence, else covariates_only is deployed")
INPUTS = {"covariates_only": ("age", "sex"), "image": ("image",), "fused": ("image", "age", "sex")}


@dataclass
class OutOfFold:
    """Pooled out-of-fold predictions over the training collection.

    Attributes:
        y: true class per image; folds: the fold that scored it.
        image: fusion rule -> (probs, pred) of the image ensemble.
        covariates: age/sex model probabilities (None when the collection has no age/sex).
        imputed: rows missing age or sex (they fall back to the image ensemble).
    """

    y: np.ndarray
    folds: np.ndarray
    image: dict[str, tuple[np.ndarray, np.ndarray]]
    covariates: np.ndarray | None = None
    imputed: np.ndarray | None = None


def _with_fallback(probs: np.ndarray, image_probs: np.ndarray, image_pred: np.ndarray, imputed: np.ndarray):
    p = np.where(imputed[:, None], image_probs, probs)
    return p, np.where(imputed, image_pred, p.argmax(1))


def cross_fitted_fused(oof: OutOfFold, rule: str) -> np.ndarray:
    """Fused probabilities where fold f's stacker never saw fold f."""
    img = oof.image[rule][0]
    out = np.zeros_like(img)
    for f in np.unique(oof.folds):
        test, fit = oof.folds == f, (oof.folds != f) & ~oof.imputed
        if len(np.unique(oof.y[fit])) < 2:
            out[test] = img[test]
            continue
        stacker = ProductStacker().fit(oof.covariates[fit], img[fit], oof.y[fit])
        out[test] = stacker.predict_proba(oof.covariates[test], img[test])
    return out


def build_candidates(oof: OutOfFold) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (probs, pred) for every candidate, with the missing-covariate fallback applied."""
    default_rule = next(iter(oof.image))
    cands = {f"image:{rule}": pp for rule, pp in oof.image.items()}
    if oof.covariates is not None:
        img_p, img_pred = oof.image[default_rule]
        cands = {"covariates_only": _with_fallback(oof.covariates, img_p, img_pred, oof.imputed), **cands}
        for rule in oof.image:
            fused = cross_fitted_fused(oof, rule)
            cands[f"fused:{rule}"] = _with_fallback(fused, *oof.image[rule], oof.imputed)
    return cands


def _n_inputs(name: str) -> int:
    return len(INPUTS[name.split(":")[0]])


def _summary(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, n_boot: int) -> dict:
    r = classification_report(y, probs, CLASSES, pred=pred, n_boot=min(n_boot, 500))
    keep = ("balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi", "macro_f1", "macro_f1_lo",
            "macro_f1_hi", "accuracy", "brier", "ece")
    out = {k: r[k] for k in keep}
    out["auc_osteoporosis"] = r["per_class"][CLASSES[-1]]["auc"]
    return out


def select(oof: OutOfFold, confidence: float = 0.9, n_boot: int = 2000,
           candidates: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Score every candidate and choose the deployed one by `SELECTION_RULE`.

    Returns:
        The manifest's ``selection`` record: rule, confidence, n, per-candidate metrics (and
        the paired-bootstrap difference against covariates_only), and ``deployed``.
    """
    cands = candidates or build_candidates(oof)
    y = oof.y
    record: dict = {"rule": SELECTION_RULE, "confidence": confidence, "n": int(len(y)),
                    "folds": int(len(np.unique(oof.folds))), "candidates": {}}
    for name, (probs, pred) in cands.items():
        entry = {"inputs": list(INPUTS[name.split(":")[0]]), **_summary(y, probs, pred, n_boot)}
        if "covariates_only" in cands and name != "covariates_only":
            entry["vs_covariates_only"] = paired_bootstrap(y, probs, cands["covariates_only"][0], n_boot=n_boot)
        record["candidates"][name] = entry
    ranked = sorted(cands, key=lambda n: (-round(record["candidates"][n]["balanced_accuracy"], 9), _n_inputs(n)))
    best = ranked[0]
    if "covariates_only" in cands and best != "covariates_only":
        p_better = record["candidates"][best]["vs_covariates_only"]["balanced_accuracy"]["p_a_better"] or 0.0
        if p_better < confidence:
            record["not_deployed"] = {"name": best, "p_better_than_covariates_only": p_better}
            best = "covariates_only"
    record["deployed"] = best
    return record


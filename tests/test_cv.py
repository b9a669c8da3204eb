"""Cross-validation's pooled out-of-fold report (the numbers docs/results.md quotes), without Ray."""

from __future__ import annotations

import numpy as np

from kneescreen.labels import CLASSES
from kneescreen.metrics import classification_report
from kneescreen.train.cv import pooled_report


def _oof(rng, y_folds):
    out = {"probs": [], "pred": [], "low": []}
    for y in y_folds:
        p = rng.dirichlet(np.ones(3), len(y))
        p[np.arange(len(y)), y] += 1.0  # informative: the true class usually wins
        p /= p.sum(1, keepdims=True)
        out["probs"].append(p)
        out["pred"].append(p.argmax(1))
        out["low"].append(p[:, 1] + p[:, 2] >= 0.5)
    return out


def test_pooled_metrics_are_those_of_the_concatenated_folds():
    rng = np.random.default_rng(0)
    y_folds = [rng.integers(0, 3, 20) for _ in range(5)]
    y = np.concatenate(y_folds)
    ages = list(rng.uniform(30, 85, len(y)))
    oof = {"image_ensemble:soft": _oof(rng, y_folds), "covariates_only": _oof(rng, y_folds)}
    report = pooled_report(oof, y, ages)
    direct = classification_report(y, np.concatenate(oof["covariates_only"]["probs"]), CLASSES, n_boot=2000)
    assert report["covariates_only"]["balanced_accuracy"] == direct["balanced_accuracy"]
    assert report["covariates_only"]["confusion_matrix"] == direct["confusion_matrix"]
    low = report["covariates_only"]["low_bmd"]
    assert low["tp"] + low["fn"] == int((y >= 1).sum())
    # The image ensemble is also reported within age bands (is it reading bone or age?).
    bands = report["image_ensemble:soft"]["by_age_band"]
    assert bands and sum(b["n"] for b in bands.values()) <= len(y) and all(b["n"] >= 8 for b in bands.values())
    # The majority-class baseline is always there to compare against.
    base = report["baseline:majority_class"]
    assert base["accuracy"] == np.bincount(y).max() / len(y)
    assert abs(base["balanced_accuracy"] - 1 / 3) < 1e-9

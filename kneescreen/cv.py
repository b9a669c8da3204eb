"""Patient-level k-fold cross-validation of the whole recipe (members, fusion, covariates,
stacking, thresholds), pooled out-of-fold, for docs/results.md.

Fold f is the test set, fold f+1 the validation set (early stopping, temperature, fusion weights,
stacker, thresholds), the rest train. Every number is computed on out-of-fold predictions only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np

from kneescreen.labels import CLASSES
from kneescreen.metrics import binary_counts, classification_report

_logger = logging.getLogger(__name__)


def run_cv(source: str, out_json: str, cfg, fusion_methods=("soft", "fuzzy_rank", "weighted", "majority")) -> dict:
    from kneescreen.bundle import Bundle
    from kneescreen.datasets import SplitConfig, load_split, run_split
    from kneescreen.evaluate import age_band, low_bmd_threshold, predictor_outputs
    from kneescreen.models import create_model
    from kneescreen.train import ensure_ray, fit_ensemble, load_arrays, subset, train_member

    ensure_ray()
    split_dir = out_json.rsplit("/", 1)[0] + "/cv-split"
    run_split(source, split_dir, SplitConfig(seed=cfg.seed))
    rows = load_split(split_dir)
    k = 1 + max(r["fold"] for r in rows)
    sizes = sorted({m.size() for m in cfg.members})
    arrays = load_arrays(rows, sizes)
    oof: dict[str, dict] = {}
    labels, ages = [], []
    for f in range(k):
        test_m, val_m = arrays["fold"] == f, arrays["fold"] == (f + 1) % k
        train, val, test = subset(arrays, ~test_m & ~val_m), subset(arrays, val_m), subset(arrays, test_m)
        states = []
        for member in cfg.members:
            state, _ = train_member(member, train, val, cfg, f"{cfg.name}-cv{f}-{member.name}")
            states.append(state)
        models = []
        for m, st in zip(cfg.members, states):
            model = create_model(m.architecture, len(CLASSES), m.input_mode, weights=None)
            model.load_state_dict(st)
            models.append(model.eval())
        for method in fusion_methods:
            manifest = fit_ensemble(list(cfg.members), states, val, train, replace(cfg, fusion=method))
            manifest["version"] = f"cv-fold{f}-{method}"
            bundle = Bundle(manifest, models)
            for name, (probs, pred) in predictor_outputs(bundle, test).items():
                th = low_bmd_threshold(manifest, name)
                if method != fusion_methods[0] and not name.startswith("image_ensemble"):
                    continue  # members, covariates and fused are reported once (first method)
                d = oof.setdefault(name, {"probs": [], "pred": [], "low": []})
                d["probs"].append(probs)
                d["pred"].append(pred)
                d["low"].append((probs[:, 1] + probs[:, 2]) >= th)
        labels.append(test["label"])
        ages += list(test["age"])
        _logger.info("fold %d/%d done", f + 1, k)
    y = np.concatenate(labels)
    results = {"n": int(len(y)), "folds": k, "config": json.loads(json.dumps(cfg.__dict__, default=str)),
               "class_counts": dict(zip(CLASSES, np.bincount(y, minlength=3).tolist())), "predictors": {}}
    for name, d in oof.items():
        probs, pred, low = np.concatenate(d["probs"]), np.concatenate(d["pred"]), np.concatenate(d["low"])
        r = classification_report(y, probs, CLASSES, pred=pred, n_boot=2000)
        r["low_bmd"] = binary_counts(y >= 1, low)
        results["predictors"][name] = r
        if name.startswith("image_ensemble"):
            by_band = {}
            for band in sorted({b for b in map(age_band, ages) if b}):
                m = np.array([age_band(a) == band for a in ages])
                if m.sum() >= 8:
                    by_band[band] = {"n": int(m.sum()), "accuracy": float((pred[m] == y[m]).mean())}
            r["by_age_band"] = by_band
    majority = np.full(len(y), int(np.bincount(y).argmax()))
    results["predictors"]["baseline:majority_class"] = classification_report(
        y, np.eye(3)[majority], CLASSES, n_boot=200)
    with open(out_json, "w") as fh:
        json.dump(results, fh, indent=2, default=float)
    return results

"""Patient-level k-fold cross-validation of the whole recipe (members, fusion, covariates,
stacking, thresholds), pooled out-of-fold, for docs/results.md.

Fold f is the test set, fold f+1 the validation set (early stopping, temperature, fusion weights,
stacker, thresholds), the rest train. Every number is computed on out-of-fold predictions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import to_flat_dict
from kneescreen.data.datasets import SplitConfig, load_split, run_split
from kneescreen.io.store import Store, join
from kneescreen.labels import CLASSES, age_band
from kneescreen.metrics import binary_counts, classification_report
from kneescreen.model.bundle import Bundle
from kneescreen.model.ensemble import fit_ensemble, member_manifest
from kneescreen.train.config import TrainConfig
from kneescreen.train.data import load_arrays, subset
from kneescreen.train.evaluate import predictor_outputs
from kneescreen.train.run import train_member

_logger = logging.getLogger(__name__)
FUSION_RULES = ("soft", "fuzzy_rank", "weighted", "majority")


def _fold(f: int, k: int, arrays: dict, cfg: TrainConfig, store: Store, fusion_methods, oof: dict) -> None:
    """Train on the other folds, fit on fold f+1, append fold f's predictions to ``oof``."""
    test_m, val_m = arrays["fold"] == f, arrays["fold"] == (f + 1) % k
    train, val, test = subset(arrays, ~test_m & ~val_m), subset(arrays, val_m), subset(arrays, test_m)
    specs = cfg.member_specs()
    states = [train_member(m, train, val, cfg, f"{cfg.name}-cv{f}-{m.name}", store)[0] for m in specs]
    members = [member_manifest(m.architecture, m.input_mode, m.size(), m.weights) for m in specs]
    for method in fusion_methods:
        manifest = fit_ensemble(members, states, val, train, method, cfg.target_sensitivity)
        bundle = Bundle.from_states(dataclasses.replace(manifest, version=f"cv-fold{f}-{method}"), states)
        for name, (probs, pred) in predictor_outputs(bundle, test).items():
            if method != fusion_methods[0] and not name.startswith("image_ensemble"):
                continue  # members, covariates and fused are reported once (first method)
            d = oof.setdefault(name, {"probs": [], "pred": [], "low": []})
            d["probs"].append(probs)
            d["pred"].append(pred)
            d["low"].append((probs[:, 1] + probs[:, 2]) >= manifest.low_bmd_threshold(name))


def pooled_report(oof: dict, y: np.ndarray, ages: list) -> dict:
    """Metrics with intervals on the pooled out-of-fold predictions of every predictor."""
    out = {}
    for name, d in oof.items():
        probs, pred, low = np.concatenate(d["probs"]), np.concatenate(d["pred"]), np.concatenate(d["low"])
        r = classification_report(y, probs, CLASSES, pred=pred, n_boot=2000)
        r["low_bmd"] = binary_counts(y >= 1, low)
        if name.startswith("image_ensemble"):
            by_band = {}
            for band in sorted({b for b in map(age_band, ages) if b}):
                m = np.array([age_band(a) == band for a in ages])
                if m.sum() >= 8:
                    by_band[band] = {"n": int(m.sum()), "accuracy": float((pred[m] == y[m]).mean())}
            r["by_age_band"] = by_band
        out[name] = r
    majority = np.full(len(y), int(np.bincount(y).argmax()))
    out["baseline:majority_class"] = classification_report(y, np.eye(3)[majority], CLASSES, n_boot=200)
    return out


def run_cv(cfg: TrainConfig, out_json: str, fusion_methods=FUSION_RULES, store: Store | None = None) -> dict:
    """k-fold CV of the whole recipe on ``cfg.data``; writes and returns the pooled results."""
    store = store or Store.resolve(cfg.endpoint_url)
    ensure_ray()
    split_dir = join(out_json.rsplit("/", 1)[0], "cv-split")
    run_split(cfg.data, split_dir, SplitConfig(seed=cfg.seed), store=store)
    rows = load_split(split_dir, store)
    k = 1 + max(r["fold"] for r in rows)
    arrays = load_arrays(rows, sorted({m.size() for m in cfg.member_specs()}), store)
    oof: dict[str, dict] = {}
    labels, ages = [], []
    for f in range(k):
        _fold(f, k, arrays, cfg, store, fusion_methods, oof)
        test_m = arrays["fold"] == f
        labels.append(arrays["label"][test_m])
        ages += [a for a, m in zip(arrays["age"], test_m) if m]
        _logger.info("fold %d/%d done", f + 1, k)
    y = np.concatenate(labels)
    results = {"n": int(len(y)), "folds": k, "config": to_flat_dict(cfg),
               "class_counts": dict(zip(CLASSES, np.bincount(y, minlength=3).tolist())),
               "predictors": pooled_report(oof, y, ages)}
    store.write_bytes(out_json, json.dumps(results, indent=2, default=float).encode())
    return results

"""Patient-level k-fold cross-validation of the whole recipe (members, fusion, covariates,
stacking, thresholds), pooled out-of-fold, for docs/results.md.

Outer fold f is the test set; the recipe `kneescreen train` runs (members, inner out-of-fold
selection of the deployed predictor, calibration, thresholds) is fit on the other folds. Every
number is computed on the pooled outer-fold predictions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import to_flat_dict
from kneescreen.data.split.run import SplitConfig, run_split
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES, age_bands
from kneescreen.metrics import binary_counts, classification_report
from kneescreen.model.bundle import Bundle
from kneescreen.train.config import TrainConfig
from kneescreen.train.data import TrainingData, load_split_data
from kneescreen.train.evaluate import image_value, predictor_outputs, with_logits
from kneescreen.train.oof import FeatureCache
from kneescreen.train.recipe import input_keys
from kneescreen.train.referral_eval import referral_rows, referral_summary
from kneescreen.train.run import check_cluster, fit_bundle

_logger = logging.getLogger(__name__)


def _outer_fold(f: int, data: TrainingData, cfg: TrainConfig, store: Store, oof: dict, cache: FeatureCache) -> str:
    """Fit the whole recipe (members, out-of-fold selection) without fold f; score fold f.

    Returns:
        The candidate the recipe deployed for this fold.
    """
    # A run name of its own per outer fold: fine-tuning runs resume by name, and a fold must never
    # resume (reuse) the models another fold trained on its test rows.
    fold_cfg = dataclasses.replace(cfg, name=f"{cfg.name}-outer{f}")
    manifest, states, _ = fit_bundle(data, data["fold"] != f, fold_cfg, store, cache)
    bundle = Bundle.from_states(dataclasses.replace(manifest, version=f"cv-fold{f}"), states)
    test = with_logits(bundle, data.where(data["fold"] == f))
    for name, (probs, pred) in predictor_outputs(bundle, test).items():
        # Each fold's recipe picks its own fusion rule: pool "image_ensemble" and "fused" by role.
        role = name.split(":", 1)[0] if name.startswith(("image_ensemble:", "fused:")) else name
        d = oof.setdefault(role, {"probs": [], "pred": [], "low": []})
        d["probs"].append(probs)
        d["pred"].append(pred)
        d["low"].append((probs[:, 1] + probs[:, 2]) >= manifest.low_bmd_threshold(name))
    # Triage zones and T-score estimates of this fold's bundle, pooled by `run_cv`.
    rows = referral_rows(bundle, test)
    for k, v in rows.items():
        oof.setdefault("_referral", {}).setdefault(k, []).append(v)
    oof.setdefault("_stated", []).append({"triage": dataclasses.asdict(manifest.triage) if manifest.triage else None,
                                          "t_score": dataclasses.asdict(manifest.t_score) if manifest.t_score else None})
    return manifest.selection["deployed"]


def pooled_report(oof: dict, y: np.ndarray, ages) -> dict:
    """Metrics with intervals on the pooled out-of-fold predictions of every predictor."""
    out = {}
    for name, d in oof.items():
        probs, pred, low = np.concatenate(d["probs"]), np.concatenate(d["pred"]), np.concatenate(d["low"])
        r = classification_report(y, probs, CLASSES, pred=pred, n_boot=2000)
        r["low_bmd"] = binary_counts(y >= 1, low)
        if name.startswith("image_ensemble"):
            by_band, of_row = {}, age_bands(ages)
            for band in sorted({b for b in of_row if b}):
                m = of_row == band
                if m.sum() >= 8:
                    by_band[band] = {"n": int(m.sum()), "accuracy": float((pred[m] == y[m]).mean())}
            r["by_age_band"] = by_band
        out[name] = r
    majority = np.full(len(y), int(np.bincount(y).argmax()))
    out["baseline:majority_class"] = classification_report(y, np.eye(3)[majority], CLASSES, n_boot=200)
    return out


def _pooled_referral(rows: dict, stated: list[dict]) -> dict:
    """Zones and T-score figures over the pooled outer folds, with what each fold's bundle stated."""
    pooled = {k: np.concatenate(v) for k, v in rows.items()}
    out = referral_summary(pooled)
    if all(s["triage"] for s in stated):
        out["triage"] = {**(referral_summary(pooled, {})["triage"] or {}), "stated": [s["triage"] for s in stated]}
    if out["t_score"] is not None:
        out["t_score"].pop("estimate")  # the per-row lists stay out of the JSON summary
        out["t_score"].pop("reference")
    out["t_score_stated"] = [s["t_score"] for s in stated]
    return out


def run_cv(cfg: TrainConfig, out_json: str, store: Store | None = None) -> dict:
    """Patient-level k-fold CV of the whole recipe on ``cfg.data``; writes and returns the pooled results.

    Each outer fold is scored by a bundle fit (members, selection, thresholds) without it, so the
    ``deployed`` row is an honest estimate of what `kneescreen train` deploys.
    """
    cfg.validate()
    store = store or Store.resolve(cfg.endpoint_url)
    ensure_ray()
    check_cluster(cfg)
    split_dir = join(out_json.rsplit("/", 1)[0], "cv-split")
    run_split(cfg.data, split_dir, SplitConfig(seed=cfg.seed), store=store)
    data, info = load_split_data(split_dir, input_keys(cfg), store)
    k = info["folds"]
    oof: dict = {}
    cache = FeatureCache(data)  # frozen features once per image, shared by every outer fold
    # The pooled rows in outer-fold order: metadata columns (NumPy), not per-row lists.
    order, deployed = np.concatenate([np.nonzero(data["fold"] == f)[0] for f in range(k)]), []
    for f in range(k):
        deployed.append(_outer_fold(f, data, cfg, store, oof, cache))
        _logger.info("fold %d/%d done", f + 1, k)
    y, ages, sexes, tscores = (data[c][order] for c in ("label", "age", "sex", "t_score"))
    referral = _pooled_referral(oof.pop("_referral"), oof.pop("_stated"))
    # A predictor some fold's bundle lacks (e.g. no fused model when that fold's age/sex model
    # could not be fit) has no pooled estimate: say so instead of pooling misaligned rows.
    partial = sorted(n for n, d in oof.items() if len(d["probs"]) != k)
    for name in partial:
        _logger.warning("cv: %s missing from some outer folds; left out of the pooled results", name)
        del oof[name]
    results = {"n": int(len(y)), "folds": k, "config": to_flat_dict(cfg), "deployed_per_fold": deployed,
               "left_out_predictors": partial,
               "class_counts": dict(zip(CLASSES, np.bincount(y, minlength=3).tolist())),
               "predictors": pooled_report(oof, y, ages),
               "image_value": image_value(oof, y, ages, sexes, tscores), "referral": referral}
    store.write_bytes(out_json, json.dumps(results, indent=2, default=float).encode())
    return results

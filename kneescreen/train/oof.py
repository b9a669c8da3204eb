"""Out-of-fold predictions over the whole training collection (every non-test image).

The split's patient-level folds (leak-free groups, stratified by class) are reused, merged to
``oof_folds``. For each fold f every model is fit on the other folds and scores fold f, so each
image is predicted once by a model that never saw it:

- frozen members: features are computed once (Ray Data tasks, kept in the object store; once per
  image for all outer folds of cross-validation too, `FeatureCache`); only the shrinkage head is
  refit per fold (L-BFGS, in one Ray task given a node's free CPUs and a GPU when there is one);
- fine-tuned members: one model per fold (trained on k-2 folds, early stopping on the next
  fold; so at least 3 folds), all of them and the deployable model trained one after another in
  one Ray Train run per member — k+1 trainings, which is why the default member is frozen;
- the age/sex model: refit per fold.

The final models are then fit on all of it (frozen heads, the age/sex model) or trained as before
on the train split with the validation split for early stopping (fine-tuned members); calibration,
fusion weights, the stacker and thresholds come from the pooled out-of-fold predictions.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
from torch import nn

from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES, to_floats
from kneescreen.model.covariates import LogisticModel, covariate_features
from kneescreen.model.ensemble import member_manifest
from kneescreen.model.frozen import bake_head, extract_features, heads_out_of_fold
from kneescreen.model.manifest import BundleManifest, Threshold, Thresholds
from kneescreen.model.registry import create_model, normalisation
from kneescreen.train.config import MemberSpec, TrainConfig
from kneescreen.train.data import TrainingData, bundle_logits, collect, map_model
from kneescreen.train.trainer import FINAL, Fit, train_fits

_logger = logging.getLogger(__name__)
MIN_COVARIATE_ROWS = 10


def _feature_build(p: dict):
    model = create_model(p["architecture"], len(CLASSES), p["input_mode"], weights=None)
    model.load_state_dict(p["state"])
    return model, p


def _features(built, batch: dict) -> np.ndarray:
    model, p = built
    return extract_features(model, batch[p["input_key"]], p["input_mode"], p["mean"], p["std"]).astype(np.float32)


@ray.remote(num_cpus=1)
def _fit_frozen_heads(features: ray.data.Dataset, feature_rows: np.ndarray, rows: np.ndarray, y: np.ndarray,
                      folds: np.ndarray):
    """In a Ray task (the n x d features never reach the driver): a shrinkage head per fold scores
    that fold, then the final head on all rows, with the task's CPUs as torch threads (and its GPU
    when it has one). ``features`` holds ``feature_rows`` (sorted), a superset of ``rows``.
    Returns (out-of-fold logits, (head, mu, sd, l2), d)."""
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    feats = collect(features, feature_rows)[np.searchsorted(feature_rows, rows)]
    logits, final = heads_out_of_fold(feats, y, len(CLASSES), folds)
    return logits, final, feats.shape[1]


def _head_resources() -> dict:
    """Task options for the head fit: one GPU if any node has one, and as many CPUs as the largest
    such node has free now (at least 1; a single task cannot span nodes)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpu = [r for r in nodes if r.get("GPU", 0) >= 1]
    cpus = max((int(r.get("CPU", 1)) for r in (gpu or nodes)), default=1)
    cpus = max(1, min(cpus, int(ray.available_resources().get("CPU", 1))))
    return {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}


class FeatureCache:
    """Frozen features of every row of ``data``, computed once per member and kept in the object
    store, so the outer folds of cross-validation (each fitting on a subset) reuse them; the
    backbone's state is kept with them (a ``--weights none`` backbone is random: every fold must
    bake its head into the backbone that made the features)."""

    def __init__(self, data: TrainingData):
        self.data, self._entries = data, {}

    def get(self, member: MemberSpec, store: Store) -> tuple[nn.Module, ray.data.Dataset, np.ndarray]:
        """(a fresh copy of the backbone, its features dataset, the rows it holds, sorted)."""
        key = (member.architecture, member.input_mode, member.input_key, member.weights)
        if key not in self._entries:
            mean, std = normalisation(member.architecture, member.input_mode)
            model = create_model(member.architecture, len(CLASSES), member.input_mode, member.weights, store=store)
            payload = {"architecture": member.architecture, "input_mode": member.input_mode,
                       "input_key": member.input_key, "mean": mean, "std": std,
                       "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
            features = map_model(self.data, [member.input_key], payload, _feature_build, _features).materialize()
            self._entries[key] = (payload, features)
        payload, features = self._entries[key]
        return _feature_build(payload)[0], features, self.data["row"]


def _frozen(member: MemberSpec, dev: TrainingData, folds: np.ndarray, store: Store,
            cache: FeatureCache | None = None) -> tuple[np.ndarray, dict, dict]:
    """(out-of-fold logits, final state dict, notes) of a frozen-feature member.

    Features are computed in Ray Data tasks from the decoded blocks and kept in the object store
    (once per image across calls sharing ``cache``); the heads are fit in one Ray task; the driver
    bakes the final head into the backbone (weights read from ``store``)."""
    model, features, feature_rows = (cache or FeatureCache(dev)).get(member, store)
    task = _fit_frozen_heads.options(**_head_resources())
    logits, (head, mu, sd, l2), dim = ray.get(task.remote(features, feature_rows, dev["row"], dev["label"], folds))
    bake_head(model, head, mu, sd)
    return logits, {k: v.detach().cpu() for k, v in model.state_dict().items()}, {"l2": l2, "features": dim}


def _logits_of(member: MemberSpec, state: dict, rows: TrainingData) -> np.ndarray:
    draft = BundleManifest(members=(member_manifest(member.architecture, member.input_mode, member.size(), None,
                                                    view=member.view),),
                           thresholds=Thresholds(Threshold(0.5), Threshold(0.5)))
    return bundle_logits(rows, draft, [state])[0]


def _finetuned(member: MemberSpec, dev: TrainingData, folds: np.ndarray, cfg: TrainConfig, store: Store,
               final: tuple[TrainingData, TrainingData]) -> tuple[np.ndarray, dict, dict]:
    """(out-of-fold logits, final state dict, history) of a fine-tuned member: every fit in one
    Ray Train run named after the member (`train.trainer.train_fits`)."""
    # The deployable fit first: an interrupted training resumes the model users get before
    # spending time on the out-of-fold fits.
    ids = np.unique(folds)
    fits = [Fit(FINAL, *final)]
    for i, f in enumerate(ids):
        val_f = ids[(i + 1) % len(ids)]
        fits.append(Fit(f"oof{f}", dev.where((folds != f) & (folds != val_f)), dev.where(folds == val_f)))
    trained = train_fits(member, fits, cfg, f"{cfg.name}-{member.name}", store)
    logits = np.zeros((len(dev["label"]), len(CLASSES)))
    for f, (fold_state, _) in zip(ids, trained[1:]):
        logits[folds == f] = _logits_of(member, fold_state, dev.where(folds == f))
    state, history = trained[0]
    return logits, state, {"history": history}


def member_out_of_fold(member: MemberSpec, dev: TrainingData, folds: np.ndarray, cfg: TrainConfig, store: Store,
                       final: tuple[TrainingData, TrainingData], cache: FeatureCache | None = None
                       ) -> tuple[np.ndarray, dict, dict]:
    """Out-of-fold logits, the deployable state dict and training notes of one member.

    Args:
        dev: every non-test image (decoded blocks in the object store, metadata here);
            folds: fold id per dev image (aligned with ``dev.meta``).
        final: (train, val) rows for the final fine-tuning run (fine-tuned members only).
        cache: frozen features of a superset of ``dev``, shared across calls (cross-validation).
    """
    _logger.info("member %s (%s): out-of-fold predictions over %d folds", member.name, member.head, len(np.unique(folds)))
    if member.head == "frozen":
        return _frozen(member, dev, folds, store, cache)
    return _finetuned(member, dev, folds, cfg, store, final)


def covariate_out_of_fold(dev, folds: np.ndarray):
    """(out-of-fold probs, imputed mask, final model, age mean, age sd), or None without age/sex."""
    age = to_floats(dev["age"])
    ages = age[~np.isnan(age)]
    age_mean = float(np.mean(ages)) if len(ages) else 65.0
    age_sd = float(np.std(ages)) if len(ages) > 1 and np.std(ages) > 0 else 12.0
    x, imputed = covariate_features(age, dev["sex"], age_mean, age_sd)
    if (~imputed).sum() < MIN_COVARIATE_ROWS:
        return None
    y = dev["label"]

    def fit(mask):
        counts = np.bincount(y[mask], minlength=len(CLASSES)).astype(float)
        cw = counts.sum() / (len(CLASSES) * np.maximum(counts, 1))
        return LogisticModel(l2=1e-2).fit(x[mask], y[mask], len(CLASSES), class_weight=cw)

    probs = np.zeros((len(y), len(CLASSES)))
    for f in np.unique(folds):
        probs[folds == f] = fit((folds != f) & ~imputed).predict_proba(x[folds == f])
    return probs, imputed, fit(~imputed), age_mean, age_sd

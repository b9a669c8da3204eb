"""Trained members -> a bundle manifest: temperatures, fusion weights, the age/sex model, the
fused (stacked) model and operating thresholds, all fit on data the members did not train on.

Used by training (on the validation split) and by cross-validation (per fold). ``data`` dicts
hold ``label`` (class indices), ``age``, ``sex`` and ``images`` (size -> (n, s, s) uint8).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from kneescreen.labels import CLASSES
from kneescreen.model.bundle import Bundle
from kneescreen.model.covariates import (
    LogisticModel,
    ProductStacker,
    covariate_features,
)
from kneescreen.model.fusion import (
    apply_temperature,
    choose_threshold,
    fit_temperature,
    fit_weights,
    fuse,
)
from kneescreen.model.manifest import (
    BundleManifest,
    CovariateManifest,
    FusionManifest,
    MemberManifest,
    StackerManifest,
    Threshold,
    Thresholds,
)
from kneescreen.model.registry import normalisation

_logger = logging.getLogger(__name__)
MIN_COVARIATE_ROWS = 10  # training rows with both age and sex needed to fit the age/sex model


def member_manifest(architecture: str, input_mode: str, image_size: int, weights_init: str | None) -> MemberManifest:
    """A member's manifest entry before calibration (temperature 1)."""
    mean, std = normalisation(architecture, input_mode)
    return MemberManifest(architecture, input_mode, image_size, tuple(mean), tuple(std), weights_init)


def _threshold(score: np.ndarray, positive: np.ndarray, target_sensitivity: float) -> Threshold:
    if not positive.any() or positive.all():
        _logger.warning("validation split has %s: threshold left at 0.5; use a larger validation split",
                        "no positive cases" if not positive.any() else "no negative cases")
        return Threshold(0.5, note="validation split lacks positives or negatives")
    return Threshold(**choose_threshold(score, positive, target_sensitivity))


def _calibrate(members: list[MemberManifest], states: list[dict], val: dict, fusion: str):
    """Temperature per member and fusion weights on ``val``.

    Returns:
        (calibrated members, fusion manifest, member probabilities, image-ensemble probabilities)
    """
    y = val["label"]
    draft = BundleManifest(members=tuple(members), thresholds=Thresholds(Threshold(0.5), Threshold(0.5)))
    logits = Bundle.from_states(draft, states).member_logits(val["images"])
    calibrated, probs = [], []
    for spec, lg in zip(members, logits):
        t = fit_temperature(lg, y)
        calibrated.append(dataclasses.replace(spec, temperature=t))
        probs.append(apply_temperature(lg, t))
    weights = tuple(fit_weights(probs, y)) if fusion == "weighted" else None
    image_probs, _ = fuse(fusion, probs, weights)
    return calibrated, FusionManifest(fusion, weights), probs, image_probs


def _fit_covariates(train: dict, val: dict, image_probs: np.ndarray):
    """Age/sex model on training rows, product stacker on validation.

    Returns:
        (CovariateManifest, StackerManifest, covariate probs on val, final val probs), or None
        when too few training rows carry both age and sex.
    """
    ages = [a for a in train["age"] if a is not None]
    age_mean = float(np.mean(ages)) if ages else 65.0
    age_sd = float(np.std(ages)) if len(ages) > 1 and np.std(ages) > 0 else 12.0
    x_tr, imp_tr = covariate_features(train["age"], train["sex"], age_mean, age_sd)
    if (~imp_tr).sum() < MIN_COVARIATE_ROWS:
        return None
    counts = np.bincount(train["label"], minlength=len(CLASSES)).astype(float)
    cw = counts.sum() / (len(CLASSES) * np.maximum(counts, 1))
    # Age/sex are not images: fitting them on training rows leaks nothing through augmentation.
    cov = LogisticModel(l2=1e-2).fit(x_tr, train["label"], len(CLASSES), class_weight=cw)
    x_val, imp_val = covariate_features(val["age"], val["sex"], age_mean, age_sd)
    p_cov_val = cov.predict_proba(x_val)
    stacker = ProductStacker().fit(p_cov_val, image_probs, val["label"])
    # Thresholds are set on the stacker's own validation output (in-sample for the stacker:
    # honest evaluation of the fused model happens on the test split / CV folds).
    final = np.where(imp_val[:, None], image_probs, stacker.predict_proba(p_cov_val, image_probs))
    return (CovariateManifest(cov.to_dict(), age_mean, age_sd), StackerManifest(stacker.to_dict()), p_cov_val, final)


def fit_ensemble(members: list[MemberManifest], states: list[dict], val: dict, train: dict, fusion: str = "soft",
                 target_sensitivity: float = 0.9) -> BundleManifest:
    """Fit temperatures, fusion weights, covariate model, stacker and thresholds.

    Returns:
        The manifest (no files or version yet), ready for `save_bundle`.
    """
    y = val["label"]
    calibrated, fusion_m, probs, image_probs = _calibrate(members, states, val, fusion)
    per = {f"member:{m.name}": p for m, p in zip(calibrated, probs)}
    per[f"image_ensemble:{fusion}"] = image_probs
    covariates = stacker = None
    final = image_probs
    fitted = _fit_covariates(train, val, image_probs)
    if fitted is not None:
        covariates, stacker, p_cov_val, final = fitted
        per["covariates_only"], per["fused"] = p_cov_val, final
    thresholds = Thresholds(_threshold(final[:, 1] + final[:, 2], y >= 1, target_sensitivity),
                            _threshold(final[:, 2], y == 2, target_sensitivity))
    return BundleManifest(
        members=tuple(calibrated), thresholds=thresholds, fusion=fusion_m,
        predictor="fused" if fitted else "image", inputs=("image", "age", "sex") if fitted else ("image",),
        covariates=covariates, stacker=stacker,
        predictor_thresholds={name: _threshold(p[:, 1] + p[:, 2], y >= 1, target_sensitivity).threshold
                              for name, p in per.items()},
    )

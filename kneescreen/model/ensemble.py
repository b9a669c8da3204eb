"""Members' pooled out-of-fold predictions -> a bundle manifest.

Temperatures, fusion weights, the fused (stacked) model, the choice of the deployed predictor
(`kneescreen.model.selection`) and the operating thresholds are all fit on out-of-fold
predictions: every number comes from images the scoring model did not see.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from kneescreen.labels import CLASSES, to_floats
from kneescreen.model.covariates import LogisticModel, ProductStacker
from kneescreen.model.fusion import FUSION_METHODS, apply_temperature, choose_threshold, fit_temperature, fit_weights, fuse
from kneescreen.model.covariates import covariate_features, sex_codes
from kneescreen.model.manifest import (
    BundleManifest, CovariateManifest, FusionManifest, MemberManifest, StackerManifest, Threshold, Thresholds,
    TriageManifest, TriageZone, TScoreManifest,
)
from kneescreen.model.registry import normalisation
from kneescreen.model.selection import OutOfFold, build_candidates, select
from kneescreen.model.tscore import MIN_T_SCORE_ROWS, select_t_score
from kneescreen.triage import fit_zones

_logger = logging.getLogger(__name__)
PREDICTOR_OF = {"covariates_only": "covariates", "image": "image", "fused": "fused"}


def member_manifest(architecture: str, input_mode: str, image_size: int, weights_init: str | None,
                    training: str = "finetune", view: str = "img") -> MemberManifest:
    """A member's manifest entry before calibration (temperature 1)."""
    mean, std = normalisation(architecture, input_mode)
    return MemberManifest(architecture, input_mode, image_size, tuple(mean), tuple(std), weights_init,
                          training=training, view=view)


@dataclass
class CovariateFit:
    """The age/sex model fit on all training rows, and its out-of-fold predictions."""

    model: LogisticModel
    age_mean: float
    age_sd: float
    oof_probs: np.ndarray
    imputed: np.ndarray


def threshold_for(score: np.ndarray, positive: np.ndarray, target_sensitivity: float) -> Threshold:
    """Highest threshold reaching the target sensitivity (0.5 with a note when it cannot be set)."""
    if not positive.any() or positive.all():
        _logger.warning("training data has %s: threshold left at 0.5",
                        "no positive cases" if not positive.any() else "no negative cases")
        return Threshold(0.5, note="no positives or no negatives to set a threshold on")
    return Threshold(**choose_threshold(score, positive, target_sensitivity))


@dataclass(frozen=True)
class Targets:
    """What the triage zones and the T-score interval aim for (TrainConfig flags)."""

    npv: float = 0.95
    ppv: float = 0.95
    confidence: float = 0.95
    t_score_coverage: float = 0.9


def triage_manifest(risk: np.ndarray, positive: np.ndarray, targets: Targets) -> TriageManifest:
    """Rule-out / rule-in thresholds on pooled out-of-fold risk (`kneescreen.triage.fit_zones`)."""
    z = fit_zones(risk, positive, targets.npv, targets.ppv, targets.confidence)
    for name in ("rule_out", "rule_in"):
        if z[name]["threshold"] is None:
            _logger.warning("triage zone %s is empty: %s", name, z[name]["reason"])
    return TriageManifest(TriageZone(**z["rule_out"]), TriageZone(**z["rule_in"]), z["prevalence"], z["n"],
                          z["n_positive"], z["confidence"])


def t_score_manifest(t_scores, ages, sexes, folds: np.ndarray, image_probs: np.ndarray,
                     covariates: CovariateFit | None, targets: Targets) -> TScoreManifest:
    """The T-score estimate fit on the rows with a reference T-score (`kneescreen.model.tscore`)."""
    t = to_floats(t_scores)
    have = np.isfinite(t)
    if have.sum() < MIN_T_SCORE_ROWS:
        return TScoreManifest(n=int(have.sum()), coverage=targets.t_score_coverage,
                              reason=f"{int(have.sum())} training images carry a reference T-score; at least "
                                     f"{MIN_T_SCORE_ROWS} are needed to fit and calibrate an estimate")
    age_mean, age_sd = (covariates.age_mean, covariates.age_sd) if covariates else (65.0, 12.0)
    cov_x = covariate_features(to_floats(ages)[have], sex_codes(sexes)[have], age_mean, age_sd)[0] \
        if covariates else None
    rec = select_t_score(t[have], folds[have], cov_x, image_probs[have], targets.t_score_coverage)
    return TScoreManifest(rec["predictor"], tuple(rec["features"]), rec["coef"], rec["intercept"], age_mean, age_sd,
                          rec["half_width"], rec["coverage"], rec["n"], rec["selection"])


def _image_oof(members: list[MemberManifest], logits: list[np.ndarray], y: np.ndarray, rules):
    """Calibrated members and, per fusion rule, (weights, (probs, pred)) of the image ensemble."""
    calibrated, probs = [], []
    for spec, lg in zip(members, logits):
        t = fit_temperature(lg, y)
        calibrated.append(dataclasses.replace(spec, temperature=t))
        probs.append(apply_temperature(lg, t))
    fused = {}
    for rule in rules:
        weights = tuple(fit_weights(probs, y)) if rule == "weighted" else None
        fused[rule] = (weights, fuse(rule, probs, weights))
    return calibrated, probs, fused


def fit_ensemble(members: list[MemberManifest], oof_logits: list[np.ndarray], y: np.ndarray, folds: np.ndarray,
                 covariates: CovariateFit | None, fusion: str = "soft", target_sensitivity: float = 0.9,
                 confidence: float = 0.9, targets: Targets = Targets(), t_scores=None, ages=None,
                 sexes=None, with_oof: bool = False):
    """Calibrate, fuse, select the deployed predictor and set thresholds, all out of fold.

    Args:
        members: manifest entries of the trained members; oof_logits: their out-of-fold logits.
        y, folds: true classes and fold ids of the pooled rows.
        covariates: the age/sex fit (None: image-only collection).
        targets: triage NPV / PPV targets and the T-score interval coverage.
        t_scores, ages, sexes: per pooled row (None where missing), for the T-score estimate.
        fusion: the fusion rule for one member / the fallback; with several members every rule
            in `FUSION_METHODS` is a candidate.

    Returns:
        The manifest (no files or version yet), ready for `save_bundle`; with ``with_oof``,
        (manifest, the deployed predictor's pooled out-of-fold probabilities).
    """
    rules = [fusion] + [r for r in FUSION_METHODS if r != fusion] if len(members) > 1 else [fusion]
    calibrated, member_probs, by_rule = _image_oof(members, oof_logits, y, rules)
    oof = OutOfFold(y=y, folds=folds, image={r: pp for r, (_, pp) in by_rule.items()},
                    covariates=covariates.oof_probs if covariates else None,
                    imputed=covariates.imputed if covariates else np.ones(len(y), bool))
    cands = build_candidates(oof)
    selection = select(oof, confidence=confidence, candidates=cands)
    deployed = selection["deployed"]
    kind, _, rule = deployed.partition(":")
    rule = rule or fusion
    final_probs = cands[deployed][0]
    per = {f"member:{m.name}": p for m, p in zip(calibrated, member_probs)}
    per.update({(f"image_ensemble:{r}" if n.startswith("image:") else n): pp[0]
                for n, pp in cands.items() for r in [n.partition(":")[2]]})
    cov_m = stacker = None
    if covariates:
        cov_m = CovariateManifest(covariates.model.to_dict(), covariates.age_mean, covariates.age_sd)
        keep = ~covariates.imputed
        # Kept even when not deployed: evaluation reports what the fused model would add.
        stacker = StackerManifest(ProductStacker().fit(covariates.oof_probs[keep], by_rule[rule][1][0][keep],
                                                       y[keep]).to_dict(), fit_on="pooled out-of-fold predictions")
    n = len(y)
    none = [None] * n
    t_score = t_score_manifest(none if t_scores is None else t_scores, none if ages is None else ages,
                               none if sexes is None else sexes, folds,
                               by_rule[rule][1][0], covariates, targets)
    manifest = BundleManifest(
        members=tuple(calibrated), fusion=FusionManifest(rule, by_rule[rule][0]),
        thresholds=Thresholds(threshold_for(final_probs[:, 1] + final_probs[:, 2], y >= 1, target_sensitivity),
                              threshold_for(final_probs[:, 2], y == len(CLASSES) - 1, target_sensitivity)),
        predictor=PREDICTOR_OF[kind], inputs=tuple(selection["candidates"][deployed]["inputs"]),
        covariates=cov_m, stacker=stacker, selection=selection,
        triage=triage_manifest(final_probs[:, 1] + final_probs[:, 2], y >= 1, targets), t_score=t_score,
        predictor_thresholds={name: threshold_for(p[:, 1] + p[:, 2], y >= 1, target_sensitivity).threshold
                              for name, p in per.items()},
    )
    return (manifest, final_probs) if with_oof else manifest

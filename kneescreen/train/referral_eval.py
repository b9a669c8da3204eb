"""Held-out figures for the triage zones and the T-score estimate (added to `evaluate`'s report and
pooled over outer folds by `train.cv`).

Per zone: the achieved NPV (rule_out) / PPV (rule_in) with two-sided 95% Clopper-Pearson intervals
and the fraction of images triaged, beside the out-of-fold values the bundle states; for the
T-score: MAE, Pearson r and the empirical coverage of the conformal interval (Wilson 95%).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kneescreen.labels import to_floats
from kneescreen.model.bundle import Bundle
from kneescreen.model.tscore import regression_summary
from kneescreen.triage import zone_summary


def referral_rows(bundle: Bundle, data: dict) -> dict:
    """Per row: ``zone`` (None without triage), ``t_est`` / ``t_lo`` / ``t_hi`` (NaN without an
    estimate), ``low`` (true low BMD) and ``t`` (reference T-score, NaN where missing).

    Args:
        data: ``label``, ``age``, ``sex``, ``t_score`` (optional) and ``member_logits``
            (`evaluate.with_logits`) or ``images``, as `evaluate.predictor_outputs` takes.
    """
    if "member_logits" in data:
        pred = bundle.predict_logits(data["member_logits"], data["age"], data["sex"])
    else:
        pred = bundle.predict(data["images"], data["age"], data["sex"])
    y = np.asarray(data["label"], int)
    zone = pred.triage_zone if pred.triage_zone is not None else np.full(len(y), None, dtype=object)
    t = to_floats(data["t_score"]) if data.get("t_score") is not None else np.full(len(y), np.nan)
    return {"zone": zone, "t_est": pred.t_score_est, "t_lo": pred.t_score_lo, "t_hi": pred.t_score_hi,
            "low": y >= 1, "t": t}


def referral_summary(rows: dict, triage: dict | None = None, t_score: dict | None = None) -> dict:
    """``{"triage": ..., "t_score": ...}`` from (pooled) `referral_rows`.

    Args:
        triage, t_score: what the bundle states (its manifest sections as dicts), shown beside.
    """
    out: dict = {"triage": None, "t_score": None}
    if triage is not None:
        out["triage"] = {**zone_summary(rows["zone"], rows["low"]), "stated": triage}
    have = np.isfinite(rows["t"]) & np.isfinite(rows["t_est"])
    if have.any():
        out["t_score"] = {**regression_summary(rows["t"][have], rows["t_est"][have], rows["t_lo"][have],
                                               rows["t_hi"][have]),
                          "estimate": rows["t_est"][have].tolist(), "reference": rows["t"][have].tolist()}
    elif t_score is not None:
        out["t_score"] = {"n": 0, "reason": t_score.get("reason") or "no held-out reference T-scores"}
    if out["t_score"] is not None and t_score is not None:
        out["t_score"].update(predictor=t_score.get("predictor"), nominal_coverage=t_score.get("coverage"))
    return out


def referral_figures(bundle: Bundle, data: dict) -> dict:
    """`referral_summary` of one bundle on labelled rows (`evaluate.evaluate_arrays`)."""
    m = bundle.manifest
    return referral_summary(referral_rows(bundle, data), dataclasses.asdict(m.triage) if m.triage else None,
                            dataclasses.asdict(m.t_score) if m.t_score else None)

"""Held-out figures for the triage zones and the T-score estimate (added to `evaluate`'s report).

Per zone: the achieved NPV (rule_out) / PPV (rule_in) with two-sided 95% Clopper-Pearson intervals
and the fraction of images triaged, beside the out-of-fold values the bundle states; for the
T-score: MAE, Pearson r and the empirical coverage of the conformal interval (Wilson 95%).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kneescreen.model.bundle import Bundle
from kneescreen.model.tscore import regression_summary
from kneescreen.triage import zone_summary


def referral_figures(bundle: Bundle, data: dict) -> dict:
    """``{"triage": ..., "t_score": ...}`` for labelled rows; each None when the bundle has none.

    Args:
        data: ``label``, ``age``, ``sex``, ``t_score`` (optional) and ``member_logits``
            (`evaluate.with_logits`) or ``images``, as `evaluate.predictor_outputs` takes.
    """
    m = bundle.manifest
    if "member_logits" in data:
        pred = bundle.predict_logits(data["member_logits"], data["age"], data["sex"])
    else:
        pred = bundle.predict(data["images"], data["age"], data["sex"])
    y = np.asarray(data["label"], int)
    out: dict = {"triage": None, "t_score": None}
    if m.triage is not None:
        summary = zone_summary(pred.triage_zone, y >= 1)
        summary["stated"] = dataclasses.asdict(m.triage)
        out["triage"] = summary
    t = np.array([np.nan if v is None else float(v) for v in data.get("t_score") or [None] * len(y)], float)
    have = np.isfinite(t) & np.isfinite(pred.t_score_est)
    if m.t_score is not None and m.t_score.predictor is not None and have.any():
        out["t_score"] = {**regression_summary(t[have], pred.t_score_est[have], pred.t_score_lo[have],
                                               pred.t_score_hi[have]),
                          "predictor": m.t_score.predictor, "nominal_coverage": m.t_score.coverage,
                          "estimate": pred.t_score_est[have].tolist(), "reference": t[have].tolist()}
    elif m.t_score is not None:
        out["t_score"] = {"n": int(have.sum()), "reason": m.t_score.reason or "no held-out reference T-scores"}
    return out

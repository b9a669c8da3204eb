"""Triage zones (kneescreen.triage) and the T-score estimate (kneescreen.model.tscore) on synthetic
data with known prevalence: zones meet their Clopper-Pearson bounds or are empty with a reason,
the conformal interval covers what it says, and the manifest carries both (older bundles load)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from kneescreen.errors import KneescreenError
from kneescreen.model.ensemble import CovariateFit, Targets, t_score_manifest, triage_manifest
from kneescreen.model.covariates import LogisticModel, covariate_features
from kneescreen.model.manifest import BundleManifest
from kneescreen.model.tscore import conformal_half_width, predict_t_score, regression_summary, select_t_score
from kneescreen.triage import (
    assign_zones, betainc, clopper_pearson, clopper_pearson_lower, fit_zones, value_at_prevalence, zone_summary,
)


def _scores(n: int, prevalence: float, separation: float, seed: int):
    """Low-BMD truth at ``prevalence`` and a risk whose classes differ by ``separation``."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    risk = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + separation * (y - 0.5))))
    return risk, y


def test_clopper_pearson_matches_closed_forms():
    # All n correct: the lower bound solves L^n = alpha; k = 0 bounds at 0.
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.05 ** (1 / 59), abs=1e-9)
    assert clopper_pearson_lower(58, 58) < 0.95 <= clopper_pearson_lower(59, 59)
    assert clopper_pearson_lower(0, 10) == 0.0 and clopper_pearson_lower(0, 0) is None
    # I_x(1, b) = 1 - (1 - x)^b; a two-sided interval from R's binom.test(5, 20).
    assert betainc(1, 7, 0.2) == pytest.approx(1 - 0.8 ** 7, abs=1e-12)
    lo, hi = clopper_pearson(5, 20)
    assert lo == pytest.approx(0.08657, abs=1e-5) and hi == pytest.approx(0.49105, abs=1e-5)


@pytest.mark.parametrize("prevalence", [0.2, 0.5])
def test_zones_meet_their_bounds_and_are_the_widest(prevalence):
    risk, y = _scores(4000, prevalence, 4.0, seed=1)
    z = fit_zones(risk, y, 0.95, 0.95)
    assert z["prevalence"] == pytest.approx(y.mean()) and z["n"] == 4000
    for name, correct, inside in (("rule_out", ~y, lambda t: risk < t), ("rule_in", y, lambda t: risk >= t)):
        zone = z[name]
        assert zone["threshold"] is not None and zone["reason"] is None
        m = inside(zone["threshold"])
        assert zone["n"] == m.sum() and zone["k"] == (m & correct).sum()
        assert zone["lower"] >= 0.95 and zone["lower"] == pytest.approx(clopper_pearson_lower(zone["k"], zone["n"]))
        assert zone["fraction"] == pytest.approx(m.mean()) and zone["fraction"] > 0.05
        # One more film in the zone (the next distinct risk) breaks the bound: it is the widest
        # (rule-out may also stop where rule-in begins, so the zones never overlap).
        nxt = np.sort(risk[~m])[0 if name == "rule_out" else -1]
        wider = m | (risk == nxt)
        capped = name == "rule_out" and nxt >= z["rule_in"]["threshold"]
        assert capped or clopper_pearson_lower(int((wider & correct).sum()), int(wider.sum())) < 0.95
    assert z["rule_out"]["threshold"] <= z["rule_in"]["threshold"]
    # On fresh data from the same distribution the zones keep their NPV / PPV.
    risk2, y2 = _scores(20000, prevalence, 4.0, seed=2)
    s = zone_summary(assign_zones(risk2, z["rule_out"]["threshold"], z["rule_in"]["threshold"]), y2)
    assert s["rule_out"]["value"] >= 0.94 and s["rule_in"]["value"] >= 0.94
    assert s["triaged"] == pytest.approx(s["rule_out"]["fraction"] + s["rule_in"]["fraction"])


def test_zones_go_empty_when_no_threshold_can_meet_them():
    risk, y = _scores(3000, 0.3, 0.0, seed=3)  # an uninformative score at prevalence 0.3
    z = fit_zones(risk, y)
    for name in ("rule_out", "rule_in"):
        assert z[name]["threshold"] is None and z[name]["n"] == 0 and "no threshold" in z[name]["reason"]
    assert set(assign_zones(risk, None, None)) == {"refer"}
    # Perfectly separated but only 40 films: no zone can show NPV >= 0.95 at 95% confidence.
    y_small = np.arange(40) < 20
    z = fit_zones(np.where(y_small, 0.9, 0.1), y_small)
    assert z["rule_out"]["threshold"] is None and z["rule_in"]["threshold"] is None
    # A modest target is reachable on the same films.
    assert fit_zones(np.where(y_small, 0.9, 0.1), y_small, 0.8, 0.8)["rule_in"]["threshold"] is not None


def test_value_at_prevalence_restates_npv_and_ppv():
    risk, y = _scores(4000, 0.3, 4.0, seed=4)
    z = fit_zones(risk, y)
    assert value_at_prevalence(z["rule_out"], y.mean()) == pytest.approx(z["rule_out"]["value"])
    assert value_at_prevalence(z["rule_in"], y.mean()) == pytest.approx(z["rule_in"]["value"])
    # More disease: rule-out NPV falls, rule-in PPV rises.
    assert value_at_prevalence(z["rule_out"], 0.6) < z["rule_out"]["value"]
    assert value_at_prevalence(z["rule_in"], 0.6) > z["rule_in"]["value"]


def _t_data(n: int, seed: int, image_signal: float):
    rng = np.random.default_rng(seed)
    age = rng.uniform(50, 85, n)
    sex = np.where(rng.random(n) < 0.7, "F", "M")
    t = -0.04 * (age - 65) - 0.4 * (sex == "F") + rng.normal(0, 1.0, n)
    low = 1 / (1 + np.exp(image_signal * (t + 1.0) + rng.normal(0, 1, n)))
    op = low * 0.5
    probs = np.column_stack([1 - low, low - op, op])
    return t, list(age), list(sex), probs


def test_conformal_interval_covers_fresh_films_within_its_binomial_interval():
    t, ages, sexes, probs = _t_data(2500, 5, 1.5)
    folds = np.arange(len(t)) % 5
    cov_x = covariate_features(ages, sexes)[0]
    rec = select_t_score(t, folds, cov_x, probs, coverage=0.9, n_boot=500)
    assert rec["predictor"] in ("image", "fused") and rec["half_width"] > 0
    record = BundleManifest.from_dict({**_minimal(), "t_score": {**rec, "age_mean": 65.0, "age_sd": 12.0}}).t_score
    t2, ages2, sexes2, probs2 = _t_data(2500, 6, 1.5)
    est, lo, hi = predict_t_score(record, ages2, sexes2, probs2)
    s = regression_summary(t2, est, lo, hi)
    assert s["coverage_lo"] <= 0.9 <= s["coverage_hi"]
    assert s["mae"] < rec["selection"]["candidates"]["covariates"]["mae"] and s["pearson_r"] > 0.5


def test_conformal_quantile_is_the_finite_sample_one():
    r = np.arange(1, 11, dtype=float)  # n = 10: ceil(11 * 0.9) = 10th smallest
    assert conformal_half_width(r, 0.9) == 10.0 and conformal_half_width(r, 0.5) == 6.0
    assert conformal_half_width(r, 0.95) is None  # ceil(11 * 0.95) = 11 > n: no finite interval
    assert math.ceil(11 * 0.8) == 9 and conformal_half_width(r, 0.8) == 9.0


def test_an_image_without_t_score_signal_is_not_deployed_and_few_rows_give_no_estimate():
    t, ages, sexes, probs = _t_data(400, 7, 0.0)
    rec = select_t_score(t, np.arange(400) % 5, covariate_features(ages, sexes)[0], probs, n_boot=500)
    assert rec["predictor"] == "covariates"
    cov = CovariateFit(LogisticModel(), 65.0, 12.0, np.zeros((29, 3)), np.zeros(29, bool))
    m = t_score_manifest(list(t[:29]), ages[:29], sexes[:29], np.arange(29) % 5, probs[:29], cov, Targets())
    assert m.predictor is None and "29 training images" in m.reason
    est, lo, hi = predict_t_score(m, ages[:3], sexes[:3], probs[:3])
    assert np.isnan(est).all() and np.isnan(lo).all() and np.isnan(hi).all()


def _minimal() -> dict:
    return {"members": [{"architecture": "test_cnn", "input_mode": "gray", "image_size": 64, "mean": [0.5],
                         "std": [0.25]}],
            "thresholds": {"low_bmd": {"threshold": 0.5}, "osteoporosis": {"threshold": 0.3}}}


def test_manifest_carries_triage_and_older_bundles_load():
    old = BundleManifest.from_dict(_minimal())
    assert old.triage is None and old.t_score is None
    risk, y = _scores(3000, 0.3, 4.0, seed=8)
    new = BundleManifest.from_dict({**_minimal(), "triage": dataclasses.asdict(triage_manifest(risk, y, Targets()))})
    again = BundleManifest.from_dict(new.to_dict())
    assert again == new and again.triage.rule_in.lower >= 0.95 and again.triage.prevalence == pytest.approx(y.mean())
    # An empty zone round-trips with its reason and no threshold.
    empty = BundleManifest.from_dict(BundleManifest.from_dict({**_minimal(), "triage": {
        "rule_out": {"zone": "rule_out", "reason": "no threshold"}, "rule_in": {"zone": "rule_in", "threshold": 0.8}}
    }).to_dict())
    assert empty.triage.rule_out.threshold is None and empty.triage.rule_out.reason == "no threshold"
    with pytest.raises(KneescreenError, match="unknown field"):
        BundleManifest.from_dict({**_minimal(), "triage": {"rule_out": {"zone": "rule_out", "npv": 1},
                                                           "rule_in": {"zone": "rule_in"}}})

"""Triage zones on the low-BMD risk with stated error rates: pure numpy maths, no torch.

Three zones per image (and per patient): ``rule_out`` (risk < t_out, NPV at least the target),
``rule_in`` (risk >= t_in, PPV at least the target) and ``refer`` (everything between: send to
DXA). At training the thresholds are chosen on the pooled out-of-fold risk of the deployed
predictor so that the one-sided lower Clopper-Pearson bound (default 95%) of the zone's NPV / PPV
meets its target; of the thresholds that do, the widest zone is kept. A zone no threshold can make
meet its bound is empty (threshold ``None``) with the reason.

Why Clopper-Pearson: it is exact (never below its nominal coverage), so a zone claims NPV >= 0.95
only with enough negatives behind it (all correct, at least 59 films for 0.95 at 95%).

NPV and PPV depend on prevalence. `value_at_prevalence` restates a zone's NPV / PPV at another
prevalence from the zone's out-of-fold per-class rates (P(zone | low BMD), P(zone | normal)),
which is what the report's warning rule uses (`PREVALENCE_RULE`).
"""

from __future__ import annotations

import math

import numpy as np

ZONES = ("rule_out", "refer", "rule_in")
PREVALENCE_RULE = ("a zone's NPV / PPV is restated at the screened prevalence by Bayes' rule from its out-of-fold "
                   "per-class rates P(zone | low BMD) and P(zone | normal); the report warns when the restated "
                   "value falls below the zone's target")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided lower Clopper-Pearson bound of a proportion (k of n) at ``confidence``.

    The bound L solves P(X >= k | n, L) = 1 - confidence, i.e. I_L(k, n - k + 1) = 1 - confidence,
    found by bisection (the incomplete beta is increasing in L). None when n == 0.
    """
    if n <= 0:
        return None
    if k <= 0:
        return 0.0
    alpha, lo, hi = 1.0 - confidence, 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if betainc(k, n - k + 1, mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Clopper-Pearson interval (each tail (1 - confidence) / 2); (None, None) when n == 0."""
    if n <= 0:
        return None, None
    tail = 1 - (1 - confidence) / 2
    lower = clopper_pearson_lower(k, n, tail)
    upper = 1.0 - clopper_pearson_lower(n - k, n, tail)
    return lower, upper


def _meets(k: int, n: int, target: float, confidence: float) -> bool:
    """Is the lower bound of k/n at least ``target``? (I_target(k, n-k+1) <= 1 - confidence.)"""
    if n <= 0 or k / n < target:
        return False
    return k > 0 and betainc(k, n - k + 1, target) <= 1.0 - confidence


def _zone_record(zone: str, threshold: float | None, in_zone: np.ndarray, positive: np.ndarray, target: float,
                 confidence: float, reason: str | None = None) -> dict:
    correct = ~positive if zone == "rule_out" else positive
    n, k = int(in_zone.sum()), int((in_zone & correct).sum())
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return {"zone": zone, "threshold": threshold, "target": target, "confidence": confidence, "n": n, "k": k,
            "value": k / n if n else None, "lower": clopper_pearson_lower(k, n, confidence) if n else None,
            "fraction": n / len(positive) if len(positive) else 0.0,
            "rate_positive": int((in_zone & positive).sum()) / n_pos if n_pos else None,
            "rate_negative": int((in_zone & ~positive).sum()) / n_neg if n_neg else None, "reason": reason}


def _cuts(risk_sorted: np.ndarray) -> np.ndarray:
    """Candidate thresholds: midpoints between distinct risks, plus one below and one above all."""
    u = np.unique(risk_sorted)
    mids = (u[:-1] + u[1:]) / 2
    return np.concatenate([[np.nextafter(u[0], -np.inf)], mids, [np.nextafter(u[-1], np.inf)]])


def rule_out_zone(risk, positive, target: float = 0.95, confidence: float = 0.95, cap: float | None = None) -> dict:
    """The widest ``risk < t`` zone whose NPV lower bound meets ``target`` (t <= ``cap`` if given)."""
    risk, positive = np.asarray(risk, float), np.asarray(positive, bool)
    if len(risk) == 0:
        return _zone_record("rule_out", None, np.zeros(0, bool), positive, target, confidence, "no rows")
    for t in _cuts(risk)[::-1]:
        if cap is not None and t > cap:
            continue
        zone = risk < t
        if _meets(int((zone & ~positive).sum()), int(zone.sum()), target, confidence):
            return _zone_record("rule_out", float(t), zone, positive, target, confidence)
    why = (f"no threshold gives an NPV whose {confidence:.0%} lower Clopper-Pearson bound reaches {target} on "
           f"{len(risk)} out-of-fold rows ({int(positive.sum())} low BMD)")
    return _zone_record("rule_out", None, np.zeros(len(risk), bool), positive, target, confidence, why)


def rule_in_zone(risk, positive, target: float = 0.95, confidence: float = 0.95) -> dict:
    """The widest ``risk >= t`` zone whose PPV lower bound meets ``target``."""
    risk, positive = np.asarray(risk, float), np.asarray(positive, bool)
    if len(risk) == 0:
        return _zone_record("rule_in", None, np.zeros(0, bool), positive, target, confidence, "no rows")
    for t in _cuts(risk):
        zone = risk >= t
        if _meets(int((zone & positive).sum()), int(zone.sum()), target, confidence):
            return _zone_record("rule_in", float(t), zone, positive, target, confidence)
    why = (f"no threshold gives a PPV whose {confidence:.0%} lower Clopper-Pearson bound reaches {target} on "
           f"{len(risk)} out-of-fold rows ({int(positive.sum())} low BMD)")
    return _zone_record("rule_in", None, np.zeros(len(risk), bool), positive, target, confidence, why)


def fit_zones(risk, positive, npv_target: float = 0.95, ppv_target: float = 0.95, confidence: float = 0.95) -> dict:
    """Both zones from pooled out-of-fold risk and truth (low BMD), plus the prevalence they assume.

    Rule-in is chosen first; rule-out may not reach above it, so the zones never overlap.

    Returns:
        {"rule_out": zone, "rule_in": zone, "prevalence", "n", "n_positive", "confidence"}, each
        zone with threshold (None when empty, with ``reason``), n and k in the zone, the achieved
        value (NPV / PPV), its lower bound, the fraction of rows in it and its per-class rates.
    """
    risk, positive = np.asarray(risk, float), np.asarray(positive, bool)
    rin = rule_in_zone(risk, positive, ppv_target, confidence)
    rout = rule_out_zone(risk, positive, npv_target, confidence, cap=rin["threshold"])
    return {"rule_out": rout, "rule_in": rin, "n": int(len(risk)), "n_positive": int(positive.sum()),
            "prevalence": float(positive.mean()) if len(risk) else None, "confidence": confidence}


def assign_zones(risk, t_out: float | None, t_in: float | None) -> np.ndarray:
    """Zone name per row: rule_out (risk < t_out), rule_in (risk >= t_in), else refer."""
    risk = np.asarray(risk, float)
    out = np.full(len(risk), "refer", dtype=object)
    if t_out is not None:
        out[risk < t_out] = "rule_out"
    if t_in is not None:
        out[risk >= t_in] = "rule_in"
    return out


def value_at_prevalence(zone: dict, prevalence: float) -> float | None:
    """A zone's NPV (rule_out) or PPV (rule_in) restated at ``prevalence`` (`PREVALENCE_RULE`)."""
    a, b = zone.get("rate_positive"), zone.get("rate_negative")
    if zone.get("threshold") is None or a is None or b is None:
        return None
    pos, neg = a * prevalence, b * (1 - prevalence)
    if pos + neg <= 0:
        return None
    return (neg if zone["zone"] == "rule_out" else pos) / (pos + neg)


def zone_summary(zones, positive) -> dict:
    """Achieved NPV / PPV per zone with two-sided Clopper-Pearson intervals, and triaged fractions.

    Args:
        zones: zone name per row (`assign_zones`); positive: low BMD per row (truth).
    """
    zones, positive = np.asarray(zones, object), np.asarray(positive, bool)
    n = len(zones)
    out = {"n": n, "triaged": float(np.isin(zones, ("rule_out", "rule_in")).mean()) if n else None}
    for name, correct in (("rule_out", ~positive), ("rule_in", positive), ("refer", positive)):
        m = zones == name
        k, nz = int((m & correct).sum()), int(m.sum())
        lo, hi = clopper_pearson(k, nz)
        metric = {"rule_out": "npv", "rule_in": "ppv", "refer": "prevalence"}[name]
        out[name] = {"n": nz, "fraction": nz / n if n else None, "metric": metric,
                     "value": k / nz if nz else None, "lo": lo, "hi": hi}
    return out

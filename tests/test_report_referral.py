"""The referral worklist's numbers on a hand-built patients table: zones, yield, scans avoided, the
achieved NPV / PPV and the prevalence-shift warning (kneescreen.report_referral)."""

from __future__ import annotations

import pandas as pd
import pytest

from kneescreen.report_referral import worklist_figures, worklist_html

TRIAGE = {"prevalence": 0.3, "n": 1000, "n_positive": 300, "confidence": 0.95,
          "rule_out": {"zone": "rule_out", "threshold": 0.2, "target": 0.95, "rate_positive": 0.05,
                       "rate_negative": 0.6},
          "rule_in": {"zone": "rule_in", "threshold": 0.8, "target": 0.95, "rate_positive": 0.3,
                      "rate_negative": 0.005}}


def _patients(n_out=6, n_refer=3, n_in=1, ref=True) -> pd.DataFrame:
    rows = []
    for zone, n, risk, p_op, label in (("rule_out", n_out, 0.1, 0.01, "normal"), ("refer", n_refer, 0.5, 0.2, "osteoporosis"),
                                       ("rule_in", n_in, 0.9, 0.6, "osteopenia")):
        for i in range(n):
            rows.append({"patient_pseudo_id": f"p-{zone}-{i}", "triage_zone": zone, "risk_score": risk + i * 0.01,
                         "p_osteoporosis": p_op, "reference_label": label if ref else None, "t_score_est": -1.0,
                         "t_score_lo": -2.0, "t_score_hi": 0.0, "n_images": 2, "last_study_date": None})
    return pd.DataFrame(rows)


def test_zones_yield_and_scans_avoided():
    f = worklist_figures(_patients(), TRIAGE)
    assert f["patients"] == 10 and [f["zones"][z]["n"] for z in ("rule_out", "refer", "rule_in")] == [6, 3, 1]
    assert f["avoided"][0] == pytest.approx(0.7) and f["avoided"][1] < 0.7 < f["avoided"][2]
    assert f["expected_yield"][0] == pytest.approx(0.2) and f["expected_yield"][1] < 0.2 < f["expected_yield"][2]
    assert f["observed_yield"][0] == 1.0  # every referred patient's reference is osteoporosis
    assert f["achieved"]["rule_out"]["value"] == 1.0 and f["achieved"]["rule_in"]["value"] == 1.0
    assert f["screened_prevalence"] == ("reference labels", pytest.approx(0.4))


def test_prevalence_shift_warns_when_the_restated_value_misses_its_target():
    # 40% low BMD against 30% in training: rule-out NPV 0.6*0.6 / (0.6*0.6 + 0.05*0.4) = 0.947 < 0.95.
    f = worklist_figures(_patients(), TRIAGE)
    assert len(f["warnings"]) == 1 and f["warnings"][0].startswith("rule_out")
    # Without reference labels the mean risk stands in for the prevalence (here 0.32: no warning).
    f = worklist_figures(_patients(ref=False), TRIAGE)
    assert f["screened_prevalence"][0] == "mean low-BMD risk" and f["warnings"] == [] and "achieved" not in f


def test_html_lists_patients_by_pseudonymous_id_only():
    html = worklist_html(_patients(), pd.DataFrame(), TRIAGE)
    assert "<code>p-rule_in-0</code>" in html and "Referral worklist" in html and "class='warn'" in html

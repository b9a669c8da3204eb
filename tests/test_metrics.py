"""Metric definitions checked against hand computations."""

from __future__ import annotations

import numpy as np

from kneescreen.metrics import binary_counts, classification_report, roc_auc, wilson


def test_wilson_known_values():
    p, lo, hi = wilson(8, 10)
    assert p == 0.8 and abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson(0, 0) == (None, None, None)
    assert wilson(0, 5)[1] == 0.0


def test_auc_by_hand():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_binary_counts():
    c = binary_counts([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (c["tp"], c["tn"], c["fp"], c["fn"]) == (2, 1, 1, 1)
    assert c["sensitivity"] == 2 / 3 and c["ppv"] == 2 / 3 and c["f1"] == 2 / 3


def test_report_on_a_small_example():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.6, .2, .2]])
    r = classification_report(y, probs, ("normal", "osteopenia", "osteoporosis"), n_boot=200)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert abs(r["accuracy"] - 4 / 6) < 1e-12
    assert abs(r["balanced_accuracy"] - (0.5 + 1 + 0.5) / 3) < 1e-12
    pc = r["per_class"]["osteopenia"]
    assert (pc["tp"], pc["fp"], pc["fn"], pc["tn"]) == (2, 1, 0, 3)
    assert r["balanced_accuracy_lo"] <= r["balanced_accuracy"] <= r["balanced_accuracy_hi"]

"""Fusion methods against hand-computed examples; temperature, weights, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kneescreen.model.fusion import (
    apply_temperature,
    choose_threshold,
    fit_temperature,
    fit_weights,
    fuse,
    fuzzy_rank_scores,
)

A = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
B = np.array([[0.5, 0.4, 0.1], [0.1, 0.6, 0.3]])
C = np.array([[0.2, 0.7, 0.1], [0.2, 0.5, 0.3]])


def test_soft_vote_by_hand():
    p, pred = fuse("soft", [A, B, C])
    np.testing.assert_allclose(p[0], [1.4 / 3, 1.3 / 3, 0.1])
    assert pred.tolist() == [0, 1]


def test_weighted_vote_by_hand():
    p, pred = fuse("weighted", [A, B, C], weights=[0.0, 0.0, 2.0])
    np.testing.assert_allclose(p, C)  # all weight on C
    p, pred = fuse("weighted", [A, C], weights=[3, 1])
    np.testing.assert_allclose(p[0], [0.75 * 0.7 + 0.25 * 0.2, 0.75 * 0.2 + 0.25 * 0.7, 0.1])
    with pytest.raises(ValueError):
        fuse("weighted", [A, C], weights=[-1, 1])


def test_majority_vote_by_hand():
    _, pred = fuse("majority", [A, B, C])
    # row 0 votes: A->0, B->0, C->1 => 0; row 1 votes: A->2, B->1, C->1 => 1
    assert pred.tolist() == [0, 1]
    d, e = np.array([[0.3, 0.6, 0.1]]), np.array([[0.55, 0.4, 0.05]])
    # one vote each for classes 1 and 0: the tie goes to the higher mean probability (class 1: 0.5)
    assert fuse("majority", [d, e])[1].tolist() == [1]


def _fuzzy_by_hand(ps):
    out = []
    for cls in range(3):
        rs = 0.0
        for p in ps:
            d = (1 - p[cls]) ** 2 / 2
            rs += (1 - math.exp(-d)) * (1 - math.tanh(d))
        cfs = 1 - sum(p[cls] for p in ps) / len(ps)
        out.append(rs * cfs)
    return out


def test_fuzzy_rank_by_hand():
    scores = fuzzy_rank_scores([A, B, C])
    for row in range(2):
        np.testing.assert_allclose(scores[row], _fuzzy_by_hand([A[row], B[row], C[row]]), rtol=1e-12)
    _, pred = fuse("fuzzy_rank", [A, B, C])
    assert pred.tolist() == [int(np.argmin(_fuzzy_by_hand([A[r], B[r], C[r]]))) for r in range(2)]
    # A confident member pulls the decision: fuzzy rank picks class 0 for row 0.
    assert pred[0] == 0


def test_fuzzy_rank_differs_from_soft_vote():
    """Non-linear ranks: two members leaning to class 2 outvote one confident class-1 member,
    where the soft mean still picks class 1 (mean 0.497 vs 0.477)."""
    ps = [np.array([[0.05, 0.32, 0.63]]), np.array([[0.03, 0.95, 0.02]]), np.array([[0.0, 0.22, 0.78]])]
    assert fuse("soft", ps)[1].tolist() == [1]
    assert fuse("fuzzy_rank", ps)[1].tolist() == [2]
    np.testing.assert_allclose(fuzzy_rank_scores(ps)[0], _fuzzy_by_hand([p[0] for p in ps]))


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="soft, weighted, majority, fuzzy_rank"):
        fuse("median", [A])


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    true_logits = rng.normal(0, 1, (3000, 3))
    true_logits[np.arange(3000), y] += 1.5
    # Labels drawn from softmax(true_logits); the model reports logits 3x too large.
    p = apply_temperature(true_logits, 1.0)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(true_logits * 3, y)
    assert 2.5 < t < 3.5


def test_fit_weights_prefers_the_informative_member():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 500)
    good = np.full((500, 3), 0.1)
    good[np.arange(500), y] = 0.8
    noise = rng.dirichlet([1, 1, 1], 500)
    w = fit_weights([good, noise], y)
    assert w[0] > 0.8 and abs(sum(w) - 1) < 1e-9


def test_threshold_meets_target_sensitivity():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    pos = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0], bool)
    th = choose_threshold(score, pos, 0.8)
    assert th["threshold"] == 0.5 and th["sensitivity"] == 0.8 and th["specificity"] == 0.8
    assert choose_threshold(score, pos, 1.0)["threshold"] == 0.3

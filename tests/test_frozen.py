"""Frozen-feature members: the shrinkage head fits, chooses its strength, and bakes exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kneescreen.model.frozen import bake_head, extract_features, fit_head
from kneescreen.model.registry import create_model


def test_baked_head_reproduces_the_logistic_model():
    torch.manual_seed(0)
    model = create_model("test_cnn", 3, "gray").eval()
    imgs = np.random.default_rng(0).integers(0, 255, (40, 64, 64), dtype=np.uint8)
    feats = extract_features(model, imgs, "gray", (0.5,), (0.25,), batch_size=16)
    assert feats.shape == (40, 32)
    y = np.arange(40) % 3
    head, mu, sd, l2 = fit_head(feats, y, 3)
    bake_head(model, head, mu, sd)
    from kneescreen.data.preprocess import to_input

    with torch.no_grad():
        logits = model(to_input(torch.from_numpy(imgs), "gray", (0.5,), (0.25,))).numpy()
    expected = ((feats - mu) / sd) @ head.coef + head.bias
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_head_learns_separable_features_and_shrinks_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    signal = np.eye(3)[y] * 2 + rng.normal(size=(120, 3)) * 0.5
    x = np.hstack([signal, rng.normal(size=(120, 200))])  # 3 useful columns among 203
    head, mu, sd, l2 = fit_head(x, y, 3)
    acc = (head.predict_proba((x - mu) / sd).argmax(1) == y).mean()
    assert acc > 0.9
    noise_only, *_ = fit_head(rng.normal(size=(120, 200)), y, 3)
    # With nothing to learn, the chosen shrinkage keeps predictions near the class balance.
    p = noise_only.predict_proba(rng.normal(size=(50, 200)))
    assert p.max(1).mean() < 0.6


def _reference_fit(x, y, k, l2, cw, steps):
    """The solver before issue #21: full-batch gradient descent in float64 at step 1/L (a copy of
    kneescreen/model/frozen.py at 417c934; ``steps`` was 800 there)."""
    from kneescreen.model.covariates import LogisticModel

    lr = 1.0 / (0.5 * np.linalg.norm(x, 2) ** 2 / len(x) + l2)
    return LogisticModel(l2=l2).fit(x, y, k, steps=steps, lr=lr, class_weight=cw)


def _reference_fit_head(x, y, k, folds, steps=800):
    """The previous `fit_head` (L2 by inner CV over the grid, then the final fit), same copy."""
    from kneescreen.model.frozen import L2_GRID

    def standardise(a):
        sd = a.std(0)
        return a.mean(0), np.where(sd > 1e-6, sd, 1.0)

    x = np.asarray(x, np.float64)
    counts = np.bincount(y, minlength=k).astype(float)
    cw = counts.sum() / (k * np.maximum(counts, 1))
    best = (np.inf, L2_GRID[0])
    for l2 in L2_GRID:
        losses = []
        for f in np.unique(folds):
            tr, te = folds != f, folds == f
            mu, sd = standardise(x[tr])
            p = _reference_fit((x[tr] - mu) / sd, y[tr], k, l2, cw, steps).predict_proba((x[te] - mu) / sd)
            losses.append(float(-np.log(p[np.arange(te.sum()), y[te]] + 1e-12).mean()))
        if np.mean(losses) < best[0]:
            best = (float(np.mean(losses)), l2)
    mu, sd = standardise(x)
    return _reference_fit((x - mu) / sd, y, k, best[1], cw, steps), mu, sd, best[1]


@pytest.fixture(scope="module")
def dev_features():
    """EfficientNet-Lite0 (offline ImageNet weights) features of the 104 dev-set images, gray 224 px."""
    import csv

    from PIL import Image

    from conftest import DEV_SET
    from kneescreen.model.registry import normalisation

    if not os.path.isdir(DEV_SET):
        pytest.skip("../shared/data/knee-xray-dev not present")
    rows = list(csv.DictReader(open(os.path.join(DEV_SET, "labels.csv"))))
    imgs = np.stack([np.asarray(Image.open(os.path.join(DEV_SET, r["path"])).convert("L").resize((224, 224)))
                     for r in rows])
    y = np.array([("normal", "osteopenia", "osteoporosis").index(r["label"]) for r in rows])
    model = create_model("efficientnet_lite0", 3, "gray", "imagenet")
    return extract_features(model, imgs, "gray", *normalisation("efficientnet_lite0", "gray")), y


@pytest.mark.slow
def test_head_matches_the_gradient_descent_solver_on_dev_features(dev_features):
    """Same L2 choice as the previous solver, and predictions within 1e-3 of its objective's
    minimum, on every out-of-fold training set of the dev set. (The previous 800-step fit stopped
    ~0.02 in probability short of that minimum, its bias gradient still ~1e-2: compared with the
    converged reference, not with the early stop.)"""
    x, y = dev_features
    folds = np.arange(len(y)) % 5
    for f in (None, 3):
        tr = np.ones(len(y), bool) if f is None else folds != f
        head, mu, sd, l2 = fit_head(x[tr], y[tr], 3, folds=folds[tr])
        old_l2 = _reference_fit_head(x[tr], y[tr], 3, folds[tr])[3]
        assert l2 == old_l2
        xs_mu, xs_sd = x[tr].astype(float).mean(0), x[tr].astype(float).std(0)
        xs_sd = np.where(xs_sd > 1e-6, xs_sd, 1.0)
        counts = np.bincount(y[tr], minlength=3).astype(float)
        ref = _reference_fit((x[tr] - xs_mu) / xs_sd, y[tr], 3, l2, counts.sum() / (3 * counts), steps=20_000)
        p_new = head.predict_proba((x - mu) / sd)
        p_ref = ref.predict_proba((x - xs_mu) / xs_sd)
        assert np.abs(p_new - p_ref).max() <= 1e-3


def test_warm_started_path_reaches_the_cold_solution():
    """The L2 path warm-starts each fit from the previous (stronger) one: same minimum as a cold start."""
    from kneescreen.model.frozen import _fit

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    x = torch.as_tensor(rng.normal(size=(300, 50)) + 0.5 * np.eye(3)[y] @ rng.normal(size=(3, 50)), dtype=torch.float32)
    yt, cw = torch.as_tensor(y), torch.ones(3)
    cold = _fit(x, yt, 3, 0.01, cw)
    warm = _fit(x, yt, 3, 0.01, cw, init=_fit(x, yt, 3, 1.0, cw))
    p_cold, p_warm = torch.softmax(x @ cold[:-1] + cold[-1], 1), torch.softmax(x @ warm[:-1] + warm[-1], 1)
    assert float((p_cold - p_warm).abs().max()) < 1e-3  # the tolerance issue #21 sets


def test_l2_is_chosen_on_a_stratified_subsample_when_n_is_large():
    from kneescreen.model.frozen import _l2_rows

    y = np.repeat([0, 1, 2], [6000, 3000, 1000])
    rows = _l2_rows(y, 1000)
    assert len(rows) == 1000 and len(np.unique(rows)) == 1000 and np.all(np.diff(rows) > 0)
    assert np.bincount(y[rows]).tolist() == [600, 300, 100]
    assert np.array_equal(rows, _l2_rows(y, 1000))  # deterministic
    assert np.array_equal(_l2_rows(y[:500], 1000), np.arange(500))
    # The head fit on 10,000 rows with L2 chosen on 1,000 still learns the signal.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y), 20)) + np.eye(3)[y] @ rng.normal(size=(3, 20))
    head, mu, sd, _ = fit_head(x, y, 3, l2_rows=1000)
    assert (head.predict_proba((x - mu) / sd).argmax(1) == y).mean() > 0.9

"""Frozen-feature members: the shrinkage head fits, chooses its strength, and bakes exactly."""

from __future__ import annotations

import numpy as np
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

"""Covariate model and the product stacker that fuses it with the image ensemble."""

from __future__ import annotations

import numpy as np

from kneescreen.model.covariates import (
    LogisticModel,
    ProductStacker,
    covariate_features,
)


def test_features_impute_and_flag_missing():
    x, imputed = covariate_features([70.0, None, 50.0], ["F", "male", None], age_mean=60, age_sd=10)
    np.testing.assert_allclose(x[0], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(x[1], [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(x[2], [-1.0, 0.5, 0.0, 1.0])
    assert imputed.tolist() == [False, True, True]


def test_logistic_model_learns_age():
    rng = np.random.default_rng(0)
    age = rng.uniform(40, 90, 400)
    y = np.digitize(age, [60, 75])  # older -> higher class
    x, _ = covariate_features(age, ["F"] * 400, 65, 12)
    m = LogisticModel().fit(x, y, 3)
    assert (m.predict_proba(x).argmax(1) == y).mean() > 0.8
    assert np.allclose(LogisticModel.from_dict(m.to_dict()).predict_proba(x), m.predict_proba(x))


def _probs(y, strength, rng):
    logits = rng.normal(0, 1, (len(y), 3))
    logits[np.arange(len(y)), y] += strength
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_product_stacker_ignores_an_uninformative_image_model():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    p_cov, p_img = _probs(y, 1.5, rng), _probs(rng.integers(0, 3, 300), 1.5, rng)  # image: unrelated to y
    s = ProductStacker().fit(p_cov, p_img, y)
    assert s.beta <= 0.15


def test_product_stacker_uses_an_informative_image_model():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    p_cov, p_img = _probs(y, 0.5, rng), _probs(y, 2.0, rng)
    s = ProductStacker().fit(p_cov, p_img, y)
    assert s.beta >= 0.5
    fused = s.predict_proba(p_cov, p_img)
    assert (fused.argmax(1) == y).mean() > (p_cov.argmax(1) == y).mean()
    assert np.allclose(ProductStacker.from_dict(s.to_dict()).predict_proba(p_cov, p_img), fused)

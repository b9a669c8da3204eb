"""Choosing the deployed predictor on out-of-fold predictions: never worse than age and sex."""

from __future__ import annotations

import numpy as np
import pytest

from kneescreen.model.covariates import ProductStacker
from kneescreen.model.selection import OutOfFold, build_candidates, select


def _probs(rng, y, signal: float) -> np.ndarray:
    """Class probabilities whose informativeness about ``y`` grows with ``signal`` (0 = none)."""
    logits = rng.normal(size=(len(y), 3)) + signal * np.eye(3)[y] * 3
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _oof(image_signal: float, covariate_signal: float, n: int = 150, seed: int = 0) -> OutOfFold:
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.2, 0.55, 0.25])
    img = _probs(rng, y, image_signal)
    return OutOfFold(y=y, folds=np.arange(n) % 5, image={"soft": (img, img.argmax(1))},
                     covariates=_probs(rng, y, covariate_signal), imputed=np.zeros(n, bool))


def test_uninformative_image_deploys_the_clinical_baseline():
    record = select(_oof(image_signal=0.0, covariate_signal=1.0), n_boot=300)
    assert record["deployed"] == "covariates_only"
    c = record["candidates"]
    assert c["covariates_only"]["balanced_accuracy"] > c["image:soft"]["balanced_accuracy"] + 0.2
    # The paired difference against age + sex is recorded for every other candidate.
    assert c["image:soft"]["vs_covariates_only"]["balanced_accuracy"]["hi"] < 0


def test_image_deployed_when_only_the_image_carries_signal():
    record = select(_oof(image_signal=1.0, covariate_signal=0.0), n_boot=300)
    assert record["deployed"].split(":")[0] in ("image", "fused")
    d = record["candidates"][record["deployed"]]["vs_covariates_only"]["balanced_accuracy"]
    assert d["lo"] > 0 and d["p_a_better"] >= 0.9


@pytest.mark.slow
def test_a_lucky_small_lead_does_not_displace_age_and_sex():
    """An image that only re-says what age and sex say wins some draws by noise; it must not be
    deployed on such a lead."""
    leads = kept = 0
    for seed in range(12):
        oof = _oof(image_signal=0.0, covariate_signal=0.7, n=60, seed=seed)
        rng = np.random.default_rng(100 + seed)
        img = oof.covariates * np.exp(rng.normal(scale=0.3, size=oof.covariates.shape))
        img /= img.sum(1, keepdims=True)
        oof.image = {"soft": (img, img.argmax(1))}
        record = select(oof, n_boot=150)
        best = max(record["candidates"], key=lambda n: (record["candidates"][n]["balanced_accuracy"], n == "covariates_only"))
        if best != "covariates_only":
            leads += 1
            kept += record["deployed"] == "covariates_only"
            if record["deployed"] == "covariates_only":
                assert record["not_deployed"]["p_better_than_covariates_only"] < 0.9
    assert leads >= 3  # the situation the rule guards against does occur...
    # ...and the baseline stays in most of them (one-sided 0.9: about 1 in 10 leads passes by chance).
    assert kept >= 0.7 * leads


def test_stacker_gives_a_useless_image_zero_weight():
    oof = _oof(image_signal=0.0, covariate_signal=1.0, n=300)
    img = oof.image["soft"][0]
    assert ProductStacker().fit(oof.covariates, img, oof.y).beta <= 0.1
    assert ProductStacker().fit(oof.covariates, _probs(np.random.default_rng(1), oof.y, 1.0), oof.y).beta > 0.3


def test_rows_without_age_or_sex_fall_back_to_the_image():
    oof = _oof(image_signal=0.5, covariate_signal=1.0, n=100)
    oof.imputed = np.arange(100) < 30
    cands = build_candidates(oof)
    img_p, img_pred = oof.image["soft"]
    for name in ("covariates_only", "fused:soft"):
        probs, pred = cands[name]
        np.testing.assert_array_equal(probs[:30], img_p[:30])
        np.testing.assert_array_equal(pred[:30], img_pred[:30])
        assert not np.allclose(probs[30:], img_p[30:])


def test_fused_candidate_is_cross_fitted():
    """Fold f's fused predictions come from a stacker that never saw fold f."""
    oof = _oof(image_signal=0.5, covariate_signal=0.5, n=100)
    fused = build_candidates(oof)["fused:soft"][0]
    fold0 = oof.folds == 0
    st = ProductStacker().fit(oof.covariates[~fold0], oof.image["soft"][0][~fold0], oof.y[~fold0])
    np.testing.assert_allclose(fused[fold0], st.predict_proba(oof.covariates[fold0], oof.image["soft"][0][fold0]))


def test_without_covariates_the_image_is_all_there_is():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    img = _probs(rng, y, 0.5)
    record = select(OutOfFold(y=y, folds=np.arange(40) % 4, image={"soft": (img, img.argmax(1))},
                              imputed=np.ones(40, bool)), n_boot=200)
    assert record["deployed"] == "image:soft" and set(record["candidates"]) == {"image:soft"}


@pytest.mark.parametrize("bad", [0.4, 1.5])
def test_confidence_outside_its_range_is_refused_by_the_config(bad):
    from kneescreen.errors import KneescreenError
    from kneescreen.train.config import TrainConfig

    with pytest.raises(KneescreenError, match="selection-confidence"):
        TrainConfig(data="d", out="o", selection_confidence=bad).validate()

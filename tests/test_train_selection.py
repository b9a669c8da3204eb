"""`kneescreen train` deploys what the out-of-fold evidence supports, on synthetic archives where
the truth is known: the image when only the image carries the T-score, age and sex when only
they do (the real dev set is the second case: docs/results.md)."""

from __future__ import annotations

import pytest

from kneescreen.data.synth import SynthConfig, write_archive
from kneescreen.model.bundle import load_bundle
from kneescreen.train.config import TrainConfig
from kneescreen.train.run import run_train

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _train(tmp_path, image_signal: float, covariate_signal: float, member: str, weights: str) -> dict:
    write_archive(str(tmp_path / "a"), SynthConfig(n=100, seed=11, size=128, image_signal=image_signal,
                                                   covariate_signal=covariate_signal, images_per_patient=1, workers=1))
    run_train(TrainConfig(data=str(tmp_path / "a"), out=str(tmp_path / "b"), members=(member,), weights=weights,
                          oof_folds=4))
    return load_bundle(str(tmp_path / "b")).manifest


def test_image_deployed_when_only_the_image_knows(ray_local, tmp_path):
    sel = _train(tmp_path, 1.0, 0.0, "efficientnet_lite0:gray:frozen", "imagenet").selection
    assert sel["deployed"].startswith(("image:", "fused:"))
    c = sel["candidates"]
    assert c[sel["deployed"]]["vs_covariates_only"]["balanced_accuracy"]["p_a_better"] >= 0.9
    assert c["covariates_only"]["balanced_accuracy"] < 0.5  # age and sex carry nothing here


def test_age_and_sex_deployed_when_the_image_knows_nothing(ray_local, tmp_path):
    m = _train(tmp_path, 0.0, 1.0, "test_cnn:gray:frozen", "none")
    sel = m.selection
    assert sel["deployed"] == "covariates_only"
    assert sel["candidates"]["covariates_only"]["balanced_accuracy"] > sel["candidates"]["image:soft"]["balanced_accuracy"]
    # The T-score estimate follows the same guard; its interval comes from the out-of-fold residuals.
    assert m.t_score.predictor == "covariates" and m.t_score.n == sel["n"] and m.t_score.half_width > 0
    assert m.t_score.selection["candidates"]["covariates"]["mae"] > 0
    # Triage zones: each meets its bound out of fold or is empty and says why.
    assert m.triage.n == sel["n"] and 0 < m.triage.prevalence < 1
    for zone in (m.triage.rule_out, m.triage.rule_in):
        assert (zone.threshold is not None and zone.lower >= zone.target) or (zone.threshold is None and zone.reason)

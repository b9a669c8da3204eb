"""The default recipe (train.recipe) and the member-set choice (model.member_sets), without Ray:
fine-tuned candidates from --finetune-min-films development films on, --members overriding, 0
meaning never, bad strings refused, and the set chosen by the out-of-fold rule."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from kneescreen.config import add_arguments, build
from kneescreen.errors import KneescreenError
from kneescreen.model.ensemble import fit_ensemble, member_manifest
from kneescreen.model.member_sets import choose_member_set
from kneescreen.train.config import FINETUNE_MIN_FILMS, TrainConfig
from kneescreen.train.recipe import BOTH, EXPLICIT, FINETUNED, FROZEN, input_keys, plan


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"data": "d", "out": "o", **kw})


def _names(recipe) -> dict[str, list[str]]:
    return {k: [f"{s.name}:{s.head}" for s in v] for k, v in recipe.sets.items()}


def test_fine_tuned_candidates_are_offered_from_the_documented_size_on():
    cfg = _cfg()
    assert cfg.finetune_min_films == FINETUNE_MIN_FILMS == 10_000
    small = plan(cfg, FINETUNE_MIN_FILMS - 1)
    assert _names(small) == {FROZEN: ["efficientnet_lite0-gray-frozen:frozen"]}
    assert "9999 development films < --finetune-min-films 10000" in small.reason
    large = plan(cfg, FINETUNE_MIN_FILMS)
    assert _names(large) == {FROZEN: ["efficientnet_lite0-gray-frozen:frozen"],
                             FINETUNED: ["efficientnet_lite0-gray:finetune"],
                             BOTH: ["efficientnet_lite0-gray-frozen:frozen", "efficientnet_lite0-gray:finetune"]}
    assert len(large.members) == 2  # each member trained once, whichever sets hold it
    assert input_keys(cfg) == ["img_224"]  # both read the 224 px film: no extra decode


def test_explicit_members_override_the_recipe_and_zero_means_never():
    explicit = plan(_cfg(members=("test_cnn:gray",), weights="none"), 10**6)
    assert _names(explicit) == {EXPLICIT: ["test_cnn-gray:finetune"]} and "--members" in explicit.reason
    assert _names(plan(_cfg(finetune_min_films=0), 10**6)) == {FROZEN: ["efficientnet_lite0-gray-frozen:frozen"]}
    custom = plan(_cfg(finetune_min_films=10, finetune_members=("test_cnn:gray:finetune:roi",), weights="none"), 10)
    assert _names(custom)[FINETUNED] == ["test_cnn-gray-roi:finetune"]
    # The candidates' inputs are decoded with the split (only while the recipe may offer them).
    assert input_keys(_cfg(finetune_members=("test_cnn:gray:finetune:roi",), weights="none")) == ["img_224", "roi_64"]
    assert input_keys(_cfg(finetune_members=("test_cnn:gray:finetune:roi",), weights="none",
                           finetune_min_films=0)) == ["img_224"]


def test_the_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    cfg = build(TrainConfig, parser.parse_args(["--data", "d", "--out", "o", "--finetune-min-films", "500",
                                                "--finetune-members", "resnet18:rgb:finetune,efficientnet_lite1:gray"]))
    assert cfg.finetune_min_films == 500
    assert cfg.finetune_members == ("resnet18:rgb:finetune", "efficientnet_lite1:gray")


@pytest.mark.parametrize("kw, words", [
    ({"finetune_members": ("efficientnet_lite0:gray:frozen",)}, "--finetune-members: .* is not fine-tuned"),
    ({"finetune_members": ("nonet:gray",)}, "--finetune-members: unknown architecture"),
    ({"finetune_members": ("test_cnn:gray",)}, "--finetune-members: no ImageNet weights .*--weights none"),
    ({"finetune_members": ()}, "--finetune-members: give at least one"),
    ({"finetune_min_films": -1}, "--finetune-min-films must be at least 0"),
    ({"oof_folds": 2}, "--oof-folds must be at least 3 .*--finetune-min-films 0"),
])
def test_bad_recipe_settings_fail_in_validate(kw, words):
    with pytest.raises(KneescreenError, match=words):
        _cfg(**kw).validate()


def test_unused_candidates_are_not_checked():
    # --members given or --finetune-min-films 0: the candidates are never trained, so never refused.
    _cfg(members=("efficientnet_lite0:gray:frozen",), finetune_members=("nonet:gray",), oof_folds=2).validate()
    _cfg(finetune_min_films=0, finetune_members=("efficientnet_lite0:gray:frozen",), oof_folds=2).validate()


def _fit(logits: np.ndarray, y: np.ndarray, folds: np.ndarray, training: str):
    members = [member_manifest("test_cnn", "gray", 64, None, training)]
    return fit_ensemble(members, [logits], y, folds, None, with_oof=True)


def _sets(y, folds, rng, frozen_signal: float, tuned_signal: float, shared_noise: float = 0.0) -> dict:
    eye = np.eye(3)[y]
    noise = rng.normal(size=eye.shape)
    frozen = frozen_signal * eye + noise
    tuned = tuned_signal * eye + shared_noise * noise + (1 - shared_noise) * rng.normal(size=eye.shape)
    both = [member_manifest("test_cnn", "gray", 64, None, "frozen"), member_manifest("test_cnn", "gray", 64, None)]
    return {FROZEN: _fit(frozen, y, folds, "frozen"), FINETUNED: _fit(tuned, y, folds, "finetune"),
            BOTH: fit_ensemble(both, [frozen, tuned], y, folds, None, with_oof=True)}


def test_a_clearly_better_fine_tuned_set_is_chosen():
    rng = np.random.default_rng(0)
    y, folds = rng.integers(0, 3, 600), np.arange(600) % 5
    chosen, record = choose_member_set(_sets(y, folds, rng, 0.3, 3.0), y, n_boot=300)
    assert chosen in (FINETUNED, BOTH) and record["chosen"] == chosen and record["baseline"] == FROZEN
    sets = record["sets"]
    assert sets[chosen]["balanced_accuracy"] > sets[FROZEN]["balanced_accuracy"] + 0.2
    assert sets[chosen]["vs_baseline"]["p_a_better"] >= 0.9 and "vs_baseline" not in sets[FROZEN]
    assert sets[BOTH]["members"] == ["test_cnn-gray-frozen", "test_cnn-gray"]
    # The rule's order: the highest out-of-fold balanced accuracy wins.
    assert sets[chosen]["balanced_accuracy"] == max(s["balanced_accuracy"] for s in sets.values())


def test_a_lucky_fine_tuned_set_does_not_displace_the_frozen_one():
    rng = np.random.default_rng(0)
    y, folds = rng.integers(0, 3, 90), np.arange(90) % 3
    # The fine-tuned member makes nearly the frozen one's errors: it scores a little higher on these
    # folds, but the paired bootstrap is not sure of it, so the frozen baseline stays.
    chosen, record = choose_member_set(_sets(y, folds, rng, 1.0, 1.05, shared_noise=0.95), y, n_boot=300)
    sets = record["sets"]
    assert sets[FINETUNED]["balanced_accuracy"] > sets[FROZEN]["balanced_accuracy"]
    assert chosen == FROZEN == record["chosen"]
    # Ties go to fewer members: of two equal fine-tuned sets the single member is the one named.
    assert sets[BOTH]["balanced_accuracy"] == sets[FINETUNED]["balanced_accuracy"]
    assert record["not_chosen"]["name"] == FINETUNED and record["not_chosen"]["p_better_than_baseline"] < 0.9
    one = {FROZEN: _fit(np.eye(3)[y], y, folds, "frozen")}
    assert choose_member_set(one, y)[0] == FROZEN  # one set: nothing to compare

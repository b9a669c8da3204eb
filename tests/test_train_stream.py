"""Training streams: decoded images stay in Ray's object store; the driver gets metadata and
logits only, and these equal what the driver-side computation on the same images gives."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import ray
import torch
from ray.data.dataset import MaterializedDataset

from kneescreen.data.split.run import load_split, run_split
from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES
from kneescreen.model.bundle import Bundle
from kneescreen.model.ensemble import member_manifest
from kneescreen.model.frozen import extract_features, fit_head
from kneescreen.model.manifest import BundleManifest, Threshold, Thresholds
from kneescreen.model.registry import create_model, normalisation
from kneescreen.train import data as train_data
from kneescreen.train.config import TrainConfig
from kneescreen.train.data import TrainingData, bundle_logits, load_split_data, load_training_data
from kneescreen.train.oof import member_out_of_fold
from kneescreen.train.run import run_train, training_fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.ray]
IMAGE_COLUMNS = ("img_", "roi_", "tiles_")


@pytest.fixture(scope="module")
def split_dir(ray_local, train_archive, tmp_path_factory) -> str:
    split = str(tmp_path_factory.mktemp("split"))
    run_split(str(train_archive), split)
    return split


@pytest.fixture(scope="module")
def split_rows(split_dir) -> list[dict]:
    return load_split(split_dir)


@pytest.fixture(scope="module")
def decoded(split_rows) -> TrainingData:
    return load_training_data(split_rows, ["img_32", "img_48"], Store())


def test_split_read_as_arrow_decodes_as_the_row_dicts_did(decoded, split_dir, split_rows):
    """`load_split_data` (the split read in a Ray task, never as row dicts on the driver) gives the
    same rows, metadata columns, blocks and fingerprint as decoding the parsed rows."""
    data, info = load_split_data(split_dir, ["img_32", "img_48"], Store())
    assert info == {"n": len(split_rows), "folds": 1 + max(r["fold"] for r in split_rows),
                    "fingerprint": training_fingerprint(split_rows)}
    assert data.meta.keys() == decoded.meta.keys() and data.n_rows == decoded.n_rows
    for k, v in decoded.meta.items():
        assert np.array_equal(data[k], v, equal_nan=k in ("age", "t_score")), k
    assert data.base.num_blocks() == decoded.base.num_blocks()
    assert np.array_equal(_driver_images(data, "img_48"), _driver_images(decoded, "img_48"))
    test, info = load_split_data(split_dir, ["img_32"], Store(), splits=("test",))
    assert set(test["split"]) == {"test"} and info["n"] == sum(r["split"] == "test" for r in split_rows)


def _driver_images(data: TrainingData, key: str) -> np.ndarray:
    """The test (not the code under test) pulls the images to compare with the driver-side path."""
    rows = sorted(data.dataset(["key", key]).take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == list(data["key"])
    return np.stack([r[key] for r in rows])


def test_decoded_rows_stay_in_the_object_store(decoded, split_rows):
    assert isinstance(decoded.base, MaterializedDataset)
    assert not any(k.startswith(IMAGE_COLUMNS) or k == "images" for k in decoded.meta)
    assert list(decoded["key"]) == sorted(r["key"] for r in split_rows) and len(decoded) == len(split_rows)
    assert set(decoded["split"]) == {"train", "val", "test"}
    by_key = {r["key"]: r for r in split_rows}
    assert [CLASSES[y] for y in decoded["label"]] == [by_key[k]["label"] for k in decoded["key"]]
    sub = decoded.where(decoded["fold"] == 0)
    got = sorted(r["key"] for r in sub.dataset(["key"]).take_all())
    assert got == list(sub["key"]) and 0 < len(sub) < len(decoded)
    assert decoded.base.num_blocks() < len(decoded)  # blocks of many rows, not one task per image


def test_unreadable_rows_are_left_out_and_logged(ray_local, split_rows, tmp_path, caplog):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM but not really" * 10)
    rows = split_rows[:6] + [{**split_rows[6], "key": "zz-broken", "uri": str(broken)}]
    with caplog.at_level(logging.WARNING):
        data = load_training_data(rows, ["img_32"], Store())
    assert list(data["key"]) == sorted(r["key"] for r in split_rows[:6])
    assert data.n_rows == 7 and "left out 1 image" in caplog.text


def test_streamed_logits_equal_the_driver_ones(decoded):
    """Same model, same images: the scoring tasks' logits == `Bundle.member_logits` on driver arrays,
    on a selection (not just every row)."""
    torch.manual_seed(0)
    model = create_model("test_cnn", len(CLASSES), "gray", weights=None)
    manifest = BundleManifest(members=(member_manifest("test_cnn", "gray", 48, None),),
                              thresholds=Thresholds(Threshold(0.5), Threshold(0.5)))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sub = decoded.where(decoded["split"] != "train")
    [got] = bundle_logits(sub, manifest, [state])
    [want] = Bundle.from_states(manifest, [state]).member_logits({"img_48": _driver_images(sub, "img_48")})
    assert got.shape == (len(sub), len(CLASSES))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_out_of_fold_logits_equal_the_driver_computation(decoded):
    """The frozen member's out-of-fold logits (features in Ray Data tasks, heads in a Ray task)
    equal the driver-side design's (features of driver arrays, a head per fold)."""
    cfg = TrainConfig(data="unused", out="unused", members=("test_cnn:gray:frozen",), weights="none", image_size=32,
                      oof_folds=3)
    [spec] = cfg.member_specs()
    dev = decoded.where(decoded["split"] != "test")
    folds = dev["fold"] % 3
    torch.manual_seed(0)
    logits, state, note = member_out_of_fold(spec, dev, folds, cfg, Store(), (dev, dev))
    torch.manual_seed(0)
    model = create_model("test_cnn", len(CLASSES), "gray", weights=None)
    feats = extract_features(model, _driver_images(dev, "img_32"), "gray", *normalisation("test_cnn", "gray"))
    want = np.zeros_like(logits)
    for f in np.unique(folds):
        tr = folds != f
        head, mu, sd, _ = fit_head(feats[tr], dev["label"][tr], len(CLASSES), folds=folds[tr])
        want[~tr] = ((feats[~tr] - mu) / sd) @ head.coef + head.bias
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert note["features"] == feats.shape[1]


def test_frozen_features_are_computed_once_for_every_outer_fold(decoded, monkeypatch):
    """Cross-validation's outer folds share one `FeatureCache`: one feature map over all rows, and
    each fold's out-of-fold logits equal those of features computed for that fold alone."""
    from kneescreen.train import oof

    cfg = TrainConfig(data="unused", out="unused", members=("test_cnn:gray:frozen",), weights="none", image_size=32,
                      oof_folds=3)
    [spec] = cfg.member_specs()
    maps = []
    original = oof.map_model
    monkeypatch.setattr(oof, "map_model", lambda data, *a: maps.append(len(data)) or original(data, *a))
    torch.manual_seed(0)
    cache = oof.FeatureCache(decoded)
    for outer in (0, 1):
        dev = decoded.where(decoded["fold"] != outer)
        folds = dev["fold"] % 3
        logits, _, _ = member_out_of_fold(spec, dev, folds, cfg, Store(), (dev, dev), cache)
        torch.manual_seed(0)  # the same random backbone the cache holds
        alone, _, _ = member_out_of_fold(spec, dev, folds, cfg, Store(), (dev, dev))
        np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-5)
    assert maps == [len(decoded), len(decoded.where(decoded["fold"] != 0)), len(decoded.where(decoded["fold"] != 1))]


def test_training_never_brings_images_or_features_to_the_driver(ray_local, train_archive, tmp_path, monkeypatch):
    """Every way a Dataset's rows reach the driver is watched during `run_train`: none carries an
    image column, and what `collect` returns is (rows, members, 3) logits, not features."""
    seen: list[tuple[str, ...]] = []
    shapes: list[tuple[int, ...]] = []

    def watch(name):
        original = getattr(ray.data.Dataset, name)

        def wrapper(self, *a, **k):
            seen.append(tuple(self.schema().names))
            return original(self, *a, **k)
        monkeypatch.setattr(ray.data.Dataset, name, wrapper)

    for name in ("take_all", "take", "take_batch", "iter_rows", "iter_batches", "to_pandas", "to_numpy_refs"):
        watch(name)
    collect = train_data.collect

    def watched_collect(ds, rows):
        out = collect(ds, rows)
        shapes.append(out.shape)
        return out
    monkeypatch.setattr(train_data, "collect", watched_collect)
    members = ("test_cnn:gray:frozen", "test_cnn:rgb:frozen")
    out = run_train(TrainConfig(data=str(train_archive), out=str(tmp_path / "b"), members=members,
                                weights="none", image_size=32, oof_folds=3))
    assert out["test"]["n"] > 0 and seen and shapes
    assert not [cols for cols in seen if any(c.startswith(IMAGE_COLUMNS) for c in cols)], seen
    assert {s[1:] for s in shapes} == {(len(members), len(CLASSES))}, shapes

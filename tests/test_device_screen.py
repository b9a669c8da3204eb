"""``--preprocess device`` screens like ``--preprocess cpu`` (issue #22): same rows, same error
codes, same classes and probabilities within 1e-3; stages without Ray, then a real Ray run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.block import BlockAccessor

from kneescreen.data.decode import DecodeSpec, load_side_table
from kneescreen.data.frame_block import FRAME_FIELDS, frames_from_batch
from kneescreen.fileio.store import Store
from kneescreen.model.bundle import load_bundle
from kneescreen.screen.stages import EnsemblePredictor, decode_stage, decode_stored_stage, to_prediction_table

PROBS = ["p_normal", "p_osteopenia", "p_osteoporosis"]
SAME = ["key", "status", "error_code", "message", "predicted_class", "low_bmd_flag", "triage_zone", "bytes_read",
        "reference_label"]
# Header columns: the CPU path has none on an implausible_pixels row (its read fails as a whole);
# the device path read the header before the pixels were judged on the actor, and keeps it.
HEADER = ["format", "patient_pseudo_id", "study_pseudo_id", "laterality", "view", "site", "manufacturer", "sex", "age"]


def _numpy(table: pa.Table) -> dict:
    return BlockAccessor.for_block(table).to_batch_format("numpy")


@pytest.fixture(scope="module")
def views_bundle(tmp_path_factory):
    """A random-weight bundle whose members need every view: img_64, roi_32 and tiles_32."""
    import torch

    from kneescreen.model.bundle import save_bundle
    from kneescreen.model.manifest import BundleManifest
    from kneescreen.model.registry import create_model

    torch.manual_seed(1)
    members = [{"architecture": "test_cnn", "input_mode": "gray", "image_size": s, "mean": [0.5], "std": [0.25],
                "temperature": 1.0, "weights_init": None, "view": v} for v, s in (("img", 64), ("roi", 32),
                                                                                  ("tiles", 32))]
    manifest = BundleManifest.from_dict({
        "classes": ["normal", "osteopenia", "osteoporosis"], "members": members,
        "fusion": {"method": "soft", "weights": None}, "predictor": "image", "inputs": ["image"],
        "thresholds": {"low_bmd": {"threshold": 0.6}, "osteoporosis": {"threshold": 0.3}}})
    states = [create_model("test_cnn", 3, "gray", weights=None).state_dict() for _ in members]
    dest = str(tmp_path_factory.mktemp("views-bundle") / "bundle")
    save_bundle(dest, manifest, states)
    return dest


def _listing(root) -> pa.Table:
    objs = Store().list_objects(str(root / "images"))
    rows = [{"key": o.key, "etag": o.etag, "size": o.size} for o in objs]
    rows.append({"key": "site-a/missing.dcm", "etag": "0-0", "size": 0})
    return pa.Table.from_pylist(rows)


def _chain(listing, spec, bundle, preprocess: str, block_bytes=None) -> pa.Table:
    pred = EnsemblePredictor({"manifest": bundle.manifest, "states": bundle.states()}, preprocess=preprocess)
    if preprocess == "cpu":
        blocks = [decode_stage(_numpy(listing), spec)]
    else:
        blocks = list(decode_stored_stage(_numpy(listing), spec, block_bytes=block_bytes or 128 * 1024**2))
    out = [to_prediction_table(_numpy(pred(_numpy(b))), "r", bundle.version, None) for b in blocks]
    return pa.concat_tables(out)


@pytest.fixture(scope="module")
def archive(small_archive, tmp_path_factory):
    """``small_archive`` plus a smooth gradient PNG: plausible pixels without a knee
    (``joint_not_found``, judged on the actor in device mode)."""
    import shutil

    from PIL import Image

    src, _ = small_archive
    root = tmp_path_factory.mktemp("device-archive")
    shutil.copytree(src / "images", root / "images")
    shutil.copy(src / "labels.csv", root / "labels.csv")
    ramp = np.add.outer(np.arange(200), np.arange(160)).astype(np.float64)
    Image.fromarray((ramp / ramp.max() * 255).astype(np.uint8)).save(root / "images" / "extra-gradient.png")
    return root


@pytest.fixture(scope="module")
def both(archive, views_bundle):
    root = archive
    bundle = load_bundle(views_bundle)
    store = Store()
    spec = DecodeSpec(store=store, sizes=tuple(bundle.sizes), views=bundle.views, root=str(root / "images"),
                      pseudo_key=b"k" * 16, reference=load_side_table(store, str(root / "labels.csv")))
    listing = _listing(root)
    return (_chain(listing, spec, bundle, "cpu").to_pandas(),
            _chain(listing, spec, bundle, "device", block_bytes=40_000).to_pandas(), spec, listing)


def test_preprocess_defaults_to_device_with_gpu_and_is_a_flag():
    import argparse

    from kneescreen.config import add_arguments, build
    from kneescreen.errors import KneescreenError
    from kneescreen.screen.config import ScreenConfig

    base = ScreenConfig(input="in", output="out", bundle="b")
    assert base.resolved_preprocess == "cpu"
    assert dataclasses.replace(base, use_gpu=True).resolved_preprocess == "device"
    assert dataclasses.replace(base, use_gpu=True, preprocess="cpu").resolved_preprocess == "cpu"
    with pytest.raises(KneescreenError):
        dataclasses.replace(base, preprocess="gpu").validate()
    ap = argparse.ArgumentParser()
    add_arguments(ap, ScreenConfig)
    args = ap.parse_args(["--input", "i", "--output", "o", "--bundle", "b", "--preprocess", "device"])
    assert build(ScreenConfig, args).preprocess == "device"


def assert_same_rows(cpu, dev):
    cpu, dev = cpu.sort_values("key").reset_index(drop=True), dev.sort_values("key").reset_index(drop=True)
    assert len(cpu) == len(dev)
    for c in SAME:
        assert cpu[c].fillna("-").astype(str).tolist() == dev[c].fillna("-").astype(str).tolist(), c
    judged = cpu["error_code"] != "implausible_pixels"
    for c in HEADER:
        assert cpu.loc[judged, c].fillna("-").astype(str).tolist() == dev.loc[judged, c].fillna("-").astype(str).tolist(), c
    ok = cpu["status"] == "ok"
    assert np.abs(cpu.loc[ok, PROBS].to_numpy(float) - dev.loc[ok, PROBS].to_numpy(float)).max() <= 1e-3


def test_stages_give_the_same_rows(both, planted):
    cpu, dev, _, _ = both
    assert_same_rows(cpu, dev)
    codes = set(dev["error_code"].dropna())
    assert {"joint_not_found", "implausible_pixels", "vanished"} <= codes  # moved to the actor, or kept
    assert (dev["status"] == "ok").sum() >= 15


def test_blocks_are_bounded_by_frame_bytes(both):
    _, _, spec, listing = both
    blocks = list(decode_stored_stage(_numpy(listing), spec, block_bytes=40_000))
    assert sum(b.num_rows for b in blocks) == listing.num_rows
    assert len(blocks) > 3
    for b in blocks:
        assert b.schema.field("frame").type == pa.large_binary()
        sizes = [len(v) for v in b.column("frame").to_pylist() if v is not None]
        assert len(sizes) <= 1 or sum(sizes) <= 40_000
    frames, facts = frames_from_batch(_numpy(blocks[0]))
    assert any(f is not None and f.ndim == 2 for f in frames)
    assert set(FRAME_FIELDS.names) <= set(blocks[0].column_names)


@pytest.mark.ray
def test_ray_screen_device_equals_cpu(ray_local, archive, views_bundle, tmp_path):
    from kneescreen.screen.config import ScreenConfig
    from kneescreen.screen.pipeline import run_screen

    root = archive
    base = ScreenConfig(input=str(root / "images"), output="", bundle=views_bundle,
                        reference=str(root / "labels.csv"), decode_batch_size=8, actors=1)
    tables = {}
    for mode in ("cpu", "device"):
        cfg = dataclasses.replace(base, output=str(tmp_path / mode), preprocess=mode)
        manifest = run_screen(cfg)
        assert manifest["config"]["preprocess"] == mode
        tables[mode] = pq.read_table(manifest["predictions"]).to_pandas()
        assert json.loads((tmp_path / mode / "runs" / f"run_id={manifest['run_id']}.json").read_text())
    assert_same_rows(tables["cpu"], tables["device"])
    assert (tables["device"]["status"] == "error").any()

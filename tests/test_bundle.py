"""Bundle integrity: content-addressed version, sha256 per file, weights_only loading."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from kneescreen.errors import KneescreenError
from kneescreen.model.bundle import load_bundle, save_bundle
from kneescreen.model.manifest import BundleManifest
from kneescreen.model.registry import create_model


def _manifest() -> BundleManifest:
    return BundleManifest.from_dict({
        "classes": ["normal", "osteopenia", "osteoporosis"],
        "members": [{"architecture": "test_cnn", "input_mode": "gray", "image_size": 64, "mean": [0.5],
                     "std": [0.25], "temperature": 1.5, "weights_init": None}],
        "fusion": {"method": "soft", "weights": None}, "predictor": "image", "inputs": ["image"],
        "thresholds": {"low_bmd": {"threshold": 0.5}, "osteoporosis": {"threshold": 0.3}},
    })


@pytest.fixture
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    state = create_model("test_cnn", 3, "gray").state_dict()
    version = save_bundle(str(tmp_path / "b"), _manifest(), [state])
    return tmp_path / "b", version, state


def test_roundtrip_and_predict(bundle_dir):
    path, version, state = bundle_dir
    b = load_bundle(str(path))
    assert b.version == version and len(version) == 16
    torch.testing.assert_close(b.models[0].state_dict()["fc.weight"], state["fc.weight"])
    imgs = {64: np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8)}
    p = b.predict(imgs)
    assert p.probs.shape == (5, 3) and np.allclose(p.probs.sum(1), 1)
    assert (p.low_bmd_flag == (p.probs[:, 1] + p.probs[:, 2] >= 0.5)).all()
    assert set(p.predictor) == {"image"}


def test_same_content_same_version(tmp_path, bundle_dir):
    _, version, state = bundle_dir
    assert save_bundle(str(tmp_path / "again"), _manifest(), [state]) == version


def test_tampered_weights_refused(bundle_dir):
    path, _, _ = bundle_dir
    f = next((path / "members").iterdir())
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(KneescreenError, match="does not match the manifest"):
        load_bundle(str(path))


def test_edited_manifest_refused(bundle_dir):
    path, _, _ = bundle_dir
    m = json.loads((path / "manifest.json").read_text())
    m["members"][0]["temperature"] = 0.1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KneescreenError, match="edited after"):
        load_bundle(str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/kneescreen-pwned",))


def test_pickle_with_code_is_never_run(tmp_path, bundle_dir):
    """Even with consistent hashes (an attacker who rewrites the manifest), weights_only=True
    refuses a pickle that would run code."""
    from kneescreen.model.bundle import _sha
    from kneescreen.model.manifest import content_version as _version

    path, _, _ = bundle_dir
    f = next((path / "members").iterdir())
    buf = io.BytesIO()
    torch.save({"fc.weight": _Evil()}, buf)
    f.write_bytes(buf.getvalue())
    m = json.loads((path / "manifest.json").read_text())
    m["files"][m["members"][0]["file"]] = _sha(buf.getvalue())
    m["version"] = _version(m)
    (path / "manifest.json").write_text(json.dumps(m))
    if os.path.exists("/tmp/kneescreen-pwned"):
        os.remove("/tmp/kneescreen-pwned")
    with pytest.raises(KneescreenError, match="not a plain tensor state dict"):
        load_bundle(str(path))
    assert not os.path.exists("/tmp/kneescreen-pwned")


def test_not_a_bundle(tmp_path):
    with pytest.raises(KneescreenError, match="no manifest.json"):
        load_bundle(str(tmp_path))


def _rewrite(path, edit) -> None:
    """Edit manifest.json and re-sign it (as an older or newer kneescreen would have written it)."""
    from kneescreen.model.manifest import content_version

    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    m["version"] = content_version(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_manifest_written_before_the_typed_manifest_loads(bundle_dir):
    """Format-1 manifests from earlier releases carried explicit nulls and a 'created' stamp."""
    path, _, state = bundle_dir

    def old_style(m):
        m["fusion"]["weights"] = None
        m["members"][0]["weights_init"] = None
        m["created"] = "2026-01-01T00:00:00Z"

    _rewrite(path, old_style)
    b = load_bundle(str(path))
    assert b.manifest.fusion.weights is None and b.manifest.members[0].temperature == 1.5
    assert b.predict({64: np.zeros((2, 64, 64), np.uint8)}).probs.shape == (2, 3)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(calibrator={"kind": "isotonic"}), r"unknown field\(s\) \['calibrator'\]"),
    (lambda m: m.pop("thresholds"), "missing required field 'thresholds'"),
    (lambda m: m["members"][0].update(image_size="64"), r"members\[0\]\.image_size: expected int"),
    (lambda m: m.update(format="kneescreen-bundle/2"), "cannot read it"),
])
def test_manifest_this_version_cannot_read_fails_clearly(bundle_dir, edit, message):
    path, _, _ = bundle_dir
    _rewrite(path, edit)
    with pytest.raises(KneescreenError, match=message):
        load_bundle(str(path))


def test_from_states_builds_the_same_models_as_load(bundle_dir):
    from kneescreen.model.bundle import Bundle

    path, _, state = bundle_dir
    loaded = load_bundle(str(path))
    built = Bundle.from_states(loaded.manifest, [state])
    imgs = {64: np.random.default_rng(1).integers(0, 255, (4, 64, 64), dtype=np.uint8)}
    np.testing.assert_allclose(built.predict(imgs).probs, loaded.predict(imgs).probs, rtol=1e-6)
    assert built.version == loaded.version

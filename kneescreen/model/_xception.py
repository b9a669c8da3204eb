"""Xception (Chollet, CVPR 2017): depthwise-separable convolutions with residual links.

torchvision has no Xception; this follows the paper's Figure 5 (entry flow 32-64 then blocks of
128/256/728 channels, eight 728-channel middle blocks, exit flow to 2048 channels), 299 px input,
about 22.9M parameters with a 1000-class head.
"""

from __future__ import annotations

import torch
from torch import nn


class _SepConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, reps: int, stride: int, relu_first: bool, grow_first: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        ch = cin
        for i in range(reps):
            out = cout if (grow_first and i == 0) or (not grow_first and i == reps - 1) else ch
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))
            layers.append(_SepConv(ch, out))
            ch = out
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, padding=1))
        self.body = nn.Sequential(*layers)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Xception(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.entry = nn.Sequential(
            _Block(64, 128, 2, 2, relu_first=False),
            _Block(128, 256, 2, 2, relu_first=True),
            _Block(256, 728, 2, 2, relu_first=True),
        )
        self.middle = nn.Sequential(*[_Block(728, 728, 3, 1, relu_first=True) for _ in range(8)])
        self.exit = nn.Sequential(
            _Block(728, 1024, 2, 2, relu_first=True, grow_first=False),
            _SepConv(1024, 1536), nn.ReLU(),
            _SepConv(1536, 2048), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.exit(self.middle(self.entry(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

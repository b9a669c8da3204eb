"""A fixed texture descriptor with a linear head: the radially averaged power spectrum.

Trabecular bone is a band of spatial frequencies: its spacing (about 0.5-1 mm in the proximal
tibia) sets where the spectrum peaks, and thinning, perforated trabeculae move power between
bands. Fourier and fractal analysis of that spectrum is a classical radiographic bone texture
measure, sensitive to exactly what a 160 px letterbox throws away. The descriptor here has no
learnt parameters: each instance (a native-resolution ROI or tile) is windowed (Hann), its 2-D
power spectrum averaged over ``BINS`` rings from 1/100 to 1/2 cycle per pixel, log-transformed and
centred per instance (so gain, gamma-free contrast and exposure changes cancel), and a linear
layer maps the ``BINS`` values to class logits. It is the cheap "frozen feature" member of the
native-resolution path: the head is fit like any frozen member's (`kneescreen.model.frozen`)
and baked into ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

BINS = 24
_F_LOW, _F_HIGH = 0.01, 0.5  # cycles per pixel: 100 px periods down to Nyquist


class SpectralTexture(nn.Module):
    """(N, C, H, W) normalised input -> (N, num_classes) logits via the log radial power spectrum.

    Channels are averaged (gray and RGB inputs give the same descriptor). No learnt parameters
    apart from ``fc``; the ring masks are rebuilt per input size and never saved.
    """

    def __init__(self, num_classes: int = 1000, bins: int = BINS):
        super().__init__()
        self.bins = bins
        self.fc = nn.Linear(bins, num_classes)
        self._cache: dict = {}

    def _rings(self, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, str(device))
        if key not in self._cache:
            fy = torch.fft.fftfreq(h, device=device)[:, None]
            fx = torch.fft.rfftfreq(w, device=device)[None, :]
            r = torch.sqrt(fx**2 + fy**2).flatten()
            edges = torch.linspace(_F_LOW, _F_HIGH, self.bins + 1, device=device)
            idx = torch.bucketize(r, edges) - 1  # ring of each frequency; outside: -1 or bins
            onehot = torch.zeros(r.numel(), self.bins, device=device)
            inside = (idx >= 0) & (idx < self.bins)
            onehot[inside.nonzero().squeeze(1), idx[inside]] = 1.0
            onehot /= onehot.sum(0).clamp(min=1.0)
            window = torch.outer(torch.hann_window(h, periodic=False, device=device),
                                 torch.hann_window(w, periodic=False, device=device))
            self._cache[key] = (onehot, window)
        return self._cache[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bins) centred log ring powers."""
        with torch.autocast(x.device.type, enabled=False):
            g = x.float().mean(1)
            g = g - g.mean((-2, -1), keepdim=True)
            rings, window = self._rings(g.shape[-2], g.shape[-1], g.device)
            power = torch.fft.rfft2(g * window).abs().square().flatten(1)
            ring = power @ rings
            # A floor relative to the instance's own power keeps the descriptor exactly gain-free.
            f = torch.log(ring + 1e-6 * ring.mean(1, keepdim=True) + 1e-20)
            return f - f.mean(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

"""Radiograph -> model input: letterbox to a square, uint8 storage, normalised tensors, and the
training augmentation. Shared by training and screening so both see identical pixels."""

from __future__ import annotations

import numpy as np
import torch


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the longer side to ``size`` (aspect kept), centre on a black square; uint8 out.

    uint8 keeps Ray object-store blocks small (a 224 px image is 49 KB); the display transform
    has already put the useful range into [0, 1], so 8 bits lose nothing a CNN uses.
    """
    from PIL import Image

    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = Image.fromarray(np.asarray(image, np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(np.asarray(small) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def to_input(batch: torch.Tensor, input_mode: str, mean, std) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, C, H, W) float, normalised; gray is 1 channel, rgb replicates it."""
    x = batch.float().div_(255.0).unsqueeze(1)
    if input_mode == "rgb":
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Radiograph-plausible augmentation on a (B, H, W) uint8 batch, returned as uint8.

    Small rotations, scale and shifts (positioning), left/right flips (left and right knees are
    mirror images), and exposure changes (gain, gamma) that detectors and processing produce.
    No colour jitter, no vertical flips, no crops that could cut away the joint.
    """
    import torch.nn.functional as F

    b, h, w = batch.shape
    x = batch.float().div(255.0).unsqueeze(1)
    dev = x.device
    ang = (torch.rand(b, generator=generator) * 2 - 1) * (10 * np.pi / 180)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * 0.06
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1).to(dev)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * 0.25).to(dev)
    gain = (1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * 0.1).to(dev)
    x = (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    return (x.squeeze(1) * 255 + 0.5).to(torch.uint8)

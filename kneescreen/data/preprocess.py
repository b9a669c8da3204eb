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


# ---------------------------------------------------------------------------------------------
# model inputs ("views"): what a member sees, named by the column that carries it
#
#   img_<s>    the whole radiograph letterboxed to s x s: (n, s, s)
#   roi_<s>    the proximal tibial and distal femoral metaphysis ROIs (`kneescreen.data.knee`),
#              20 mm squares at native resolution resampled to s x s (the same mm per pixel on
#              every film with a pixel spacing): (n, 2, s, s)
#   tiles_<s>  8 native-resolution s x s tiles around the joint, never resampled: (n, 8, s, s)
#
# Multi-instance views are scored by running the member on every instance and averaging the
# logits (mean pooling, `kneescreen.model.forward.instance_logits`); for a linear head that is
# the head applied to the mean feature.
VIEWS = ("img", "roi", "tiles")
VIEW_INSTANCES = {"img": 0, "roi": 2, "tiles": 8}
ROI_MM = 20.0


def input_key(view: str, size: int) -> str:
    """The column / batch key of a member input, e.g. ``img_160`` or ``roi_128``."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    return f"{view}_{int(size)}"


def parse_input_key(key: str) -> tuple[str, int]:
    """``roi_128`` -> (``roi``, 128)."""
    view, _, size = key.partition("_")
    if view not in VIEWS or not size.isdigit():
        raise ValueError(f"not an input key: {key!r} (expected <view>_<size>, view in {', '.join(VIEWS)})")
    return view, int(size)


def is_input_key(name: str) -> bool:
    """Whether a column carries a member input (``img_*``, ``roi_*``, ``tiles_*``)."""
    return name.startswith(tuple(f"{v}_" for v in VIEWS))


def blank_input(key: str, n: int = 1) -> np.ndarray:
    """Zeros of the shape ``n`` rows of input ``key`` have (rows that could not be used)."""
    view, s = parse_input_key(key)
    k = VIEW_INSTANCES[view]
    return np.zeros((n, k, s, s) if k else (n, s, s), np.uint8)


def augment_instances(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`augment` for (B, H, W) or multi-instance (B, K, H, W) batches (each instance on its own)."""
    if batch.ndim == 3:
        return augment(batch, generator)
    return augment(batch.reshape(-1, *batch.shape[-2:]), generator).reshape(batch.shape)

"""Stored pixel values -> model inputs with torch, on whatever device the tensors live (#22).

The same steps as the CPU path (`kneescreen.fileio.reader.read_radiograph` then
`kneescreen.data.decode.decode_batch`), in the same order and float precision, so the two agree
within one grey level of the uint8 model input (tests/test_device_preprocess.py):

    plausibility (blank, noise) -> rescale (float64 -> float32) -> display scale | window
    (LINEAR, LINEAR_EXACT, SIGMOID) | 0.5-99.5 percentile window -> MONOCHROME1 / INVERSE
    inversion -> letterbox (``img_<s>``) and, around the located joint, ``roi_<s>`` / ``tiles_<s>``.

Resizes use torch's antialiased bilinear interpolation, which is PIL's BILINEAR filter (the CPU
path's; measured difference < 2e-5 of the [0, 1] range). The joint is found on the CPU from the
working copy (long side 512 px) shrunk on the device, so only that copy leaves the device.
`preprocess_stored` is the entry point: a list of frames (NumPy or tensors) and their
`FrameFacts` in, uint8 input tensors and per-frame errors out; a bad frame is an error, never
a failed batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from kneescreen.data.knee.joint import locate_joint_small, working_shape
from kneescreen.data.knee.views import roi_boxes, tile_boxes
from kneescreen.data.preprocess import ROI_MM, VIEW_INSTANCES, blank_input, parse_input_key
from kneescreen.errors import DecodeError
from kneescreen.fileio.frames import FrameFacts
from kneescreen.fileio.plausibility import BLANK, CROP_HALF, EMPTY, noise_message

MIN_NEIGHBOUR_CORRELATION = 0.3  # `ReaderConfig.min_neighbour_correlation`'s default
_NATIVE = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64)


def to_device(pixels, device) -> torch.Tensor:
    """A 2-D frame (NumPy or tensor) on ``device``; uint16 / uint32 are widened there (few torch
    ops take them), after the copy, so only the stored bytes cross the bus."""
    if not isinstance(pixels, torch.Tensor):
        arr = np.ascontiguousarray(pixels)
        arr = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
        with warnings.catch_warnings():
            # Frames arrive as read-only views of the batch's bytes; nothing here writes to them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(arr)
    t = pixels.to(device, non_blocking=True)
    if t.dtype == torch.uint16:
        return t.to(torch.int32)
    return t if t.dtype in _NATIVE else t.to(torch.int64)


def plausibility_error(x: torch.Tensor, min_corr: float = MIN_NEIGHBOUR_CORRELATION) -> str | None:
    """The ``implausible_pixels`` message `fileio.plausibility.check_plausible` would raise, or None."""
    if x.numel() == 0:
        return EMPTY
    lo, hi = torch.aminmax(x)
    if bool(hi == lo):
        return BLANK
    rows, cols = x.shape
    if rows < 32 or cols < 32:
        return None
    r0, c0 = max(0, rows // 2 - CROP_HALF), max(0, cols // 2 - CROP_HALF)
    crop = x[r0 : r0 + 2 * CROP_HALF, c0 : c0 + 2 * CROP_HALF].to(torch.float64)
    a, b = crop[:, :-1].reshape(-1), crop[:, 1:].reshape(-1)
    sa, sb = a.std(correction=0), b.std(correction=0)
    if bool(sa == 0) or bool(sb == 0):
        return None
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))
    return noise_message(corr) if corr < min_corr else None


def _window(x: torch.Tensor, c: float, w: float, function: str) -> torch.Tensor:
    """`fileio.dicom.display._window` (PS3.3 C.11.2.1.2) in torch."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + torch.exp(torch.clamp(-4.0 * (x - c) / w, -80.0, 80.0)))
    if function == "LINEAR_EXACT":
        return torch.clamp((x - c) / w + 0.5, 0, 1)
    w = max(w, 1.0)
    if w == 1:
        return (x > c - 0.5).to(torch.float32)
    return torch.clamp((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def robust_window(x: torch.Tensor) -> torch.Tensor:
    """`fileio.radiograph.robust_window`: the 0.5-99.5 percentile window to [0, 1]."""
    sample = x[::4, ::4] if x.numel() > 1_000_000 else x
    q = torch.tensor([0.005, 0.995], dtype=torch.float64, device=x.device)
    lo, hi = (float(v) for v in torch.quantile(sample.reshape(-1).to(torch.float64), q))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return torch.zeros_like(x, dtype=torch.float32)
    return torch.clamp((x - lo) / (hi - lo), 0.0, 1.0).to(torch.float32)


def display(x: torch.Tensor, facts: FrameFacts) -> torch.Tensor:
    """Pixel values -> float32 [0, 1], bone bright (`fileio.dicom.display.display`)."""
    if facts.rescale_slope != 1 or facts.rescale_intercept != 0:  # pydicom rescales in float64
        x = (x.to(torch.float64) * facts.rescale_slope + facts.rescale_intercept).to(torch.float32)
    else:  # the same values: an exact integer (or float64) rounds to float32 once either way
        x = x.to(torch.float32)
    if facts.display_scale is not None:
        image = torch.clamp(x / facts.display_scale, 0, 1)
    elif facts.window_center is not None and facts.window_width is not None and facts.window_width > 0:
        image = _window(x, facts.window_center, facts.window_width, facts.voi_function)
    else:
        image = robust_window(x)
    return 1.0 - image if facts.inverted else image


def resize(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """PIL's BILINEAR resize (antialiased when shrinking) of a 2-D float image."""
    return F.interpolate(x[None, None], size=tuple(shape), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> uint8 with `data.preprocess.letterbox`'s rounding (add 0.5, truncate)."""
    return torch.clamp(x * 255 + 0.5, 0, 255).to(torch.uint8)


def letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    """`data.preprocess.letterbox` in torch: long side to ``size``, centred on black."""
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = torch.zeros((size, size), dtype=torch.uint8, device=image.device)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = to_uint8(resize(image, (nh, nw)))
    return out


def _crop(image: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """`knee.views._crop`: the box, zero outside the image."""
    out = torch.zeros((h, w), dtype=torch.float32, device=image.device)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


def view_inputs(image: torch.Tensor, pixel_spacing, keys) -> dict[str, torch.Tensor]:
    """`knee.views.view_inputs` in torch (``img_*`` keys ignored).

    Raises:
        DecodeError: ``joint_not_found``.
    """
    wanted = [(k, *parse_input_key(k)) for k in keys]
    wanted = [w for w in wanted if w[1] != "img"]
    if not wanted:
        return {}
    s, small_shape = working_shape(tuple(image.shape))
    small = resize(image, small_shape) if s < 1 else image
    loc = locate_joint_small(small.cpu().numpy(), tuple(image.shape), pixel_spacing)
    out = {}
    for key, view, size in wanted:
        if view == "roi":
            rois = {}
            for name, (top, left, h, w) in roi_boxes(loc, ROI_MM).items():
                crop = _crop(image, top, left, h, w)
                rois[name] = to_uint8(resize(crop, (size, size)) if (h, w) != (size, size) else crop)
            out[key] = torch.stack([rois["tibia"], rois["femur"]])
        else:
            boxes = tile_boxes(loc, VIEW_INSTANCES[view], size)
            out[key] = torch.stack([to_uint8(_crop(image, t, lft, size, size)) for t, lft in boxes])
    return out


def preprocess_one(pixels, facts: FrameFacts, keys, device) -> dict[str, torch.Tensor]:
    """One frame -> its model inputs (key -> uint8 tensor on ``device``).

    Raises:
        DecodeError: ``implausible_pixels`` or ``joint_not_found``, as the CPU path would.
    """
    x = to_device(pixels, device)
    if not facts.checked:
        err = plausibility_error(x)
        if err is not None:
            raise DecodeError("implausible_pixels", err)
    image = display(x, facts)
    out = view_inputs(image, facts.pixel_spacing, keys)
    for key in keys:
        view, size = parse_input_key(key)
        if view == "img":
            out[key] = letterbox(image, size)
    return out


def preprocess_stored(frames, facts: list[FrameFacts], keys, device="cpu"):
    """A batch of stored frames -> model inputs, on ``device``.

    Args:
        frames: 2-D pixel arrays (NumPy or tensors), one per row; None for rows to leave blank.
        facts: each frame's `FrameFacts` (None with a None frame).
        keys: the input keys the bundle needs (``img_224``, ``roi_128``, ...).
        device: torch device for the work and the outputs.

    Returns:
        (inputs, errors): ``inputs`` maps each key to a uint8 tensor with one row per frame
        (zeros where a frame is None or failed); ``errors[i]`` is None or (error_code, message).
        A failure that is not about the pixels (device out of memory...) is a transient
        ``read_failed``, so the next incremental run tries again.
    """
    rows: dict[str, list] = {k: [] for k in keys}
    errors: list = []
    for pixels, ff in zip(frames, facts):
        got, err = None, None
        if pixels is not None:
            try:
                got = preprocess_one(pixels, ff, keys, device)
            except DecodeError as exc:
                err = (exc.error_code, exc.message)
            except Exception as exc:  # noqa: BLE001 - one frame never fails the batch
                err = ("read_failed", f"device preprocess failed: {type(exc).__name__}: {exc}"[:300])
        errors.append(err)
        for k in keys:
            rows[k].append(got[k] if got is not None else torch.from_numpy(blank_input(k)[0]).to(device))
    inputs = {k: torch.stack(v) if v else torch.from_numpy(blank_input(k, 0)).to(device) for k, v in rows.items()}
    return inputs, errors

"""Small image-signal helpers for the knee modules (numpy only: scipy is not a dependency)."""

from __future__ import annotations

import numpy as np


def _box(a: np.ndarray, w: int, axis: int) -> np.ndarray:
    """Running mean of odd width ``w`` along ``axis``, edges extended (same shape out)."""
    r = max(int(w) // 2, 0)
    if r == 0:
        return a.astype(np.float32, copy=True)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a.astype(np.float64), pad, mode="edge"), axis=axis)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / (2 * r + 1)).astype(np.float32)


def smooth(a: np.ndarray, sigma: float, axis: int = -1) -> np.ndarray:
    """Gaussian-like smoothing: three running means (variance 3 * (w^2 - 1) / 12 = sigma^2)."""
    w = int(round(np.sqrt(4 * sigma * sigma + 1)))
    w += 1 - w % 2
    out = a
    for _ in range(3):
        out = _box(out, w, axis)
    return out


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximum over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    mt = m0[-1]
    between = (mt * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(mids[int(np.argmax(between[:-1]))])


def otsu3(values: np.ndarray, bins: int = 64) -> tuple[float, float]:
    """Two thresholds splitting a sample into three classes (air, soft tissue, bone) by the
    largest between-class variance, searched exhaustively over a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w, m = np.r_[0, np.cumsum(p)], np.r_[0, np.cumsum(p * mids)]
    best, out = -1.0, (float(mids[0]), float(mids[-1]))
    for i in range(1, bins - 1):
        j = np.arange(i + 1, bins)
        parts = [(w[i], m[i]), (w[j] - w[i], m[j] - m[i]), (1 - w[j], m[-1] - m[j])]
        var = sum(np.where(wk > 0, mk * mk / np.maximum(wk, 1e-12), 0) for wk, mk in parts)
        k = int(np.argmax(var))
        if var[k] > best:
            best, out = float(var[k]), (float(edges[i]), float(edges[j[k]]))
    return out


def resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float image (PIL; antialiased when shrinking)."""
    from PIL import Image

    h, w = shape
    return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F").resize((w, h), Image.BILINEAR))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, with the rounding of `kneescreen.data.preprocess.letterbox`, so
    native views and the letterboxed image share a scale."""
    return np.clip(np.asarray(x, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)

"""Drawing the synthetic knee: procedural anatomy from signed-distance shapes, bone whose
appearance follows a subject's T-score (`kneescreen.data.synth` draws the subjects and writes the
files). ``signal_scale`` "coarse" lets the T-score move brightness too; "fine" puts it only in
trabecular spacing and cortical thickness at physical scale (`FOV_MM`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Subject:
    index: int
    patient_ref: str
    mrn: str
    name: str
    birth_date: str
    study_date: str
    age: float
    sex: str
    t_score: float
    t_image: float
    site: int
    view: str
    laterality: str
    fmt: str
    syntax: str
    photometric: str
    bits: int
    seed: int


@functools.lru_cache(maxsize=8)
def _texture_filter(size: int) -> np.ndarray:
    """Band-pass filter in the frequency domain: trabeculae are a few pixels wide and run
    mostly along the bone's long axis (anisotropic: elongated vertically)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    scale = size / 384.0
    r = np.sqrt((fx * 1.0) ** 2 + (fy * 2.2) ** 2) * scale
    return np.exp(-((r - 0.11) ** 2) / (2 * 0.04**2)).astype(np.float32)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _ellipse(x, y, cx, cy, rx, ry):
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1) * min(rx, ry)


def _capsule(x, y, ax, ay, bx, by, r):
    px, py, dx, dy = x - ax, y - ay, bx - ax, by - ay
    h = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0, 1)
    return np.sqrt((px - dx * h) ** 2 + (py - dy * h) ** 2) - r


def _pose(rng: np.random.Generator, sub: Subject) -> tuple[float, float, float, float, float]:
    """Rotation (rad), zoom, shift and joint gap: the first draws of a subject's generator."""
    # Pose: small rotation, shift and zoom, as positioning varies between radiographers.
    ang = np.deg2rad(rng.normal(0, 3))
    zoom = rng.uniform(0.9, 1.1)
    sx, sy = rng.normal(0, 0.02, 2)
    gap = 0.028 - 0.004 * (sub.age - 65) / 20 + rng.normal(0, 0.002)
    return ang, zoom, sx, sy, gap


def knee_landmarks(sub: Subject, size: int) -> dict:
    """Where `render_knee` puts the joint: ground truth for localisation tests.

    Returns:
        ``row``/``col`` of the joint-line centre (midway between the femoral condyles' lowest
        point and the tibial plateau's top) and ``width``, the bony extent just above the joint
        line (AP: across both condyles; lateral: patella front to condyle back), in pixels of a
        ``size`` x ``size`` rendering.
    """
    ang, zoom, sx, sy, gap = _pose(np.random.default_rng(sub.seed), sub)
    if sub.view == "AP":  # condyle ellipses end at y = 0.43 + 0.07; plateau starts at 0.5 + gap
        xb, yb, wb = 0.5, 0.5 + gap / 2, 0.38
    else:  # condyle ellipse ends at 0.42 + 0.085; plateau starts at 0.51 + gap
        xb, yb, wb = 0.475, (0.505 + 0.51 + gap) / 2, 0.37
    x = 1 - xb if sub.laterality == "L" else xb
    dx, dy = x - 0.5 - sx, yb - 0.5 - sy
    # Invert the rendering's rotation about the centre and its zoom.
    x0 = zoom * (np.cos(ang) * dx + np.sin(ang) * dy)
    y0 = zoom * (-np.sin(ang) * dx + np.cos(ang) * dy)
    return {"row": (y0 + 0.5) * size - 0.5, "col": (x0 + 0.5) * size - 0.5, "width": wb * zoom * size}


def _anatomy(x: np.ndarray, y: np.ndarray, view: str, gap: float) -> tuple[np.ndarray, ...]:
    """Signed distances of femur, tibia, fibula, patella and the soft-tissue outline."""
    if view == "AP":
        femur = _smin(_capsule(x, y, 0.5, -0.2, 0.5, 0.3, 0.085),
                      np.minimum(_ellipse(x, y, 0.41, 0.43, 0.1, 0.07), _ellipse(x, y, 0.59, 0.43, 0.1, 0.07)), 0.06)
        tib_top = 0.5 + gap
        tibia = _smin(_ellipse(x, y, 0.5, tib_top + 0.045, 0.19, 0.045), _capsule(x, y, 0.5, tib_top + 0.1, 0.5, 1.3, 0.075), 0.07)
        fibula = _smin(_ellipse(x, y, 0.685, tib_top + 0.1, 0.035, 0.03), _capsule(x, y, 0.685, tib_top + 0.1, 0.66, 1.3, 0.019), 0.02)
        patella = _ellipse(x, y, 0.5, 0.39, 0.065, 0.075)
        tissue = np.abs(x - 0.5) - (0.3 + 0.02 * np.sin(6 * y))
    else:
        femur = _smin(_capsule(x, y, 0.52, -0.2, 0.52, 0.3, 0.08), _ellipse(x, y, 0.55, 0.42, 0.11, 0.085), 0.06)
        tib_top = 0.51 + gap
        tibia = _smin(_ellipse(x, y, 0.52, tib_top + 0.04, 0.15, 0.04), _capsule(x, y, 0.5, tib_top + 0.09, 0.47, 1.3, 0.07), 0.07)
        fibula = _smin(_ellipse(x, y, 0.6, tib_top + 0.09, 0.03, 0.028), _capsule(x, y, 0.6, tib_top + 0.09, 0.56, 1.3, 0.017), 0.02)
        patella = _ellipse(x, y, 0.33, 0.4, 0.04, 0.085)
        tissue = np.abs(x - 0.48) - (0.26 + 0.03 * np.cos(5 * y))
    return femur, tibia, fibula, patella, tissue


def _coarse_bone(noise: np.ndarray, q: float, size: int, jitter: float) -> tuple:
    """Trabecular map, cortex width and (cortex, marrow, attenuation) factors: everything falls
    with the T-score, so the class shows in the mean brightness at any resolution."""
    # Trabecular network: band-pass noise, thresholded; lower T -> sparser, thinner struts.
    tex = np.fft.irfft2(np.fft.rfft2(noise) * _texture_filter(size), s=(size, size))
    tex /= tex.std() + 1e-6
    trab = np.clip((tex - (0.1 - 0.45 * q)) / 0.6, 0, 1)
    cortex_w = (0.016 + 0.006 * q) * jitter
    return trab, cortex_w, (0.55 + 0.08 * q, 0.8 + 0.15 * q, 0.35 + 0.05 * q)


# `signal_scale="fine"`: the field of view that makes the AP femoral condyles (0.38 of the
# image) 90 mm wide, so pixel sizes are physical: 0.116 mm at 2048 px, 1.5 mm at 160 px.
FOV_MM = 90.0 / 0.38
# Mean of clip((X - 0.1) / 0.6, 0, 1) for X ~ N(0, 1): the trabecular map's mean, fixed in fine mode.
_TRAB_MEAN = 0.3468
_FINE_CORTEX = 0.001  # cortex width per unit of bone quality q, as a fraction of the field


def _fine_filter(size: int, period_px: float) -> np.ndarray:
    """Band-pass filter peaking at ``period_px`` across the bone (1.3x longer along it: a more
    elongated pattern would keep vertical frequencies low enough to survive downsampling)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f0 = 1.0 / period_px
    r = np.sqrt(fx**2 + (fy * 1.3) ** 2)
    return np.exp(-((r - f0) ** 2) / (2 * (0.25 * f0) ** 2)).astype(np.float32)


def _highpass(a: np.ndarray, period_px: float) -> np.ndarray:
    """``a`` without its content coarser than ``period_px`` (DC included)."""
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.rfftfreq(a.shape[1])[None, :]
    h = 1 - np.exp(-(fx**2 + fy**2) * (period_px**2) / 2)
    return np.fft.irfft2(np.fft.rfft2(a) * h, s=a.shape)


def _fine_bone(noise: np.ndarray, q: float, size: int, jitter: float) -> tuple:
    """Like `_coarse_bone`, but the T-score moves only fine structure, and nothing coarser than
    2 mm depends on it, so a 160 px letterbox (1.5 mm pixels) is the same at every T-score.

    Trabecular spacing is 0.7 - 0.15 q mm (0.45-0.95 mm: 4-8 px at 2048 px); the map keeps a
    fixed mean and loses its content coarser than 2 mm. The cortex keeps its outer envelope, but
    only its outer `_solid_fraction` is solid: the endosteal rest is trabecularised, porous bone
    of the same mean brightness (~8 px thinner solid cortex per unit q at 2048 px). A thinner
    *envelope* would not hide: a 4 mm cortex is resolved by 1.5 mm pixels.

    Returns:
        ``(trab, cortex_w, factors, solid_w)``: `_coarse_bone`'s three plus the solid width.
    """
    mm_px = FOV_MM / size
    period_px = float(np.clip(0.7 - 0.15 * q, 0.45, 0.95)) / mm_px
    tex = np.fft.irfft2(np.fft.rfft2(noise) * _fine_filter(size, period_px), s=(size, size))
    tex /= tex.std() + 1e-6
    trab = _TRAB_MEAN + _highpass(np.clip((tex - 0.1) / 0.6, 0, 1), 2.0 / mm_px)
    cortex_w = 0.016 * jitter
    return trab, cortex_w, (0.55, 0.8, 0.35), cortex_w * _solid_fraction(q)


def _solid_fraction(q: float) -> float:
    return float(np.clip(0.75 + 0.15 * q, 0.45, 1.0))


def render_knee(sub: Subject, size: int, signal_scale: str = "coarse") -> np.ndarray:
    """Float image in [0, 1], bone bright, for one subject.

    Args:
        sub: the subject (its seed fixes pose, texture and noise).
        size: image side in pixels.
        signal_scale: "coarse" (the default archive) or "fine" (see `SynthConfig`): the same
            subject gets the same pose and noise in both; only the bone differs.
    """
    rng = np.random.default_rng(sub.seed)
    q = float(np.clip((sub.t_image + 1.2) / 2.5, -1.6, 1.6))  # bone quality, ~0 at the mean
    ang, zoom, sx, sy, gap = _pose(rng, sub)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    y0, x0 = np.meshgrid(g - 0.5, g - 0.5, indexing="ij")
    x = (np.cos(ang) * x0 - np.sin(ang) * y0) / zoom + 0.5 + sx
    y = (np.sin(ang) * x0 + np.cos(ang) * y0) / zoom + 0.5 + sy
    if sub.laterality == "L":
        x = 1 - x
    femur, tibia, fibula, patella, tissue = _anatomy(x, y, sub.view, gap)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    fine = signal_scale == "fine"
    bone_fn = _fine_bone if fine else _coarse_bone
    trab, cortex_w, (cortex_i, marrow_f, atten), *solid_w = bone_fn(noise, q, size, rng.uniform(0.9, 1.1))
    soft = 1.5 / size
    img = 0.28 * _sigmoid(-tissue / (4 * soft))
    for sdf, weight in ((femur, 1.0), (tibia, 1.0), (fibula, 0.85), (patella, 0.45)):
        inside = _sigmoid(-sdf / soft)
        depth = np.sqrt(np.clip(-sdf, 0, None))  # chord length through a round bone
        cortex = inside * _sigmoid((sdf + cortex_w) / soft)
        marrow = inside - cortex
        bone = cortex * cortex_i + marrow * (0.12 + 0.2 * trab) * marrow_f + 2.2 * depth * inside * atten
        if fine:  # pores in the endosteal cortex: zero-mean texture, so no coarse trace
            porous = cortex - inside * _sigmoid((sdf + solid_w[0]) / soft)
            bone = bone + porous * 0.6 * (trab - _TRAB_MEAN)
        img = img + weight * bone * 0.6
    # Acquisition: heel effect, exposure, quantum noise.
    img = img * (1 + rng.uniform(-0.08, 0.08) * (y - 0.5)) * rng.uniform(0.85, 1.15) + 0.04
    img = img + rng.normal(0, rng.uniform(0.006, 0.015), img.shape)
    return np.clip(img / 1.25, 0, 1).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))

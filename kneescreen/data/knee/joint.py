"""Knee-joint localisation on the full-resolution radiograph, without labels.

`locate_joints` / `locate_joint`: on a normalised working copy (long side 512 px, uniform borders
such as letterbox bars and burnt-in bands trimmed), bones are bright vertical bands of the
column-mean profile (one per knee; two on bilateral films). In each band the joint line is the
row that is darkest relative to the rows just above and below it, counted only where both of
those are bone (a per-row threshold, since soft tissue and exposure change along the leg) and
weighted by how much of the band the dark row crosses. The knee's width and centre come from the
outermost strong edges of the condyles just above that row. `_confidence` says how knee-like the
result is; below `MIN_CONFIDENCE` a film gets ``joint_not_found``.

Scale: mm per pixel comes from the header's pixel spacing when there is one, else from the
measured bony knee width under the assumption that an adult knee is `KNEE_WIDTH_MM` wide
(femoral epicondylar width: about 85-95 mm in men, 75-85 mm in women, so +-10% per person). On
lateral views the measured width is the knee's depth at the condyles (patella included when it
sits that low), which is of the same order but a rougher scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kneescreen.data.knee._signal import otsu, otsu3, resize, smooth
from kneescreen.errors import DecodeError

_logger = logging.getLogger(__name__)

KNEE_WIDTH_MM = 90.0  # assumed bony knee width when the header has no pixel spacing
# Below this a placement is refused (joint_not_found). Measured: the most knee-like non-knee
# (pydicom's chest CR) scores 0.24, the faintest correctly placed dev knee 0.36.
MIN_CONFIDENCE = 0.3
_WORK_PX = 512  # long side of the working copy: the joint space stays >= 3 px wide


@dataclass(frozen=True)
class JointLocation:
    """Where the knee joint is, in native pixel coordinates of the image it was found on.

    Attributes:
        row: joint-line row (between femoral condyles and tibial plateau).
        col: centre column of the knee.
        width_px: bony knee width at the joint line, in pixels.
        mm_per_px: scale used for physical sizes.
        mm_source: "pixel_spacing" (from the header) or "assumed_knee_width" (`KNEE_WIDTH_MM`).
        confidence: 0..1 quality of the placement; below `MIN_CONFIDENCE` it is refused.
        shape: (rows, cols) of the image the location refers to.
        knees: how many knees were found on the image (bilateral AP films show two).
    """

    row: float
    col: float
    width_px: float
    mm_per_px: float
    mm_source: str
    confidence: float
    shape: tuple[int, int]
    knees: int = 1

    def px(self, mm: float) -> float:
        """Length in pixels of ``mm`` millimetres at this location's scale."""
        return mm / self.mm_per_px


def _content_box(a: np.ndarray, tol: float = 0.01) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) after trimming uniform edge rows/columns: letterbox padding,
    burnt-in white bands and black collimator borders carry no anatomy and would skew profiles."""
    rows, cols = a.std(axis=1) > tol, a.std(axis=0) > tol
    if not rows.any() or not cols.any():
        return 0, 0, 0, 0
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1


def working_shape(shape: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """(scale, (rows, cols)) of the working copy of an image of ``shape``: long side `_WORK_PX`
    at most. A device can shrink its image to this shape itself and hand the small copy to
    `locate_joints_small` (issue #22): only the small copy has to reach the CPU."""
    h, w = shape
    s = min(1.0, _WORK_PX / max(h, w))
    return s, (max(1, round(h * s)), max(1, round(w * s)))


def shrink(image: np.ndarray) -> np.ndarray:
    """The image resized to `working_shape` (PIL bilinear, antialiased), float32."""
    s, shape = working_shape(image.shape)
    return resize(image, shape) if s < 1 else np.asarray(image, np.float32)


def _working_copy(small: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Normalised content area of the shrunk image and the content box's (top, left) in it."""
    a = small
    t, b, lft, rgt = _content_box(a)
    a = a[t:b, lft:rgt]
    if min(a.shape, default=0) < 48:
        raise DecodeError("joint_not_found", f"image content too small to hold a knee ({a.shape})")
    lo, hi = np.percentile(a, [1, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return a, (t, lft)


def _peaks(p: np.ndarray, min_prominence: float) -> list[int]:
    """Indices of local maxima of ``p`` whose prominence is at least ``min_prominence``."""
    out = []
    n = len(p)
    for i in range(1, n - 1):
        if not (p[i] >= p[i - 1] and p[i] > p[i + 1]):
            continue
        left = p[: i + 1][::-1]
        right = p[i:]
        # Walk each way until a higher value: the lowest point passed bounds the prominence.
        lh = np.flatnonzero(left > p[i])
        rh = np.flatnonzero(right > p[i])
        lmin = left[: lh[0]].min() if len(lh) else left.min()
        rmin = right[: rh[0]].min() if len(rh) else right.min()
        if p[i] - max(lmin, rmin) >= min_prominence:
            out.append(i)
    return out


def _knee_columns(a: np.ndarray) -> list[tuple[int, int, int]]:
    """Candidate knees as (centre, left, right) column bands of the working copy.

    Femur and tibia are bright vertical bands, so the column means peak over each knee; a
    bilateral film gives two peaks. Text markers and rulers are too small to survive the smoothing.
    """
    w = a.shape[1]
    p = smooth(a.mean(axis=0), w / 60)
    lo, hi = float(p.min()), float(p.max())
    span = max(hi - lo, 1e-6)
    # A second knee stands out of the dip between the legs (>= 0.29 of the range on the dev set);
    # femur, tibia and fibula of one knee make bumps of <= 0.15.
    peaks = [i for i in _peaks(p, 0.22 * span) if p[i] >= lo + 0.45 * span]
    peaks = sorted(peaks, key=lambda i: -p[i])
    kept: list[int] = []
    for i in peaks:
        if all(abs(i - k) > w / 5 for k in kept) and len(kept) < 2:
            kept.append(i)
    out = []
    for c in sorted(kept):
        level = lo + 0.5 * (p[c] - lo)  # the band: where the profile stays above half its peak
        left = c - int(np.argmax(p[c::-1] < level)) if (p[:c] < level).any() else 0
        right = c + int(np.argmax(p[c:] < level)) if (p[c:] < level).any() else w - 1
        out.append((c, left, right))
    return out


def _bone_mask(sub: np.ndarray, dark: float, smooth_rows: float) -> np.ndarray:
    """Bone pixels of a column band, thresholded row by row halfway between the 10th and 95th
    percentiles of the row's pixels above ``dark`` (the image's Otsu level: it drops the air,
    and on films with little air the thinnest soft tissue). One global threshold fails: the
    thigh is thicker than the calf and the heel effect tilts exposure along the leg."""
    lo = _row_percentile(sub, dark, 10, fill=dark)
    hi = _row_percentile(sub, dark, 95, fill=1.0)
    lo, hi = smooth(lo, smooth_rows), smooth(hi, smooth_rows)
    return (sub - lo[:, None]) > 0.5 * np.maximum(hi - lo, 0.05)[:, None]


def _row_percentile(a: np.ndarray, above: float, q: float, fill: float) -> np.ndarray:
    """Per row, the ``q``-th percentile (linear, as `np.percentile`) of the values > ``above``;
    ``fill`` for rows with fewer than 3. One sort instead of `np.nanpercentile`'s per-row loop."""
    srt = np.sort(np.where(a > above, a, np.inf), axis=1)
    n = np.isfinite(srt).sum(axis=1)
    pos = np.maximum(n - 1, 0) * (q / 100.0)
    f = np.floor(pos).astype(int)
    c = np.minimum(f + 1, np.maximum(n - 1, 0))
    rows = np.arange(len(a))
    srt = np.where(np.isfinite(srt), srt, 0.0)  # indices stay below n; rows with n < 3 get fill
    val = srt[rows, f] + (srt[rows, c] - srt[rows, f]) * (pos - f)
    return np.where(n >= 3, val, fill).astype(np.float32)


def _valley_map(sub: np.ndarray, bone: np.ndarray, scales: list[int]) -> np.ndarray:
    """Joint-space map: how much darker each pixel is than the pixels ``a`` rows above and below
    it (best over the scales ``a``), kept only where both of those are bone."""
    best = np.zeros(sub.shape, np.float32)
    for a in scales:
        s = smooth(smooth(sub, max(a / 2, 0.7), axis=0), 1.0, axis=1)
        v = np.zeros_like(s)
        v[a:-a] = np.minimum(s[:-2 * a], s[2 * a:]) - s[a:-a]
        v[a:-a] *= bone[:-2 * a] & bone[2 * a:]
        best = np.maximum(best, v)
    return best


def _analyse_knee(a: np.ndarray, band: tuple[int, int, int], limits: tuple[int, int],
                  levels: tuple[float, float]) -> dict:
    """Joint row, centre, width and the confidence cues of one candidate knee, in working-copy
    pixels. ``levels``: the image's Otsu level and its air level (lower three-class Otsu)."""
    c, left, right = band
    half = max(right - left, 4) / 2
    c0, c1 = max(limits[0], int(c - 2.2 * half)), min(limits[1], int(c + 2.2 * half) + 1)
    sub = a[:, c0:c1]
    bone = _bone_mask(sub, levels[0], half / 2)
    scales = sorted({max(2, int(round(2 * half * f))) for f in (0.04, 0.07, 0.11)})
    vmap = _valley_map(sub, bone, scales)
    # Row score: summed over the band, so rows where wide bone lies above and below count most,
    # times the share of columns where the row is a valley at all: a joint space crosses the
    # knee, the dark letter inside a bright R/L marker is as deep but narrow.
    cover = (vmap > 0.01).mean(axis=1)
    score = smooth(vmap.sum(axis=1) / sub.shape[1] * np.sqrt(cover), 1.0)
    r = int(np.argmax(score))
    best = float(score[r])
    # Prominence: against the 90th percentile of the rows well away from the chosen one.
    away = np.abs(np.arange(len(score)) - r) > 1.2 * half
    p90 = float(np.percentile(score[away], 90)) if away.any() else 0.0
    width, col = _condyle_width(sub, c - c0, r, half, levels[1])
    lft, rgt = int(col - width / 2), int(col + width / 2) + 1
    row_v = vmap[max(0, r - 1):r + 2].max(axis=0)[lft:rgt]
    span = float((row_v > 0.2 * row_v.max()).mean()) if row_v.size and row_v.max() > 0 else 0.0
    return {"row": float(r), "col": col + c0, "width": width, "score": best, "p90": p90,
            "span": span, "size": width / a.shape[1], "hsize": width / a.shape[0]}


def _condyle_width(sub: np.ndarray, c: int, r: int, half: float, air: float) -> tuple[float, float]:
    """Width and centre of the femoral condyles from the mean profile of a band of rows just
    above the joint line: the outermost strong rise left of the centre and fall right of it.

    Edges, not a threshold: exposure often differs between the medial and lateral condyle
    (soft-tissue thickness, heel effect), which cuts a thresholded mask at the notch. Skin
    edges are skipped: just outside them the profile is air (below ``air``).
    """
    top, bot = max(0, int(r - 0.5 * half)), max(1, int(r - 0.1 * half))
    p = smooth(sub[top:bot].mean(axis=0) if bot > top else sub[r], 1.0)
    g = np.gradient(p)
    k = max(4, int(half / 6))  # beyond the blur of a skin edge
    outside_l = np.r_[np.full(k, -1.0), p[:-k]]  # profile k px left of each column
    outside_r = np.r_[p[k:], np.full(k, -1.0)]
    gl = np.where(outside_l > air, g, 0)[: c + 1]
    gr = -np.where(outside_r > air, g, 0)[c:]
    lft = _outermost_edge(gl[::-1])
    rgt = _outermost_edge(gr)
    lft = c - lft if lft is not None else 0
    rgt = c + rgt if rgt is not None else len(p) - 1
    return float(rgt - lft + 1), (lft + rgt) / 2


def _outermost_edge(g: np.ndarray, rel: float = 0.35) -> int | None:
    """Index of the last local maximum of ``g`` (ordered from the centre outwards) that reaches
    ``rel`` of its strongest: the bone's outer edge, not a stronger edge inside the knee (patella,
    notch, a brighter medial condyle)."""
    if g.size < 3 or g.max() <= 0:
        return None
    peaks = np.flatnonzero((g[1:-1] >= g[:-2]) & (g[1:-1] > g[2:]) & (g[1:-1] >= rel * g.max())) + 1
    return int(peaks[-1]) if peaks.size else int(np.argmax(g))


def _confidence(k: dict) -> float:
    """0..1: how surely a candidate is a knee joint.

    Two cues veto: strength (a joint space is a deep dark band across a wide bone; a chest's
    clavicle-rib gap and the ankle's joint score lower than all but the faintest dev knees) and
    size (a knee is at least ~6% of the image side; text and overlay boxes are smaller). Two
    scale it (geometric mean, so one weak cue lowers the score without vetoing it): prominence
    over the other rows (ribs and vertebral discs give many similar valleys) and a valley that
    crosses most of the knee's width (span). Constants set on the 104 dev radiographs and on
    pydicom's non-knee images (chest CR, ankle CR, CT, MR, ultrasound) plus noise.
    """
    strength = np.clip((k["score"] - 0.0015) / 0.003, 0, 1)
    size = np.clip((min(k["size"], k["hsize"]) - 0.06) / 0.06, 0, 1)
    prominence = np.clip((k["score"] / max(k["p90"], 1e-9) - 4.0) / 12.0, 0, 1)
    span = np.clip((k["span"] - 0.15) / 0.25, 0, 1)
    return float(strength * size * np.sqrt(prominence * span))


def _candidates(small: np.ndarray) -> tuple[list[dict], tuple[int, int]]:
    """All candidate knees of a shrunk image (working-copy pixels) and the content offset."""
    a, off = _working_copy(small)
    bands = _knee_columns(a)
    levels = (otsu(a.ravel()), otsu3(a[::2, ::2].ravel())[0])
    out = []
    for i, band in enumerate(bands):
        # A bilateral film: each knee's search stops halfway to the other knee.
        lo = (bands[i - 1][0] + band[0]) // 2 if i > 0 else 0
        hi = (band[0] + bands[i + 1][0]) // 2 if i + 1 < len(bands) else a.shape[1]
        k = _analyse_knee(a, band, (lo, hi), levels)
        k["confidence"] = _confidence(k)
        out.append(k)
    return out, off


def locate_joints(image: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                  min_confidence: float = MIN_CONFIDENCE) -> list[JointLocation]:
    """Every knee joint on a radiograph (two on a bilateral film), left to right in the image.

    Args:
        image: HxW float image in [0, 1], bone bright (`kneescreen.fileio.reader.Radiograph.image`).
        pixel_spacing: (row, col) mm per pixel from the header, or None. Pixels are taken as
            square (their mean is used): DX and CR detectors have square pixels.
        min_confidence: placements below this are dropped.

    Returns:
        One `JointLocation` per knee found, in native pixel coordinates.

    Raises:
        DecodeError: ``joint_not_found`` when no knee reaches ``min_confidence``.
    """
    image = np.asarray(image, np.float32)
    return locate_joints_small(shrink(image), image.shape, pixel_spacing, min_confidence)


def locate_joints_small(small: np.ndarray, shape: tuple[int, int], pixel_spacing=None,
                        min_confidence: float = MIN_CONFIDENCE) -> list[JointLocation]:
    """`locate_joints` from the image's working copy (`shrink`, or the same resize on a device)
    and the native ``shape``; locations are in native pixels."""
    s = working_shape(shape)[0]
    cands, (top, left) = _candidates(np.asarray(small, np.float32))
    _logger.debug("knee candidates (working copy): %s", cands)
    good = [k for k in cands if k["confidence"] >= min_confidence]
    if not good:
        best = max((k["confidence"] for k in cands), default=0.0)
        raise DecodeError("joint_not_found", f"no knee joint found with confidence >= {min_confidence} "
                          f"(best {best:.2f}); is this a knee radiograph?")
    out = []
    for k in good:
        width = k["width"] / s
        if pixel_spacing:
            mm, src = float(np.mean(pixel_spacing)), "pixel_spacing"
        else:
            mm, src = KNEE_WIDTH_MM / max(width, 1.0), "assumed_knee_width"
        out.append(JointLocation(
            row=(k["row"] + top + 0.5) / s - 0.5, col=(k["col"] + left + 0.5) / s - 0.5,
            width_px=width, mm_per_px=mm, mm_source=src, confidence=round(k["confidence"], 3),
            shape=(int(shape[0]), int(shape[1])), knees=len(good)))
    return out


def locate_joint(image: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                 min_confidence: float = MIN_CONFIDENCE) -> JointLocation:
    """The knee joint of a radiograph: the most confident one when the film shows both knees.

    Args:
        image: HxW float image in [0, 1], bone bright.
        pixel_spacing: (row, col) mm per pixel from the header, or None (then the scale comes
            from the measured knee width and `KNEE_WIDTH_MM`).
        min_confidence: placements below this raise.

    Returns:
        The `JointLocation`.

    Raises:
        DecodeError: ``joint_not_found`` when no knee joint is found with enough confidence.
    """
    return max(locate_joints(image, pixel_spacing, min_confidence), key=lambda j: j.confidence)


def locate_joint_small(small: np.ndarray, shape: tuple[int, int], pixel_spacing=None,
                       min_confidence: float = MIN_CONFIDENCE) -> JointLocation:
    """`locate_joint` from the working copy and native shape (see `locate_joints_small`)."""
    return max(locate_joints_small(small, shape, pixel_spacing, min_confidence), key=lambda j: j.confidence)

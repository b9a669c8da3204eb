"""Knee-joint localisation, native-resolution regions of interest and radiogrammetry.

The letterboxed 160 px model input throws away the trabecular texture and cortical detail that
carry bone density. This module finds the knee joint on the full-resolution radiograph without
any labels, so that crops of fixed *physical* size (mm) can be taken at native resolution:

- `locate_joints` / `locate_joint`: on a normalised working copy (long side 512 px, uniform
  borders such as letterbox bars and burnt-in bands trimmed), bones are bright vertical bands of
  the column-mean profile (one per knee; two on bilateral films). In each band the joint line is
  the row that is darkest relative to the rows just above and below it, counted only where both
  of those are bone (a per-row threshold, since soft tissue and exposure change along the leg)
  and weighted by how much of the band the dark row crosses. The knee's width and centre come
  from the outermost strong edges of the condyles just above that row. `_confidence` says how
  knee-like the result is; below `MIN_CONFIDENCE` a film gets ``joint_not_found``.
- `regions_of_interest`: proximal tibial metaphysis and distal femur, sized in mm.
- `tiles`: native-resolution tiles around the joint for a multiple-instance member.
- `cortical_thickness`: femoral and tibial shaft radiogrammetry (combined cortical thickness and
  cortical index) from horizontal profiles across the shafts.
- `qc_montage`: a PNG grid of thumbnails with the placements drawn, for judging by eye
  (`bench/knee_qc.py` runs it on the dev radiographs).

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

from kneescreen.data.preprocess import ROI_MM, VIEW_INSTANCES, parse_input_key
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


# ---------------------------------------------------------------------------------------------
# small signal helpers (numpy only: scipy is not a dependency)


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


def _smooth(a: np.ndarray, sigma: float, axis: int = -1) -> np.ndarray:
    """Gaussian-like smoothing: three running means (variance 3 * (w^2 - 1) / 12 = sigma^2)."""
    w = int(round(np.sqrt(4 * sigma * sigma + 1)))
    w += 1 - w % 2
    out = a
    for _ in range(3):
        out = _box(out, w, axis)
    return out


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximum over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    mt = m0[-1]
    between = (mt * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(mids[int(np.argmax(between[:-1]))])


def _otsu3(values: np.ndarray, bins: int = 64) -> tuple[float, float]:
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


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float image (PIL; antialiased when shrinking)."""
    from PIL import Image

    h, w = shape
    return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F").resize((w, h), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------
# localisation


def _content_box(a: np.ndarray, tol: float = 0.01) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) after trimming uniform edge rows/columns: letterbox padding,
    burnt-in white bands and black collimator borders carry no anatomy and would skew profiles."""
    rows, cols = a.std(axis=1) > tol, a.std(axis=0) > tol
    if not rows.any() or not cols.any():
        return 0, 0, 0, 0
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Small normalised copy of the content area, its scale (work px per native px) and the
    content box's native (top, left) offset."""
    h, w = image.shape
    s = min(1.0, _WORK_PX / max(h, w))
    a = _resize(image, (max(1, round(h * s)), max(1, round(w * s)))) if s < 1 else np.asarray(image, np.float32)
    t, b, lft, rgt = _content_box(a)
    a = a[t:b, lft:rgt]
    if min(a.shape, default=0) < 48:
        raise DecodeError("joint_not_found", f"image content too small to hold a knee ({a.shape})")
    lo, hi = np.percentile(a, [1, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return a, s, (t, lft)


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
    p = _smooth(a.mean(axis=0), w / 60)
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
    lo, hi = _smooth(lo, smooth_rows), _smooth(hi, smooth_rows)
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
        s = _smooth(_smooth(sub, max(a / 2, 0.7), axis=0), 1.0, axis=1)
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
    score = _smooth(vmap.sum(axis=1) / sub.shape[1] * np.sqrt(cover), 1.0)
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
    p = _smooth(sub[top:bot].mean(axis=0) if bot > top else sub[r], 1.0)
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


def _candidates(image: np.ndarray) -> tuple[list[dict], float, tuple[int, int]]:
    """All candidate knees of an image (working-copy pixels), the working scale and offset."""
    a, s, off = _working_copy(image)
    bands = _knee_columns(a)
    levels = (_otsu(a.ravel()), _otsu3(a[::2, ::2].ravel())[0])
    out = []
    for i, band in enumerate(bands):
        # A bilateral film: each knee's search stops halfway to the other knee.
        lo = (bands[i - 1][0] + band[0]) // 2 if i > 0 else 0
        hi = (band[0] + bands[i + 1][0]) // 2 if i + 1 < len(bands) else a.shape[1]
        k = _analyse_knee(a, band, (lo, hi), levels)
        k["confidence"] = _confidence(k)
        out.append(k)
    return out, s, off


def locate_joints(image: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                  min_confidence: float = MIN_CONFIDENCE) -> list[JointLocation]:
    """Every knee joint on a radiograph (two on a bilateral film), left to right in the image.

    Args:
        image: HxW float image in [0, 1], bone bright (`kneescreen.io.reader.Radiograph.image`).
        pixel_spacing: (row, col) mm per pixel from the header, or None. Pixels are taken as
            square (their mean is used): DX and CR detectors have square pixels.
        min_confidence: placements below this are dropped.

    Returns:
        One `JointLocation` per knee found, in native pixel coordinates.

    Raises:
        DecodeError: ``joint_not_found`` when no knee reaches ``min_confidence``.
    """
    image = np.asarray(image, np.float32)
    cands, s, (top, left) = _candidates(image)
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
            shape=(int(image.shape[0]), int(image.shape[1])), knees=len(good)))
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


# ---------------------------------------------------------------------------------------------
# regions of interest and tiles

# ROI centres in mm below the joint line (negative: above). The tibial ROI spans the proximal
# metaphysis under the subchondral plate (10-30 mm below the line for a 20 mm ROI); the
# femoral one sits above the condyles (40-60 mm above), in the supracondylar metaphysis.
ROI_CENTRES_MM = {"tibia": 20.0, "femur": -50.0}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    # Same rounding as `kneescreen.data.preprocess.letterbox`, so both inputs share a scale.
    return np.clip(np.asarray(x, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


def _crop(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """``image[top:top+h, left:left+w]``, zero (black, like letterbox padding) outside."""
    out = np.zeros((h, w), np.float32)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


def roi_boxes(loc: JointLocation, size_mm: float = 20.0) -> dict[str, tuple[int, int, int, int]]:
    """Native-pixel (top, left, height, width) of each ROI: ``size_mm`` square, centred on the
    knee's centre column at `ROI_CENTRES_MM` from the joint line."""
    side = max(1, int(round(loc.px(size_mm))))
    out = {}
    for name, dy in ROI_CENTRES_MM.items():
        cy, cx = loc.row + loc.px(dy), loc.col
        out[name] = (int(round(cy - side / 2)), int(round(cx - side / 2)), side, side)
    return out


def regions_of_interest(image: np.ndarray, loc: JointLocation, size_mm: float = 20.0,
                        out_px: int | None = 128) -> dict[str, np.ndarray]:
    """Native-resolution crops of the proximal tibial metaphysis and the distal femur.

    Args:
        image: the HxW float image `loc` was found on.
        loc: its `JointLocation`; its ``mm_per_px`` sizes the crops, so they hold the same
            anatomy at any resolution.
        size_mm: side of each square ROI in mm.
        out_px: resample each crop to this side (only when its native side differs; PIL
            bilinear, antialiased when shrinking); None keeps the native side.

    Returns:
        ``{"tibia": uint8 array, "femur": uint8 array}``; parts outside the image are black.
    """
    image = np.asarray(image, np.float32)
    out = {}
    for name, (top, left, h, w) in roi_boxes(loc, size_mm).items():
        crop = _crop(image, top, left, h, w)
        if out_px is not None and (h, w) != (out_px, out_px):
            crop = _resize(crop, (out_px, out_px))
        out[name] = _to_uint8(crop)
    return out


def tile_boxes(loc: JointLocation, n: int = 8, tile_px: int = 256) -> list[tuple[int, int]]:
    """(top, left) of ``n`` tiles on a grid over the joint (one knee width square around it),
    the ``n`` closest to the joint centre, in reading order."""
    g = max(1, int(np.ceil(np.sqrt(n))))
    offs = np.linspace(-0.5, 0.5, g) * loc.width_px if g > 1 else np.zeros(1)
    centres = [(loc.row + dy, loc.col + dx) for dy in offs for dx in offs]
    centres = sorted(centres, key=lambda p: (p[0] - loc.row) ** 2 + (p[1] - loc.col) ** 2)[:n]
    centres = sorted(centres)
    return [(int(round(cy - tile_px / 2)), int(round(cx - tile_px / 2))) for cy, cx in centres]


def tiles(image: np.ndarray, loc: JointLocation, n: int = 8, tile_px: int = 256) -> np.ndarray:
    """Native-resolution tiles around the joint, for a multiple-instance member.

    Args:
        image: the HxW float image `loc` was found on.
        loc: its `JointLocation`.
        n: number of tiles (a ceil(sqrt(n)) grid over a knee-width square, nearest n kept).
        tile_px: tile side in native pixels (never resampled: the texture stays as acquired).

    Returns:
        ``(n, tile_px, tile_px)`` uint8; parts outside the image are black.
    """
    image = np.asarray(image, np.float32)
    return np.stack([_to_uint8(_crop(image, t, lft, tile_px, tile_px)) for t, lft in tile_boxes(loc, n, tile_px)])



def view_inputs(image: np.ndarray, pixel_spacing: tuple[float, float] | None, keys) -> dict[str, np.ndarray]:
    """The native-resolution member inputs of one radiograph (`kneescreen.data.preprocess.VIEWS`).

    Args:
        image: HxW float image in [0, 1], bone bright.
        pixel_spacing: (row, col) mm per pixel from the header, or None.
        keys: input keys such as ``roi_128`` or ``tiles_224`` (``img_*`` keys are ignored here).

    Returns:
        key -> uint8 array: ``roi_<s>`` (2, s, s) tibia then femur, ``ROI_MM`` squares resampled to
        s; ``tiles_<s>`` (8, s, s) native tiles.

    Raises:
        DecodeError: ``joint_not_found`` when a view needs the joint and none is found.
    """
    wanted = [(k, *parse_input_key(k)) for k in keys]
    wanted = [w for w in wanted if w[1] != "img"]
    if not wanted:
        return {}
    loc = locate_joint(image, pixel_spacing)
    out = {}
    for key, view, size in wanted:
        if view == "roi":
            rois = regions_of_interest(image, loc, ROI_MM, out_px=size)
            out[key] = np.stack([rois["tibia"], rois["femur"]])
        else:
            out[key] = tiles(image, loc, VIEW_INSTANCES[view], size)
    return out

# ---------------------------------------------------------------------------------------------
# radiogrammetry

# Measurement levels, in knee widths from the joint line, tried in order: the diaphyses start
# about one knee width (~90 mm) away; closer in, the metaphysis flares and the cortex thins
# into trabecular bone. Films cropped close to the knee only reach the nearer levels.
_SHAFT_LEVELS = (1.4, 1.2, 1.0)
# A cortex is at most this share of the shaft's half-width (cortical index <= ~0.75): the
# endosteal edge is looked for there, not in the medulla's own texture.
_MAX_CORTEX = 0.6


def _subpixel(g: np.ndarray, i: int) -> float:
    """Parabolic refinement of an extremum of ``g`` at index ``i``."""
    if 0 < i < len(g) - 1:
        den = g[i - 1] - 2 * g[i] + g[i + 1]
        if abs(den) > 1e-12:
            return i + 0.5 * float(g[i - 1] - g[i + 1]) / float(den)
    return float(i)


def _shaft_run(p: np.ndarray, centre: int, min_w: float) -> tuple[int, int] | None:
    """The bright run of a row profile that is the shaft: above halfway between the soft tissue
    (20th percentile) and the peak, at least ``min_w`` wide (the fibula is narrower), nearest
    the knee's centre column."""
    lo, hi = float(np.percentile(p, 20)), float(p.max())
    on = np.r_[False, p > lo + 0.5 * (hi - lo), False]
    d = np.diff(on.astype(np.int8))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    runs = [(a, b) for a, b in zip(starts, ends) if b - a + 1 >= min_w]
    if not runs:
        return None
    return min(runs, key=lambda r: 0 if r[0] <= centre <= r[1] else min(abs(r[0] - centre), abs(r[1] - centre)))


def _row_edges(p: np.ndarray, centre: int, scale: float) -> tuple[float, float, float, float] | None:
    """(outer left, inner left, inner right, outer right) cortical edges of one row profile.

    Outer edges: steepest rise into and fall out of the shaft. A projected tube is brightest
    where the beam runs tangent to the endosteal surface, so each inner edge is the steepest
    fall (towards the medulla) after that brightness peak, both within `_MAX_CORTEX` of the
    half-width from the outer edge.
    """
    run = _shaft_run(p, centre, 0.12 * scale)
    if run is None:
        return None
    g = np.gradient(p)
    m = max(2, int(0.04 * scale))
    a0, a1 = max(run[0] - m, 1), min(run[0] + m, len(p) - 2)
    b0, b1 = max(run[1] - m, 1), min(run[1] + m, len(p) - 2)
    if a1 <= a0 or b1 <= b0:
        return None
    ol = a0 + int(np.argmax(g[a0:a1 + 1]))
    orr = b0 + int(np.argmin(g[b0:b1 + 1]))
    reach = int(_MAX_CORTEX * (orr - ol) / 2)
    if reach < 4:
        return None
    pl = ol + int(np.argmax(p[ol:ol + reach]))
    pr = orr - reach + 1 + int(np.argmax(p[orr - reach + 1:orr + 1]))
    if ol + reach - pl < 2 or pr - (orr - reach) < 2:
        return None
    il = pl + int(np.argmin(g[pl:ol + reach + 1]))
    ir = orr - reach + int(np.argmax(g[orr - reach:pr + 1]))
    return _subpixel(g, ol), _subpixel(g, il), _subpixel(g, ir), _subpixel(g, orr)


def _measure_shaft(image: np.ndarray, loc: JointLocation, sign: int) -> dict | None:
    """Radiogrammetry of the femoral (``sign`` -1) or tibial (+1) shaft, None if not seen."""
    h, w = image.shape
    kw = loc.width_px
    c0, c1 = max(0, int(loc.col - 0.6 * kw)), min(w, int(loc.col + 0.6 * kw))
    for level in _SHAFT_LEVELS:
        centre = loc.row + sign * level * kw
        r0, r1 = int(centre - 0.05 * kw), int(centre + 0.05 * kw) + 1
        if r0 < 0 or r1 > h or c1 - c0 < 16:
            continue
        # Smooth along the shaft more than across it: noise drops, the edges stay sharp.
        block = _smooth(_smooth(image[r0:r1, c0:c1], max(1.0, 0.01 * kw), axis=0), max(0.7, 0.003 * kw), axis=1)
        step = max(1, (r1 - r0) // 15)
        edges = [e for e in (_row_edges(block[i], int(loc.col) - c0, kw) for i in range(0, r1 - r0, step)) if e]
        if len(edges) < max(3, 0.5 * len(range(0, r1 - r0, step))):
            continue
        e = np.array(edges)
        outer, medullary = e[:, 3] - e[:, 0], e[:, 2] - e[:, 1]
        combined = outer - medullary
        cpx = float(np.median(combined))
        return {"row": float(centre), "outer_px": float(np.median(outer)), "medullary_px": float(np.median(medullary)),
                "combined_px": cpx, "combined_mm": cpx * loc.mm_per_px,
                "cortical_index": float(np.median(combined / outer)), "rows": len(edges),
                "spread_px": float(np.subtract(*np.percentile(combined, [75, 25])))}
    return None


def cortical_thickness(image: np.ndarray, loc: JointLocation) -> dict:
    """Femoral and tibial shaft radiogrammetry (Barnett-Nordin style, on a knee film).

    Horizontal intensity profiles cross each shaft about one knee width (`_SHAFT_LEVELS`) above
    and below the joint line; on each row the outer (periosteal) and inner (endosteal) cortical
    edges on both sides come from the profile's gradient. Medians over ~15 rows.

    Args:
        image: the HxW float image `loc` was found on (bone bright).
        loc: its `JointLocation` (``mm_per_px`` converts to mm).

    Returns:
        ``{"femur": m, "tibia": m, "cortical_index": mean of the two}`` where each ``m`` is None
        when that shaft is outside the image or not measurable, else a dict with ``row``,
        ``outer_px`` (shaft width D), ``medullary_px`` (d), ``combined_px`` and ``combined_mm``
        (combined cortical thickness D - d), ``cortical_index`` ((D - d) / D), ``rows`` used and
        ``spread_px`` (interquartile range of the per-row thickness).
    """
    image = np.asarray(image, np.float32)
    out = {"femur": _measure_shaft(image, loc, -1), "tibia": _measure_shaft(image, loc, +1)}
    ci = [m["cortical_index"] for m in out.values() if m]
    out["cortical_index"] = float(np.mean(ci)) if ci else None
    return out


# ---------------------------------------------------------------------------------------------
# quality control


def _draw_location(draw, loc: JointLocation, f: float, x0: int, y0: int, size_mm: float) -> None:
    """Joint line (red, one knee width long), centre (green) and ROI boxes on a thumbnail."""
    y, x, hw = y0 + loc.row * f, x0 + loc.col * f, loc.width_px * f / 2
    draw.line([(x - hw, y), (x + hw, y)], fill=(255, 40, 40), width=2)
    draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(40, 255, 40))
    colours = {"tibia": (0, 220, 255), "femur": (255, 220, 0)}
    for name, (top, left, h, w) in roi_boxes(loc, size_mm).items():
        draw.rectangle([x0 + left * f, y0 + top * f, x0 + (left + w) * f, y0 + (top + h) * f],
                       outline=colours.get(name, (255, 255, 255)))
    draw.text((x + hw + 2, y - 6), f"{loc.confidence:.2f}", fill=(255, 255, 0))


def qc_montage(images, locations, path: str, titles=None, thumb: int = 256, columns: int = 8,
               size_mm: float = 20.0) -> str:
    """Write a PNG grid of thumbnails with the joint line and ROI boxes drawn, to judge by eye.

    Args:
        images: HxW float images in [0, 1].
        locations: per image a `JointLocation`, a list of them (bilateral films) or None
            (not found: the tile gets a red frame).
        path: PNG file to write.
        titles: optional per-image captions (file names).
        thumb: thumbnail side in pixels; columns: thumbnails per row.
        size_mm: ROI side drawn, as in `regions_of_interest`.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    n = len(images)
    rows = max(1, -(-n // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * thumb))
    draw = ImageDraw.Draw(sheet)
    for i, (img, locs) in enumerate(zip(images, locations)):
        h, w = img.shape
        f = thumb / max(h, w)
        x0, y0 = (i % columns) * thumb, (i // columns) * thumb
        small = _to_uint8(_resize(img, (max(1, round(h * f)), max(1, round(w * f)))))
        sheet.paste(Image.fromarray(small).convert("RGB"), (x0, y0))
        locs = [locs] if isinstance(locs, JointLocation) else (locs or [])
        for loc in locs:
            _draw_location(draw, loc, f, x0, y0, size_mm)
        if not locs:
            draw.rectangle([x0 + 1, y0 + 1, x0 + thumb - 2, y0 + thumb - 2], outline=(255, 0, 0), width=3)
        caption = f"{i}" + (f" {titles[i]}" if titles else "")
        draw.text((x0 + 3, y0 + 2), caption, fill=(0, 255, 255))
    sheet.save(path)
    return path

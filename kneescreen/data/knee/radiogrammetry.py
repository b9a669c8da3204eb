"""Radiogrammetry on a knee film: femoral and tibial shaft cortical thickness.

`cortical_thickness` measures the combined cortical thickness and the cortical index
(Barnett-Nordin style) from horizontal intensity profiles across each shaft, about one knee
width above and below the joint line that `joint.locate_joint` found.
"""

from __future__ import annotations

import numpy as np

from kneescreen.data.knee._signal import smooth
from kneescreen.data.knee.joint import JointLocation

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
        block = smooth(smooth(image[r0:r1, c0:c1], max(1.0, 0.01 * kw), axis=0), max(0.7, 0.003 * kw), axis=1)
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

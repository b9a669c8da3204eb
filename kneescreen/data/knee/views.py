"""What a member sees at native resolution around a located joint (`joint.JointLocation`).

- `regions_of_interest`: proximal tibial metaphysis and distal femur, squares sized in mm, so
  every film with a pixel spacing gives the same mm per pixel.
- `tiles`: native-resolution tiles around the joint for a multiple-instance member.
- `view_inputs`: the ``roi_<s>`` / ``tiles_<s>`` member inputs of one radiograph
  (`kneescreen.data.preprocess.VIEWS`), the entry point of the decode batch function.
"""

from __future__ import annotations

import numpy as np

from kneescreen.data.knee._signal import resize, to_uint8
from kneescreen.data.knee.joint import JointLocation, locate_joint
from kneescreen.data.preprocess import ROI_MM, VIEW_INSTANCES, parse_input_key

# ROI centres in mm below the joint line (negative: above). The tibial ROI spans the proximal
# metaphysis under the subchondral plate (10-30 mm below the line for a 20 mm ROI); the
# femoral one sits above the condyles (40-60 mm above), in the supracondylar metaphysis.
ROI_CENTRES_MM = {"tibia": 20.0, "femur": -50.0}


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
            crop = resize(crop, (out_px, out_px))
        out[name] = to_uint8(crop)
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
    return np.stack([to_uint8(_crop(image, t, lft, tile_px, tile_px)) for t, lft in tile_boxes(loc, n, tile_px)])


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

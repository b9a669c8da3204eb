"""Quality control of joint placements by eye: a PNG montage of thumbnails with the joint line,
the knee's centre and the ROI boxes drawn (`bench/knee_qc.py` runs it on the dev radiographs)."""

from __future__ import annotations

from kneescreen.data.knee._signal import resize, to_uint8
from kneescreen.data.knee.joint import JointLocation
from kneescreen.data.knee.views import roi_boxes

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
        small = to_uint8(resize(img, (max(1, round(h * f)), max(1, round(w * f)))))
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

"""PNG and JPEG radiographs: 8-bit images as they are, 16-bit exports windowed like a viewer
would (they rarely use the full range), colour converted to luminance with a warning."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from kneescreen.errors import DecodeError
from kneescreen.fileio.frames import FrameFacts, StoredFrame
from kneescreen.fileio.plausibility import check_plausible
from kneescreen.fileio.radiograph import Radiograph, RadiographMeta, ReaderConfig, maybe_hash, robust_window

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def is_raster(data: bytes) -> bool:
    """Whether ``data`` starts like a PNG or JPEG file (anything else is read as DICOM)."""
    return data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)


def raster_stored(data: bytes, config: ReaderConfig) -> tuple[np.ndarray, RadiographMeta, list[str]]:
    """(stored values, meta, notes) of a PNG or JPEG (8 or 16 bit, EXIF orientation applied;
    colour becomes luminance): everything before the plausibility checks and the display scale."""
    fmt = "png" if data.startswith(PNG_MAGIC) else "jpeg"
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            im = Image.open(io.BytesIO(data))
            cols, rows = im.size
        except Exception as exc:  # noqa: BLE001
            raise DecodeError("truncated" if len(data) < 64 else "malformed", f"{fmt} header unreadable: {exc}") from None
        if rows * cols > config.max_pixels:
            raise DecodeError(
                "too_large",
                f"{rows}x{cols} = {rows * cols} pixels exceeds the limit of {config.max_pixels}",
            )
        try:
            im.load()
        except OSError as exc:
            code = "truncated" if "truncat" in str(exc).lower() else "decode_failed"
            raise DecodeError(code, f"{fmt} data could not be decoded: {exc}") from None
        im = ImageOps.exif_transpose(im)
    notes += [str(w.message) for w in caught]
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        stored = np.asarray(im)
        if mode == "I" and stored.max(initial=0) < 65536 and stored.min(initial=0) >= 0:
            stored = stored.astype(np.uint16)
    elif mode == "L":
        stored = np.asarray(im)
    else:
        notes.append(f"{fmt} in mode {mode} converted to luminance")
        stored = np.asarray(im.convert("L"))
    if stored.ndim != 2:
        raise DecodeError("unsupported_photometric", f"unexpected {fmt} pixel layout {stored.shape}")
    meta = RadiographMeta(
        format=fmt,
        rows=int(stored.shape[0]),
        cols=int(stored.shape[1]),
        photometric="MONOCHROME2",
        bits_stored=8 if stored.dtype == np.uint8 else 16,
    )
    return stored, meta, notes


def read_raster(data: bytes, config: ReaderConfig) -> Radiograph:
    """Decode a PNG or JPEG (8 or 16 bit, EXIF orientation applied) into a `Radiograph`."""
    stored, meta, notes = raster_stored(data, config)
    check_plausible(stored, config)
    if stored.dtype == np.uint8:
        image = (stored.astype(np.float32) / 255.0)
    else:
        # 16-bit exports rarely use the full range (12-bit detectors): window like a viewer would.
        image = robust_window(stored.astype(np.float32))
    return Radiograph(image=image, pixel_hash=maybe_hash(stored, config), meta=meta, warnings=notes)


def open_raster(data: bytes, config: ReaderConfig):
    """(Pillow image with only its header read, "png" | "jpeg"), refusing what `raster_stored`
    refuses before decoding (unreadable header, more than ``config.max_pixels``)."""
    fmt = "png" if data.startswith(PNG_MAGIC) else "jpeg"
    try:
        im = Image.open(io.BytesIO(data))
        cols, rows = im.size
    except Exception as exc:  # noqa: BLE001
        raise DecodeError("truncated" if len(data) < 64 else "malformed", f"{fmt} header unreadable: {exc}") from None
    if rows * cols > config.max_pixels:
        raise DecodeError(
            "too_large",
            f"{rows}x{cols} = {rows * cols} pixels exceeds the limit of {config.max_pixels}",
        )
    return im, fmt


def read_raster_stored(data: bytes, config: ReaderConfig) -> StoredFrame:
    """A PNG or JPEG -> `StoredFrame` for the device path: 8-bit values divided by 255, others
    through the percentile window, as `read_raster` does (plausibility left to the device)."""
    stored, meta, notes = raster_stored(data, config)
    facts = FrameFacts(rows=meta.rows, columns=meta.cols, bits_stored=meta.bits_stored or 16,
                       signed=stored.dtype.kind == "i", photometric="MONOCHROME2",
                       display_scale=255.0 if stored.dtype == np.uint8 else None)
    return StoredFrame(stored, facts, meta, notes)

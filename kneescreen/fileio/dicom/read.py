"""A whole DICOM object read: header -> checks -> pixels -> plausibility -> display.

Colour (RGB / YBR) objects become luminance with a warning; PALETTE COLOR is refused by the
header checks. `decode_stored` is the part before plausibility and display, shared with the
stored-pixel read for the device path (`kneescreen.fileio.dicom.stored`).
"""

from __future__ import annotations

import numpy as np

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.display import display
from kneescreen.fileio.dicom.header import COLOUR, check_image_header, parse_header
from kneescreen.fileio.dicom.meta import dicom_meta
from kneescreen.fileio.dicom.pixels import J2K_SYNTAXES, check_j2k_header, decode_pixels
from kneescreen.fileio.plausibility import check_plausible
from kneescreen.fileio.radiograph import Radiograph, RadiographMeta, ReaderConfig, maybe_hash


def decode_stored(data: bytes, config: ReaderConfig) -> tuple[object, RadiographMeta, list[str], np.ndarray]:
    """(data set, meta, notes, stored values of frame 0): parse, check the header, decode."""
    ds, notes = parse_header(data)
    meta = dicom_meta(ds)
    notes += check_image_header(ds, meta, config)
    if meta.transfer_syntax in J2K_SYNTAXES:
        check_j2k_header(ds, meta)
    return ds, meta, notes, decode_pixels(ds, meta.transfer_syntax)


def is_colour(stored: np.ndarray, photometric: str | None) -> bool:
    """Whether the decoded frame is a colour image that becomes luminance."""
    return stored.ndim == 3 and photometric in COLOUR


def luminance(stored: np.ndarray, ds) -> tuple[np.ndarray, int]:
    """(float64 luminance of a colour frame, bits stored): the CPU and device paths' one formula."""
    lum = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return lum, int(ds.get("BitsStored") or ds.BitsAllocated)


def read_dicom(data: bytes, config: ReaderConfig) -> Radiograph:
    """A whole DICOM object -> `Radiograph`: parse, check the header, decode, check, display."""
    ds, meta, notes, stored = decode_stored(data, config)
    photometric = meta.photometric
    if is_colour(stored, photometric):
        notes.append(f"{photometric} object converted to luminance")
        lum, bits = luminance(stored, ds)
        check_plausible(lum, config)
        image = np.clip(lum / (2**bits - 1), 0, 1).astype(np.float32)
        return Radiograph(image=image, pixel_hash=maybe_hash(stored, config), meta=meta, warnings=notes)
    if stored.ndim != 2:
        raise DecodeError("pixel_header_mismatch", f"decoded pixel array has shape {stored.shape}, expected 2-D")
    check_plausible(stored, config)
    image = display(stored, ds, photometric)
    return Radiograph(image=image, pixel_hash=maybe_hash(stored, config), meta=meta, warnings=notes)

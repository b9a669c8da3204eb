"""A whole DICOM object read: header -> checks -> pixels -> plausibility -> display.

Colour (RGB / YBR) objects become luminance with a warning; PALETTE COLOR is refused by the
header checks.
"""

from __future__ import annotations

import numpy as np

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.display import display
from kneescreen.fileio.dicom.header import COLOUR, check_image_header, parse_header
from kneescreen.fileio.dicom.meta import dicom_meta
from kneescreen.fileio.dicom.pixels import J2K_SYNTAXES, check_j2k_header, decode_pixels
from kneescreen.fileio.plausibility import check_plausible
from kneescreen.fileio.radiograph import Radiograph, ReaderConfig, maybe_hash


def read_dicom(data: bytes, config: ReaderConfig) -> Radiograph:
    """A whole DICOM object -> `Radiograph`: parse, check the header, decode, check, display."""
    ds, notes = parse_header(data)
    meta = dicom_meta(ds)
    notes += check_image_header(ds, meta, config)
    photometric = meta.photometric
    if meta.transfer_syntax in J2K_SYNTAXES:
        check_j2k_header(ds, meta)
    stored = decode_pixels(ds, meta.transfer_syntax)
    if stored.ndim == 3 and photometric in COLOUR:
        notes.append(f"{photometric} object converted to luminance")
        lum = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        check_plausible(lum, config)
        image = np.clip(lum / (2**bits - 1), 0, 1).astype(np.float32)
        return Radiograph(image=image, pixel_hash=maybe_hash(stored, config), meta=meta, warnings=notes)
    if stored.ndim != 2:
        raise DecodeError("pixel_header_mismatch", f"decoded pixel array has shape {stored.shape}, expected 2-D")
    check_plausible(stored, config)
    image = display(stored, ds, photometric)
    return Radiograph(image=image, pixel_hash=maybe_hash(stored, config), meta=meta, warnings=notes)

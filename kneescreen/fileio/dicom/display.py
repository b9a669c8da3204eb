"""The DICOM grayscale display pipeline (PS3.3 C.11 "Grayscale transformations"):

    stored values -> Modality LUT / rescale -> VOI LUT sequence or window centre/width
    (or a robust 0.5-99.5 percentile window when the header has neither) -> [0, 1]
    -> inverted for MONOCHROME1 or Presentation LUT Shape INVERSE.

The result is what a radiologist's viewer shows: float32 in [0, 1], bone bright.
"""

from __future__ import annotations

import numpy as np
from pydicom.pixels import apply_modality_lut, apply_voi

from kneescreen.fileio.dicom.meta import element_text
from kneescreen.fileio.radiograph import robust_window


def display(stored: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Stored grayscale values -> float32 [0, 1], bone bright (the pipeline above)."""
    voi_seq = ds.get("VOILUTSequence")
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    modality_out = apply_modality_lut(stored, ds)
    # float32 throughout: exact for stored values up to 2^24, and the model sees 8-bit input; a
    # full-resolution radiograph in float64 doubles the memory traffic of every step below.
    x = modality_out.astype(np.float32, copy=False)
    if voi_seq:
        # The VOI LUT indexes integer modality values; hand it integers, not floats.
        lut_in = modality_out if modality_out.dtype.kind in "iu" else np.rint(modality_out).astype(np.int64)
        out = apply_voi(lut_in, ds, index=0).astype(np.float32)
        bits = int(voi_seq[0].LUTDescriptor[2]) if "LUTDescriptor" in voi_seq[0] else 16
        image = np.clip(out / float(2**bits - 1), 0, 1)
    elif centre is not None and width is not None and _first(width) > 0:
        image = _window(x, _first(centre), _first(width), element_text(ds, "VOILUTFunction") or "LINEAR")
    else:
        image = robust_window(x)
    invert = photometric == "MONOCHROME1" or element_text(ds, "PresentationLUTShape") == "INVERSE"
    # MONOCHROME1 and Presentation LUT Shape INVERSE say the same thing for DX (PS3.3 C.8.11.6.1.2):
    # invert once when either is present, never twice.
    if invert:
        image = 1.0 - image
    return np.asarray(image, dtype=np.float32)


def _first(value) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window, output scaled to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        # Clipped exponent: float32 exp overflows past 88; the result is 0 or 1 either way.
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -80.0, 80.0)))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0, 1)
    if w < 1:
        w = 1.0
    if w == 1:
        return (x > c - 0.5).astype(np.float32)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)

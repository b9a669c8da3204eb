"""Refuse decoded pixels that cannot be a radiograph: blank images and decoder noise from a
corrupt codestream (`ReaderConfig.check_plausibility`)."""

from __future__ import annotations

import numpy as np

from kneescreen.errors import DecodeError
from kneescreen.fileio.radiograph import ReaderConfig

EMPTY = "decoded image has no pixels"
BLANK = "every pixel has the same value (blank image); check the export or the detector"
CROP_HALF = 256  # the texture check's central crop is up to 2 x CROP_HALF square


def noise_message(corr: float) -> str:
    """The ``implausible_pixels`` message of an image whose neighbouring pixels do not correlate."""
    return (f"decoded pixels look like noise (neighbour correlation {corr:.2f}); "
            "the compressed data is probably corrupt")


def check_plausible(x: np.ndarray, config: ReaderConfig) -> None:
    if not config.check_plausibility:
        return
    if x.size == 0:
        raise DecodeError("implausible_pixels", EMPTY)
    if float(np.ptp(x)) == 0.0:
        raise DecodeError("implausible_pixels", BLANK)
    rows, cols = x.shape
    if rows < 32 or cols < 32:
        return  # too small to judge texture
    # Lag-1 correlation on a central crop at native resolution: anatomy is smooth at the pixel
    # scale, decoder garbage from a corrupt codestream is not.
    r0, c0 = max(0, rows // 2 - CROP_HALF), max(0, cols // 2 - CROP_HALF)
    crop = x[r0 : r0 + 2 * CROP_HALF, c0 : c0 + 2 * CROP_HALF].astype(np.float64)
    a, b = crop[:, :-1].ravel(), crop[:, 1:].ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return  # flat centre, e.g. collimated region: not evidence of noise
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))
    if corr < config.min_neighbour_correlation:
        raise DecodeError("implausible_pixels", noise_message(corr))

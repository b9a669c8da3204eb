"""The seam between reading a radiograph and decoding its pixels elsewhere (issue #22).

A screening decode task may stop short of decoding: it parses the header and hands on either the
raw stored pixels (uncompressed DICOM) or one compressed frame (`EncodedFrame`) together with the
facts needed to turn it into an image (`FrameFacts`). The inference actor then decodes the frame
with a `FrameDecoder` (nvImageCodec on a GPU, the CPU decoders otherwise) and windows, inverts and
resizes on its own device. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from kneescreen.fileio.radiograph import RadiographMeta

# Compressed payloads a device decoder may take. JPEG-LS, RLE and 12-bit JPEG (extended) stay on
# the CPU decoders: no GPU codec decodes them.
DEVICE_CODECS = ("jpeg2000", "htj2k", "jpeg", "jpeg-lossless", "png")

# The error code of a row whose frame neither the device decoder nor the CPU fallback could decode.
FRAME_DECODE_FAILED = "frame_decode_failed"


@dataclasses.dataclass(frozen=True)
class FrameFacts:
    """What turns stored pixel values into a display image, as read from the header.

    The display transform it describes is the CPU reader's (`kneescreen.fileio.dicom.display`):
    rescale (float64, then float32), then the first of: ``display_scale`` (pixels already through
    a LUT or colour conversion on the CPU: divide and clip), a window (``window_center`` /
    ``window_width`` with ``voi_function`` LINEAR, LINEAR_EXACT or SIGMOID), else the 0.5-99.5
    percentile window; then inversion when `inverted`. ``checked``: the decode task already ran
    the plausibility checks (pixels it transformed itself), so the device must not repeat them on
    values that are no longer the stored ones.
    """

    rows: int
    columns: int
    bits_stored: int
    signed: bool
    photometric: str  # "MONOCHROME1" | "MONOCHROME2" | "RGB" ...
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    voi_function: str = "LINEAR"
    presentation_inverse: bool = False
    display_scale: float | None = None
    checked: bool = False

    @property
    def inverted(self) -> bool:
        """MONOCHROME1 or Presentation LUT Shape INVERSE: invert once (PS3.3 C.8.11.6.1.2)."""
        return self.photometric == "MONOCHROME1" or self.presentation_inverse


@dataclasses.dataclass
class StoredFrame:
    """A read that stopped before the display transform: the frame's pixel values as the device
    path takes them (2-D; stored values, or LUT / colour output when ``facts.display_scale`` is
    set), what turns them into an image, and the header metadata."""

    pixels: np.ndarray
    facts: FrameFacts
    meta: RadiographMeta
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class EncodedFrame:
    """One compressed frame: a DICOM frame's codestream or a whole PNG / JPEG file."""

    data: bytes
    codec: str  # one of DEVICE_CODECS
    facts: FrameFacts
    # DICOM frames: the transfer syntax UID and Bits Allocated of the object, so the CPU decoder
    # decodes the frame exactly as the reader decodes the whole object (same pydicom decoder and
    # options); empty / 0 for whole PNG / JPEG files.
    transfer_syntax: str = ""
    bits_allocated: int = 0


class FrameDecoder(Protocol):
    """Decodes a batch of frames; one result per frame, in order.

    A result is the stored pixel values as a 2-D array (NumPy, or a tensor on the decoder's
    device) or the exception that frame raised: one bad frame never fails the batch.
    """

    name: str

    def decode(self, frames: Sequence[EncodedFrame]) -> list[np.ndarray | object | Exception]:
        ...

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

# Compressed payloads a device decoder may take. JPEG-LS, RLE and 12-bit JPEG (extended) stay on
# the CPU decoders: no GPU codec decodes them.
DEVICE_CODECS = ("jpeg2000", "htj2k", "jpeg", "jpeg-lossless", "png")

# The error code of a row whose frame neither the device decoder nor the CPU fallback could decode.
FRAME_DECODE_FAILED = "frame_decode_failed"


@dataclasses.dataclass(frozen=True)
class FrameFacts:
    """What turns stored pixel values into a display image, as read from the header."""

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

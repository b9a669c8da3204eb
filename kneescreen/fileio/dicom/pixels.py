"""DICOM pixel data -> stored values, with the decoders pinned.

Compressed DICOM is decoded with the pylibjpeg plugin stack only (`DICOM_DECODING_PLUGIN`),
never a silent fallback to Pillow or another decoder: they give different pixels for lossy data.
A JPEG 2000 codestream whose size or sign disagrees with the header is refused before decoding.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID

from kneescreen.errors import DecodeError
from kneescreen.fileio.radiograph import RadiographMeta

DICOM_DECODING_PLUGIN = "pylibjpeg"


def decode_pixels(ds, tsyntax: str | None) -> np.ndarray:
    """Frame 0 of the stored pixel values, decoded by the native decoder or the pinned plugin.

    Raises:
        DecodeError: ``unsupported_transfer_syntax``, ``truncated``, ``pixel_header_mismatch``
            or ``decode_failed``.
    """
    uid = UID(tsyntax) if tsyntax else None
    if uid is None:
        raise DecodeError("pixel_header_mismatch", "transfer syntax unknown (no file meta and not guessable)")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        decoder = None
    if decoder is None:
        raise DecodeError("unsupported_transfer_syntax", f"no decoder for transfer syntax {uid.name} ({uid})")
    plugin = ""
    if not decoder.is_native:
        if DICOM_DECODING_PLUGIN not in decoder.available_plugins:
            raise DecodeError(
                "unsupported_transfer_syntax",
                f"{uid.name} needs the {DICOM_DECODING_PLUGIN} decoder, which is not installed or "
                "cannot decode it",
            )
        plugin = DICOM_DECODING_PLUGIN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arr = pixel_array(ds, index=0, decoding_plugin=plugin)
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError, OSError, EOFError) as exc:
            msg = str(exc)
            low = msg.lower()
            if any(s in low for s in ("shorter than", "less than", "truncat", "insufficient", "end of", "not enough")):
                raise DecodeError("truncated", f"pixel data is incomplete: {msg}"[:500]) from None
            if any(s in low for s in ("does not match", "doesn't match", "mismatch", "inconsistent")):
                raise DecodeError("pixel_header_mismatch", msg[:500]) from None
            raise DecodeError("decode_failed", f"{uid.name}: {msg}"[:500]) from None
    for w in caught:
        low = str(w.message).lower()
        # These mean the header and the codestream disagree: the pixels cannot be trusted.
        if any(s in low for s in ("does not match", "doesn't match", "mismatch", "sign correction")):
            raise DecodeError("pixel_header_mismatch", str(w.message)[:500])
        if any(s in low for s in ("shorter than", "truncat", "less than the expected", "missing")):
            raise DecodeError("truncated", str(w.message)[:500])
    return arr


J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}


def check_j2k_header(ds, meta: RadiographMeta) -> None:
    """Compare the J2K codestream's SIZ marker with the DICOM header.

    Decoders differ in what they do when Pixel Representation and the codestream's sign bit
    disagree (pydicom can silently "correct" the sign), so the mismatch is refused here instead.
    SIZ layout: ITU-T T.800 A.5.1.
    """
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=meta.frames))
    except StopIteration:
        raise DecodeError("truncated", "encapsulated pixel data holds no frame") from None
    pos = bytes(frame[:4096]).find(b"\xff\x4f\xff\x51")
    if pos < 0:
        raise DecodeError("decode_failed", "JPEG 2000 codestream has no SIZ marker")
    siz = bytes(frame[pos + 4 : pos + 4 + 40])
    if len(siz) < 39:
        raise DecodeError("truncated", "JPEG 2000 codestream ends inside its SIZ marker")
    # Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) XTsiz YTsiz XTOsiz YTOsiz Csiz(2) Ssiz(1)...
    width = int.from_bytes(siz[4:8], "big") - int.from_bytes(siz[12:16], "big")
    height = int.from_bytes(siz[8:12], "big") - int.from_bytes(siz[16:20], "big")
    ssiz = siz[38]
    signed, precision = bool(ssiz & 0x80), (ssiz & 0x7F) + 1
    header_signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (width, height) != (meta.cols, meta.rows):
        raise DecodeError(
            "pixel_header_mismatch",
            f"JPEG 2000 codestream is {width}x{height} but the header says {meta.cols}x{meta.rows}",
        )
    if signed != header_signed:
        raise DecodeError(
            "pixel_header_mismatch",
            f"Pixel Representation says {'signed' if header_signed else 'unsigned'} but the JPEG 2000 "
            f"codestream is {'signed' if signed else 'unsigned'}: pixel values would be ambiguous; "
            "re-export the image from the modality or PACS",
        )
    if precision > int(ds.get("BitsAllocated") or 16):
        raise DecodeError(
            "pixel_header_mismatch",
            f"JPEG 2000 precision {precision} bits exceeds Bits Allocated {ds.get('BitsAllocated')}",
        )

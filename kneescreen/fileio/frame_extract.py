"""A radiograph's pixels, stopped short of decoding where a device can decode them (issue #22).

`extract_frame(data)` parses a DICOM header (or a PNG / JPEG file's) with the same checks as
`read_radiograph`, then hands back the `FrameFacts` and either

- one `EncodedFrame`: frame 0's codestream of a grayscale DICOM whose transfer syntax a device
  decoder takes (`DICOM_CODECS`: JPEG 2000 and HTJ2K, baseline JPEG, JPEG lossless), or a whole
  8/16-bit grayscale PNG or 8-bit grayscale JPEG file; or
- the stored pixel values, decoded here by the reader's pinned CPU decoders: uncompressed DICOM,
  JPEG-LS, RLE, 12-bit (extended) JPEG, colour objects, and any file a device decoder would not
  decode to the reader's pixels (palette / colour / low-bit PNG, colour JPEG, files with EXIF).

Plausibility (blank image, decoder noise) is not checked here: it needs decoded pixels, so
whoever decodes checks them. Errors are `DecodeError` with the reader's codes.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from pydicom.encaps import get_frame

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.header import GRAY, check_image_header, parse_header
from kneescreen.fileio.dicom.meta import dicom_meta
from kneescreen.fileio.dicom.pixels import J2K_SYNTAXES, check_j2k_header, decode_pixels
from kneescreen.fileio.frames import DEVICE_CODECS, EncodedFrame, FrameFacts
from kneescreen.fileio.radiograph import RadiographMeta, ReaderConfig
from kneescreen.fileio.raster import PNG_MAGIC, is_raster, open_raster, raster_stored

# Transfer syntax -> codec of `DEVICE_CODECS`. Absent, on purpose: JPEG extended (4.51, 12-bit),
# JPEG-LS (4.80/4.81), RLE (1.2.5): no GPU codec decodes them; native syntaxes need no decoding.
DICOM_CODECS = {
    "1.2.840.10008.1.2.4.50": "jpeg",  # JPEG baseline (process 1), 8-bit
    "1.2.840.10008.1.2.4.57": "jpeg-lossless",  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70": "jpeg-lossless",  # JPEG lossless, process 14 selection value 1
    "1.2.840.10008.1.2.4.90": "jpeg2000",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "jpeg2000",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "htj2k",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "htj2k",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "htj2k",  # HTJ2K
}


@dataclasses.dataclass
class ExtractedFrame:
    """What `extract_frame` found: exactly one of ``encoded`` and ``stored`` is set."""

    facts: FrameFacts
    meta: RadiographMeta
    encoded: EncodedFrame | None = None
    stored: np.ndarray | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


def extract_frame(data: bytes, config: ReaderConfig = ReaderConfig(), *,
                  codecs: tuple[str, ...] = DEVICE_CODECS) -> ExtractedFrame:
    """Header facts and either one encoded frame (codec in ``codecs``) or the stored pixels.

    Args:
        data: the whole file or object.
        config: the reader's limits and policies (max pixels, multi-frame policy).
        codecs: codecs to hand on encoded; ``()`` decodes everything here (the stored pixels).

    Raises:
        DecodeError: the reader's codes for a bad file.
    """
    try:
        data = bytes(data)
        if not data:
            raise DecodeError("truncated", "file is empty (0 bytes)")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if is_raster(data):
                return _extract_raster(data, config, codecs)
            return _extract_dicom(data, config, codecs)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("too_large", f"ran out of memory decoding the image: {exc}") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - as read_radiograph: a typed error row, never a crash
        raise DecodeError("decode_failed", f"{type(exc).__name__}: {exc}"[:500]) from None


def dicom_facts(ds, meta: RadiographMeta) -> FrameFacts:
    """The display facts of a DICOM header (first window when several are given)."""
    def first(name: str) -> float | None:
        value = ds.get(name)
        if value is None or value == "":
            return None
        try:
            return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
        except (TypeError, ValueError, IndexError):
            return None

    slope, intercept = first("RescaleSlope"), first("RescaleIntercept")
    return FrameFacts(
        rows=meta.rows, columns=meta.cols, bits_stored=int(meta.bits_stored or ds.get("BitsAllocated") or 16),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1, photometric=meta.photometric or "",
        rescale_slope=1.0 if slope is None else slope, rescale_intercept=0.0 if intercept is None else intercept,
        window_center=first("WindowCenter"), window_width=first("WindowWidth"), pixel_spacing=meta.pixel_spacing,
    )


def first_frame(ds, meta: RadiographMeta) -> bytes:
    """Frame 0's codestream of encapsulated Pixel Data, found as pydicom's decoders find it."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return bytes(get_frame(ds.PixelData, 0, number_of_frames=meta.frames, extended_offsets=offsets))
    except (ValueError, IndexError, EOFError, KeyError) as exc:
        raise DecodeError("truncated", f"encapsulated pixel data holds no readable frame: {exc}"[:500]) from None


def _extract_dicom(data: bytes, config: ReaderConfig, codecs: tuple[str, ...]) -> ExtractedFrame:
    ds, notes = parse_header(data)
    meta = dicom_meta(ds)
    notes += check_image_header(ds, meta, config)
    tsyntax = meta.transfer_syntax
    if tsyntax in J2K_SYNTAXES:
        check_j2k_header(ds, meta)  # size / sign mismatches are refused whoever decodes
    facts = dicom_facts(ds, meta)
    codec = DICOM_CODECS.get(tsyntax or "")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if codec in codecs and meta.photometric in GRAY and samples == 1:
        frame = EncodedFrame(data=first_frame(ds, meta), codec=codec, facts=facts, transfer_syntax=tsyntax,
                             bits_allocated=int(ds.BitsAllocated))
        return ExtractedFrame(facts=facts, meta=meta, encoded=frame, warnings=notes)
    return ExtractedFrame(facts=facts, meta=meta, stored=decode_pixels(ds, tsyntax), warnings=notes)


def _extract_raster(data: bytes, config: ReaderConfig, codecs: tuple[str, ...]) -> ExtractedFrame:
    im, fmt = open_raster(data, config)
    bits = _device_raster_bits(data, im, fmt)
    if bits and fmt in codecs:
        cols, rows = im.size
        facts = FrameFacts(rows=rows, columns=cols, bits_stored=bits, signed=False, photometric="MONOCHROME2")
        meta = RadiographMeta(format=fmt, rows=rows, cols=cols, photometric="MONOCHROME2", bits_stored=bits)
        return ExtractedFrame(facts=facts, meta=meta, encoded=EncodedFrame(data=data, codec=fmt, facts=facts))
    stored, meta, notes = raster_stored(data, config)
    facts = FrameFacts(rows=meta.rows, columns=meta.cols, bits_stored=meta.bits_stored or 16, signed=False,
                       photometric="MONOCHROME2")
    return ExtractedFrame(facts=facts, meta=meta, stored=stored, warnings=notes)


def _device_raster_bits(data: bytes, im, fmt: str) -> int:
    """8 or 16 where a device decoder gives the reader's pixels for this file, else 0.

    Only single-channel files whose stored values are the file's samples: grayscale PNG of 8 or
    16 bits (IHDR colour type 0; palette, alpha and 1/2/4-bit PNGs are converted by Pillow) and
    8-bit grayscale JPEG, without EXIF (whose orientation the CPU path applies with Pillow).
    """
    if "exif" in im.info or "transparency" in im.info:
        return 0
    if fmt == "png":
        if not data.startswith(PNG_MAGIC) or len(data) < 26 or data[12:16] != b"IHDR":
            return 0
        depth, colour_type = data[24], data[25]
        return int(depth) if colour_type == 0 and depth in (8, 16) else 0
    return 8 if im.mode == "L" else 0

"""A radiograph's pixels, stopped short of decoding where a device can decode them (issue #22).

`extract_frame(data)` is `kneescreen.fileio.reader.read_stored` (same checks, errors and
`FrameFacts`) except that its `StoredFrame.pixels` is one `EncodedFrame`, left compressed for
the inference actor's decoder, where a device decoder takes the codec:

- frame 0's codestream of a grayscale DICOM whose transfer syntax maps to `DICOM_CODECS`
  (JPEG 2000 and HTJ2K, baseline JPEG, JPEG lossless), unless a Modality or VOI LUT sequence
  must be applied first (pydicom does that on the CPU);
- a whole 8/16-bit grayscale PNG or 8-bit grayscale JPEG file without EXIF.

Everything else (uncompressed DICOM, JPEG-LS, RLE, 12-bit extended JPEG, colour, palette or
low-bit PNG) is decoded here by the reader's pinned CPU decoders, as `read_stored` does.
Plausibility (blank image, decoder noise) needs decoded pixels: whoever decodes checks it.
"""

from __future__ import annotations

from pydicom.encaps import get_frame

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.header import GRAY, check_image_header, parse_header
from kneescreen.fileio.dicom.meta import dicom_meta
from kneescreen.fileio.dicom.pixels import J2K_SYNTAXES, check_j2k_header, decode_pixels
from kneescreen.fileio.dicom.stored import encoded_facts, stored_frame
from kneescreen.fileio.frames import DEVICE_CODECS, EncodedFrame, FrameFacts, StoredFrame
from kneescreen.fileio.radiograph import RadiographMeta, ReaderConfig
from kneescreen.fileio.raster import PNG_MAGIC, open_raster, read_raster_stored
from kneescreen.fileio.reader import _guarded

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


def extract_frame(data: bytes, config: ReaderConfig = ReaderConfig(), *,
                  codecs: tuple[str, ...] = DEVICE_CODECS) -> StoredFrame:
    """`read_stored`, with frames of a codec in ``codecs`` left compressed.

    Args:
        data: the whole file or object.
        config: the reader's limits and policies (max pixels, multi-frame policy).
        codecs: codecs to hand on encoded; ``()`` is `read_stored` (the stored pixels).

    Returns:
        A `StoredFrame` whose ``pixels`` is an `EncodedFrame` or the 2-D stored values.

    Raises:
        DecodeError: the reader's codes for a bad file.
    """
    return _guarded(data, config, lambda d, c: _extract_raster(d, c, codecs), lambda d, c: _extract_dicom(d, c, codecs))


def first_frame(ds, meta: RadiographMeta) -> bytes:
    """Frame 0's codestream of encapsulated Pixel Data, found as pydicom's decoders find it."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return bytes(get_frame(ds.PixelData, 0, number_of_frames=meta.frames, extended_offsets=offsets))
    except (ValueError, IndexError, EOFError, KeyError) as exc:
        raise DecodeError("truncated", f"encapsulated pixel data holds no readable frame: {exc}"[:500]) from None


def _extract_dicom(data: bytes, config: ReaderConfig, codecs: tuple[str, ...]) -> StoredFrame:
    ds, notes = parse_header(data)
    meta = dicom_meta(ds)
    notes += check_image_header(ds, meta, config)
    tsyntax = meta.transfer_syntax
    if tsyntax in J2K_SYNTAXES:
        check_j2k_header(ds, meta)  # size / sign mismatches are refused whoever decodes
    codec = DICOM_CODECS.get(tsyntax or "")
    if codec in codecs and meta.photometric in GRAY and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        facts = encoded_facts(ds, meta)
        if facts is not None:
            frame = EncodedFrame(data=first_frame(ds, meta), codec=codec, facts=facts, transfer_syntax=tsyntax,
                                 bits_allocated=int(ds.BitsAllocated))
            return StoredFrame(frame, facts, meta, notes)
    return stored_frame(ds, meta, notes, decode_pixels(ds, tsyntax), config)


def _extract_raster(data: bytes, config: ReaderConfig, codecs: tuple[str, ...]) -> StoredFrame:
    im, fmt = open_raster(data, config)
    bits = _device_raster_bits(data, im, fmt)
    if not (bits and fmt in codecs):
        return read_raster_stored(data, config)
    cols, rows = im.size
    # As `read_raster_stored`: 8-bit values are divided by 255, 16-bit ones windowed.
    facts = FrameFacts(rows=rows, columns=cols, bits_stored=bits, signed=False, photometric="MONOCHROME2",
                       display_scale=255.0 if bits == 8 else None)
    meta = RadiographMeta(format=fmt, rows=rows, cols=cols, photometric="MONOCHROME2", bits_stored=bits)
    return StoredFrame(EncodedFrame(data=data, codec=fmt, facts=facts), facts, meta, [])


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

"""A DICOM header, parsed and checked before any pixel is decoded.

- `parse_header`: the data set of a whole object, or ``not_dicom`` / ``truncated`` / ``malformed``.
- `read_dicom_header`: header triage from an object's first bytes (ranged reads), deciding only
  where the whole object would be read the same way.
- `check_image_header`: refuse objects without a usable grayscale image (no pixel data,
  unsupported photometric, missing sizes, too many pixels, multi-frame under ``"reject"``).
  Multi-frame objects: ``multiframe="first"`` (default) decodes frame 0 only and notes it in
  the radiograph's ``warnings``; ``"reject"`` raises ``multiframe``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.uid import UID

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.meta import dicom_meta, element_text
from kneescreen.fileio.radiograph import RadiographMeta, ReaderConfig
from kneescreen.fileio.raster import is_raster

GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


@dataclass(frozen=True)
class DicomHeader:
    """What the first bytes of an object tell (`read_dicom_header`)."""

    meta: RadiographMeta | None = None  # set when the header alone is complete and checked
    needs_more: bool = False  # a DICOM header that continues past the bytes given


def _looks_like_dicom(ds) -> bool:
    # force=True parses almost any bytes into *something*; real DICOM has a few core elements.
    keys = {int(t) for t in ds.keys()}
    core = {0x00080016, 0x00080018, 0x00280010, 0x00280011, 0x7FE00010, 0x00080060}
    return len(keys & core) >= 2


def _parse(data: bytes, stop_when=None):
    """pydicom's parse of ``data`` with every element touched, so lazy parse errors surface here
    (not later); (data set, header warnings, offset where parsing stopped). Exceptions propagate."""
    fp = io.BytesIO(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read_partial(fp, stop_when, force=True)
        for _ in ds.iterall():
            pass
    return ds, [str(w.message) for w in caught], fp.tell()


def parse_header(data: bytes):
    """(data set, header warnings) or DecodeError: not_dicom / truncated / malformed."""
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds, header_notes, _ = _parse(data)
    except (InvalidDicomError, EOFError) as exc:
        if not has_preamble:
            raise DecodeError("not_dicom", "not a DICOM, PNG or JPEG file") from None
        raise DecodeError("truncated", f"DICOM header ends early: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        if not has_preamble:
            raise DecodeError("not_dicom", "not a DICOM, PNG or JPEG file") from None
        raise DecodeError("malformed", f"DICOM header could not be parsed: {exc}"[:500]) from None
    if not has_preamble and not _looks_like_dicom(ds):
        raise DecodeError("not_dicom", "not a DICOM, PNG or JPEG file")
    ended_early = [n for n in header_notes if "end of file" in n.lower() or "truncat" in n.lower()]
    if ended_early or len(ds) == 0:
        raise DecodeError(
            "truncated",
            "DICOM file ends before its data set does (incomplete transfer or copy)"
            + (f": {ended_early[0][:200]}" if ended_early else ""),
        )
    return ds, header_notes


_PIXEL_DATA = 0x7FE00010


def read_dicom_header(head: bytes, config: ReaderConfig = ReaderConfig(), size: int | None = None) -> DicomHeader:
    """Header facts from the first bytes of an object, without its pixel data (header triage).

    Decides only where the whole object would be read the same way: ``meta`` is set when
    ``head`` holds a DICOM data set complete up to its (7FE0,0010) Pixel Data element and the
    header passes every check `read_radiograph` makes before decoding pixels. Anything else
    (not DICOM, a header it cannot parse, float pixel data, a failed check) leaves the verdict
    to `read_radiograph` on the whole object, so every error code stays what it is.

    Args:
        head: the object's first bytes (any length).
        config: limits and policies, as for `read_radiograph`.
        size: the whole object's size, when known: an object too short for the pixel data its
            header announces is left to the whole read (which reports ``truncated``).

    Returns:
        ``DicomHeader(meta=...)``, ``DicomHeader(needs_more=True)`` when ``head`` ends inside a
        DICOM header (read more bytes and ask again), or ``DicomHeader()``: read the whole object.
    """
    head = bytes(head)
    if is_raster(head) or len(head) < 8:
        return DicomHeader()
    stopped_at: list[tuple[int, str | None, int]] = []

    def at_pixels(tag, vr, length) -> bool:  # pydicom's stop_before_pixels test, remembering where
        if tag >> 16 == 0x7FE0 and (tag & 0xFFFF) in (0x0008, 0x0009, 0x0010):
            stopped_at.append((int(tag), vr, length))
            return True
        return False

    has_preamble = head[128:132] == b"DICM"
    try:
        ds, _, offset = _parse(head, at_pixels)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException:  # noqa: BLE001 - e.g. EOFError where the bytes end inside a sequence;
        # more bytes may parse, and if they never do the whole object's read reports the error.
        return DicomHeader(needs_more=has_preamble)
    if not (has_preamble or _looks_like_dicom(ds)):
        return DicomHeader()
    if not stopped_at:  # the bytes ran out first (or the object has no pixel data)
        return DicomHeader(needs_more=True)
    tag, vr, length = stopped_at[-1]
    if tag != _PIXEL_DATA or len(ds) == 0:
        return DicomHeader()
    # Native pixel data has a defined length: (tag, length) is 8 bytes implicit VR, 12 explicit.
    if size is not None and length != 0xFFFFFFFF and offset + (8 if vr is None else 12) + length > size:
        return DicomHeader()
    try:
        meta = dicom_meta(ds)
        _check_image_attributes(ds, meta, config)
    except Exception:  # noqa: BLE001 - DecodeError and odd values alike: decided on the whole object
        return DicomHeader()
    return DicomHeader(meta=meta)


def check_image_header(ds, meta: RadiographMeta, config: ReaderConfig) -> list[str]:
    """Refuse objects without a usable grayscale image before decoding any pixels.

    Returns:
        Notes for the radiograph's warnings (multi-frame).
    """
    if "PixelData" not in ds:
        kind = "FloatPixelData" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else None
        what = f"{kind} (float images are not radiographs)" if kind else "no Pixel Data element"
        sop = element_text(ds, "SOPClassUID")
        raise DecodeError(
            "no_pixel_data",
            f"DICOM object has {what}" + (f"; SOP class {UID(sop).name}" if sop else ""),
        )
    return _check_image_attributes(ds, meta, config)


def _check_image_attributes(ds, meta: RadiographMeta, config: ReaderConfig) -> list[str]:
    """The checks of `check_image_header` that need the header only, not the Pixel Data element."""
    photometric = meta.photometric
    if photometric is None:
        raise DecodeError("pixel_header_mismatch", "Photometric Interpretation (0028,0004) is missing")
    if photometric not in GRAY and photometric not in COLOUR:
        raise DecodeError(
            "unsupported_photometric",
            f"photometric interpretation {photometric} is not a grayscale radiograph",
        )
    for tag in ("Rows", "Columns", "BitsAllocated"):
        if not ds.get(tag):
            raise DecodeError("pixel_header_mismatch", f"{tag} is missing or zero")
    if meta.rows * meta.cols > config.max_pixels:
        raise DecodeError(
            "too_large",
            f"{meta.rows}x{meta.cols} = {meta.rows * meta.cols} pixels exceeds the limit of "
            f"{config.max_pixels}",
        )
    if meta.frames > 1:
        if config.multiframe == "reject":
            raise DecodeError("multiframe", f"multi-frame object ({meta.frames} frames) refused by policy")
        return [f"multi-frame object: decoded frame 1 of {meta.frames}"]
    return []

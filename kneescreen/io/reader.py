"""Read any knee radiograph an archive holds (DICOM, PNG, JPEG) from bytes.

`read_radiograph(data)` is the one entry point; local files and S3 objects both arrive as bytes.
It returns a `Radiograph`: a float32 image in [0, 1] with bone bright (the way a radiologist's
viewer shows it), the decoded stored-pixel hash, and header metadata. Any problem with the input
raises `DecodeError` with a stable ``error_code``; no other exception escapes (a property test
feeds it random and mutated bytes).

Display pipeline for DICOM (PS3.3 C.11 "Grayscale transformations"):
    stored values -> Modality LUT / rescale -> VOI LUT sequence or window centre/width
    (or a robust 0.5-99.5 percentile window when the header has neither) -> [0, 1]
    -> inverted for MONOCHROME1 or Presentation LUT Shape INVERSE.

Policies (documented in docs/architecture.md):
- Multi-frame objects: ``multiframe="first"`` (default) decodes frame 0 only and notes it in
  ``warnings``; ``"reject"`` raises ``multiframe``.
- Decoders are pinned: compressed DICOM is decoded with the pylibjpeg plugin stack only, never a
  silent fallback to Pillow or another decoder (they give different pixels for lossy data).
- Colour (RGB / YBR) objects become luminance with a warning; PALETTE COLOR is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kneescreen.errors import DecodeError

_logger = logging.getLogger(__name__)

DICOM_DECODING_PLUGIN = "pylibjpeg"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


@dataclass(frozen=True)
class ReaderConfig:
    """How strict the reader is.

    Attributes:
        max_pixels: rows x columns above which an image is refused before decoding. A 43x43 cm
            detector at 0.1 mm is ~18.5 Mpx; 64 Mpx leaves room while stopping decompression bombs.
        multiframe: ``"first"`` decodes frame 0 of a multi-frame object, ``"reject"`` refuses it.
        check_plausibility: refuse uniform images and decoder noise.
        min_neighbour_correlation: below this lag-1 pixel correlation an image is treated as
            noise. Radiographs sit above 0.9; white noise near 0.
        hash_pixels: compute ``Radiograph.pixel_hash`` (duplicate audits need it; screening
            does not, and on a full-resolution radiograph it costs as much as a fast decode).
    """

    max_pixels: int = 64_000_000
    multiframe: str = "first"
    check_plausibility: bool = True
    min_neighbour_correlation: float = 0.3
    hash_pixels: bool = True


@dataclass
class RadiographMeta:
    """Header facts. ``patient_id`` and ``birth_date`` are raw identifiers: keep them in memory,
    pseudonymise before anything is written (see `kneescreen.io.privacy`)."""

    format: str = ""
    rows: int = 0
    cols: int = 0
    photometric: str | None = None
    transfer_syntax: str | None = None
    bits_stored: int | None = None
    frames: int = 1
    modality: str | None = None
    body_part: str | None = None
    laterality: str | None = None
    view_position: str | None = None
    manufacturer: str | None = None
    institution: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    sex: str | None = None
    age: float | None = None
    study_date: str | None = None
    # SeriesDate, else AcquisitionDate, else ContentDate: the film's date where StudyDate is empty
    # (some modality worklists leave it blank); `kneescreen link` falls back to it.
    other_date: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_id: str | None = field(default=None, repr=False)

    def public_dict(self) -> dict:
        """All fields except raw identifiers, for logs and JSON."""
        d = asdict(self)
        d.pop("patient_id", None)
        return d


@dataclass
class Radiograph:
    image: np.ndarray  # float32, HxW, [0, 1], bone bright
    pixel_hash: str | None  # None when ReaderConfig.hash_pixels is off
    meta: RadiographMeta
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DicomHeader:
    """What the first bytes of an object tell (`read_dicom_header`)."""

    meta: RadiographMeta | None = None  # set when the header alone is complete and checked
    needs_more: bool = False  # a DICOM header that continues past the bytes given


def read_radiograph(data: bytes, config: ReaderConfig = ReaderConfig()) -> Radiograph:
    """Decode one radiograph from bytes.

    Args:
        data: the whole file or object.
        config: limits and policies.

    Returns:
        The display-ready image, its pixel hash and metadata.

    Raises:
        DecodeError: for every kind of bad input; ``error_code`` says which.
    """
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError("not_dicom", f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) == 0:
            raise DecodeError("truncated", "file is empty (0 bytes)")
        # Header and decoder warnings are collected per call (inner blocks turn the ones that
        # mean "broken data" into errors); none leak to the process's warning filters.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
                return _read_raster(data, config)
            return _read_dicom(data, config)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("too_large", f"ran out of memory decoding the image: {exc}") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - decoder failures (incl. Rust panics, which are
        # BaseException in pyo3) become a typed error row, never a crashed batch
        raise DecodeError("decode_failed", f"{type(exc).__name__}: {exc}"[:500]) from None


# ---------------------------------------------------------------------------------------------
# shared helpers


def pixel_hash(stored: np.ndarray) -> str:
    """sha256 of stored pixel values in a canonical form (shape + int32/float32 little endian).

    Canonical so a lossless re-encoding (RLE, JPEG-LS, J2K lossless, PNG) of the same stored
    values hashes the same, whatever dtype or byte order the decoder hands back.
    """
    arr = np.ascontiguousarray(stored)
    if arr.dtype.kind in "iub":
        canon = arr.astype("<i4", copy=False)
    else:
        canon = arr.astype("<f4", copy=False)
    h = hashlib.sha256()
    h.update(("x".join(map(str, canon.shape)) + ":").encode())
    h.update(canon.tobytes())
    return h.hexdigest()


def _maybe_hash(stored: np.ndarray, config: ReaderConfig) -> str | None:
    return pixel_hash(stored) if config.hash_pixels else None


def _robust_window(x: np.ndarray) -> np.ndarray:
    # Subsample for speed: the percentiles of every 4th pixel of a radiograph are stable.
    sample = x[::4, ::4] if x.size > 1_000_000 else x
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _check_plausible(x: np.ndarray, config: ReaderConfig) -> None:
    if not config.check_plausibility:
        return
    if x.size == 0:
        raise DecodeError("implausible_pixels", "decoded image has no pixels")
    if float(np.ptp(x)) == 0.0:
        raise DecodeError(
            "implausible_pixels",
            "every pixel has the same value (blank image); check the export or the detector",
        )
    rows, cols = x.shape
    if rows < 32 or cols < 32:
        return  # too small to judge texture
    # Lag-1 correlation on a central crop at native resolution: anatomy is smooth at the pixel
    # scale, decoder garbage from a corrupt codestream is not.
    r0, c0 = max(0, rows // 2 - 256), max(0, cols // 2 - 256)
    crop = x[r0 : r0 + 512, c0 : c0 + 512].astype(np.float64)
    a, b = crop[:, :-1].ravel(), crop[:, 1:].ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return  # flat centre, e.g. collimated region: not evidence of noise
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))
    if corr < config.min_neighbour_correlation:
        raise DecodeError(
            "implausible_pixels",
            f"decoded pixels look like noise (neighbour correlation {corr:.2f}); "
            "the compressed data is probably corrupt",
        )


def _str(ds, name: str) -> str | None:
    value = ds.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _parse_age(age: str | None, birth: str | None, study: str | None) -> float | None:
    """Years from PatientAge ('065Y', '018M', '010W', '003D'), else birth and study dates."""
    if age:
        try:
            n, unit = float(age[:-1]), age[-1].upper()
            return round(n / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit], 2)
        except (ValueError, KeyError, IndexError):
            pass
    if birth and study:
        try:
            b = _dt.datetime.strptime(birth[:8], "%Y%m%d").date()
            s = _dt.datetime.strptime(study[:8], "%Y%m%d").date()
            years = (s - b).days / 365.25
            return round(years, 2) if 0 <= years < 130 else None
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# PNG / JPEG


def _read_raster(data: bytes, config: ReaderConfig) -> Radiograph:

    fmt = "png" if data.startswith(_PNG_MAGIC) else "jpeg"
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            im = Image.open(io.BytesIO(data))
            cols, rows = im.size
        except Exception as exc:  # noqa: BLE001
            raise DecodeError("truncated" if len(data) < 64 else "malformed", f"{fmt} header unreadable: {exc}") from None
        if rows * cols > config.max_pixels:
            raise DecodeError(
                "too_large",
                f"{rows}x{cols} = {rows * cols} pixels exceeds the limit of {config.max_pixels}",
            )
        try:
            im.load()
        except OSError as exc:
            code = "truncated" if "truncat" in str(exc).lower() else "decode_failed"
            raise DecodeError(code, f"{fmt} data could not be decoded: {exc}") from None
        im = ImageOps.exif_transpose(im)
    notes += [str(w.message) for w in caught]
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        stored = np.asarray(im)
        if mode == "I" and stored.max(initial=0) < 65536 and stored.min(initial=0) >= 0:
            stored = stored.astype(np.uint16)
    elif mode == "L":
        stored = np.asarray(im)
    else:
        notes.append(f"{fmt} in mode {mode} converted to luminance")
        stored = np.asarray(im.convert("L"))
    if stored.ndim != 2:
        raise DecodeError("unsupported_photometric", f"unexpected {fmt} pixel layout {stored.shape}")
    _check_plausible(stored, config)
    if stored.dtype == np.uint8:
        image = (stored.astype(np.float32) / 255.0)
    else:
        # 16-bit exports rarely use the full range (12-bit detectors): window like a viewer would.
        image = _robust_window(stored.astype(np.float32))
    meta = RadiographMeta(
        format=fmt,
        rows=int(stored.shape[0]),
        cols=int(stored.shape[1]),
        photometric="MONOCHROME2",
        bits_stored=8 if stored.dtype == np.uint8 else 16,
    )
    return Radiograph(image=image, pixel_hash=_maybe_hash(stored, config), meta=meta, warnings=notes)


# ---------------------------------------------------------------------------------------------
# DICOM


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


def _parse_header(data: bytes):
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
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC) or len(head) < 8:
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
        meta = _dicom_meta(ds)
        _check_image_attributes(ds, meta, config)
    except Exception:  # noqa: BLE001 - DecodeError and odd values alike: decided on the whole object
        return DicomHeader()
    return DicomHeader(meta=meta)


def _check_image_header(ds, meta: RadiographMeta, config: ReaderConfig) -> list[str]:
    """Refuse objects without a usable grayscale image before decoding any pixels.

    Returns:
        Notes for the radiograph's warnings (multi-frame).
    """
    if "PixelData" not in ds:
        kind = "FloatPixelData" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else None
        what = f"{kind} (float images are not radiographs)" if kind else "no Pixel Data element"
        sop = _str(ds, "SOPClassUID")
        raise DecodeError(
            "no_pixel_data",
            f"DICOM object has {what}" + (f"; SOP class {pydicom.uid.UID(sop).name}" if sop else ""),
        )
    return _check_image_attributes(ds, meta, config)


def _check_image_attributes(ds, meta: RadiographMeta, config: ReaderConfig) -> list[str]:
    """The checks of `_check_image_header` that need the header only, not the Pixel Data element."""
    photometric = meta.photometric
    if photometric is None:
        raise DecodeError("pixel_header_mismatch", "Photometric Interpretation (0028,0004) is missing")
    if photometric not in _GRAY and photometric not in _COLOUR:
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


def _read_dicom(data: bytes, config: ReaderConfig) -> Radiograph:
    ds, notes = _parse_header(data)
    meta = _dicom_meta(ds)
    notes += _check_image_header(ds, meta, config)
    photometric = meta.photometric
    if meta.transfer_syntax in _J2K_SYNTAXES:
        _check_j2k_header(ds, meta)
    stored = _decode_pixels(ds, meta.transfer_syntax)
    if stored.ndim == 3 and photometric in _COLOUR:
        notes.append(f"{photometric} object converted to luminance")
        lum = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        _check_plausible(lum, config)
        image = np.clip(lum / (2**bits - 1), 0, 1).astype(np.float32)
        return Radiograph(image=image, pixel_hash=_maybe_hash(stored, config), meta=meta, warnings=notes)
    if stored.ndim != 2:
        raise DecodeError("pixel_header_mismatch", f"decoded pixel array has shape {stored.shape}, expected 2-D")
    _check_plausible(stored, config)
    image = _display(stored, ds, photometric)
    return Radiograph(image=image, pixel_hash=_maybe_hash(stored, config), meta=meta, warnings=notes)


def _decode_pixels(ds, tsyntax: str | None) -> np.ndarray:

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


_J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}


def _check_j2k_header(ds, meta: RadiographMeta) -> None:
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


def _display(stored: np.ndarray, ds, photometric: str) -> np.ndarray:

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
        image = _window(x, _first(centre), _first(width), _str(ds, "VOILUTFunction") or "LINEAR")
    else:
        image = _robust_window(x)
    invert = photometric == "MONOCHROME1" or _str(ds, "PresentationLUTShape") == "INVERSE"
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


def _transfer_syntax(ds) -> str | None:
    """The data set's transfer syntax; for raw data sets (no file meta) the one pydicom inferred
    while parsing, written into a new file meta so the pixel decoders can find it."""
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "TransferSyntaxUID" in fm:
        return str(fm.TransferSyntaxUID)
    meta_ts = None
    if getattr(ds, "is_little_endian", None) is not None:
        if not ds.is_little_endian:
            meta_ts = str(ExplicitVRBigEndian)
        else:
            meta_ts = str(ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian)
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if meta_ts:
        ds.file_meta.TransferSyntaxUID = meta_ts
    return meta_ts


def _int(ds, tag: str, default: int | None) -> int | None:
    try:
        return int(ds.get(tag)) if ds.get(tag) is not None else default
    except (TypeError, ValueError):
        return default


def _dicom_meta(ds) -> RadiographMeta:
    meta_ts = _transfer_syntax(ds)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing_t = (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None
        if spacing_t and min(spacing_t) <= 0:
            spacing_t = None  # some CR writers put 0\\0 when the plate was not calibrated
    except (TypeError, ValueError):
        spacing_t = None
    sex = _str(ds, "PatientSex")
    sex = sex.upper()[:1] if sex and sex.upper()[:1] in ("M", "F", "O") else None
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    return RadiographMeta(
        format="dicom",
        rows=rows,
        cols=cols,
        photometric=_str(ds, "PhotometricInterpretation"),
        transfer_syntax=meta_ts,
        bits_stored=_int(ds, "BitsStored", None),
        frames=max(_int(ds, "NumberOfFrames", 1) or 1, 1),
        modality=_str(ds, "Modality"),
        body_part=_str(ds, "BodyPartExamined"),
        laterality=_str(ds, "ImageLaterality") or _str(ds, "Laterality"),
        view_position=_str(ds, "ViewPosition"),
        manufacturer=_str(ds, "Manufacturer"),
        institution=_str(ds, "InstitutionName"),
        pixel_spacing=spacing_t,
        sex=sex,
        age=_parse_age(_str(ds, "PatientAge"), _str(ds, "PatientBirthDate"), _str(ds, "StudyDate")),
        study_date=_str(ds, "StudyDate"),
        other_date=_str(ds, "SeriesDate") or _str(ds, "AcquisitionDate") or _str(ds, "ContentDate"),
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        sop_uid=_str(ds, "SOPInstanceUID"),
        patient_id=_str(ds, "PatientID"),
    )

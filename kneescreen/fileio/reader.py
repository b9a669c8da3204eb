"""Read any knee radiograph an archive holds (DICOM, PNG, JPEG) from bytes: the entry points.

`read_radiograph(data)` reads a whole object; local files and S3 objects both arrive as bytes.
It returns a `Radiograph`: a float32 image in [0, 1] with bone bright (the way a radiologist's
viewer shows it), the decoded stored-pixel hash, and header metadata. Any problem with the input
raises `DecodeError` with a stable ``error_code``; no other exception escapes (a property test
feeds it random and mutated bytes). `read_stored(data)` stops before the display transform (the
device path, issue #22). `read_dicom_header(head)` is header triage from an object's
first bytes (ranged reads), without its pixel data.

Where each step lives (policies documented in docs/architecture.md):
- `kneescreen.fileio.radiograph`: `ReaderConfig`, `Radiograph`, `RadiographMeta`, `pixel_hash`.
- `kneescreen.fileio.raster`: PNG and JPEG.
- `kneescreen.fileio.dicom`: `header` (parse, triage, checks before decoding; multi-frame policy),
  `meta`, `pixels` (decoders pinned to pylibjpeg), `display` (PS3.3 C.11 grayscale pipeline),
  `read` (the whole-object read; colour becomes luminance, PALETTE COLOR is refused).
- `kneescreen.fileio.plausibility`: blank images and decoder noise are refused.
"""

from __future__ import annotations

import warnings

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.header import DicomHeader, read_dicom_header
from kneescreen.fileio.dicom.read import read_dicom
from kneescreen.fileio.dicom.stored import read_dicom_stored
from kneescreen.fileio.frames import StoredFrame
from kneescreen.fileio.radiograph import Radiograph, RadiographMeta, ReaderConfig, pixel_hash
from kneescreen.fileio.raster import is_raster, read_raster, read_raster_stored

__all__ = ["DicomHeader", "Radiograph", "RadiographMeta", "ReaderConfig", "StoredFrame", "pixel_hash",
           "read_dicom_header", "read_radiograph", "read_stored"]


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
    return _guarded(data, config, read_raster, read_dicom)


def read_stored(data: bytes, config: ReaderConfig = ReaderConfig()) -> StoredFrame:
    """One radiograph read up to its pixel values, for preprocessing on another device (#22).

    Returns:
        A `StoredFrame`: 2-D pixels plus the `FrameFacts` that `read_radiograph`'s display
        transform would use. Its errors are `read_radiograph`'s, except that the plausibility
        checks of plain stored values are left to whoever applies the facts.

    Raises:
        DecodeError: for every kind of bad input; ``error_code`` says which.
    """
    return _guarded(data, config, read_raster_stored, read_dicom_stored)


def _guarded(data, config: ReaderConfig, raster, dicom):
    """Dispatch on content; no exception but DecodeError (and interpreter exits) escapes."""
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
            if is_raster(data):
                return raster(data, config)
            return dicom(data, config)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("too_large", f"ran out of memory decoding the image: {exc}") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - decoder failures (incl. Rust panics, which are
        # BaseException in pyo3) become a typed error row, never a crashed batch
        raise DecodeError("decode_failed", f"{type(exc).__name__}: {exc}"[:500]) from None

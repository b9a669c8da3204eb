"""What the reader returns and how strict it is: `ReaderConfig`, `RadiographMeta`, `Radiograph`,
and what every format's decode ends with (the stored-pixel hash, the fallback display window)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np


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
    pseudonymise before anything is written (see `kneescreen.fileio.privacy`)."""

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
    """A decoded radiograph: display-ready image, stored-pixel hash, header facts, warnings."""

    image: np.ndarray  # float32, HxW, [0, 1], bone bright
    pixel_hash: str | None  # None when ReaderConfig.hash_pixels is off
    meta: RadiographMeta
    warnings: list[str] = field(default_factory=list)


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


def maybe_hash(stored: np.ndarray, config: ReaderConfig) -> str | None:
    """`pixel_hash` when ``config.hash_pixels`` asks for it, else None."""
    return pixel_hash(stored) if config.hash_pixels else None


def robust_window(x: np.ndarray) -> np.ndarray:
    """The 0.5-99.5 percentile window to [0, 1]: for DICOM without a VOI and 16-bit PNGs."""
    # Subsample for speed: the percentiles of every 4th pixel of a radiograph are stable.
    sample = x[::4, ::4] if x.size > 1_000_000 else x
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

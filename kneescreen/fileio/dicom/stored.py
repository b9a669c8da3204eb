"""A DICOM object read up to its stored pixel values, for the device path (issue #22).

`read_dicom_stored` stops where `read.read_dicom` would start the display transform: it hands
on frame 0's stored values with the `FrameFacts` (rescale, window, VOI LUT function, photometric,
Presentation LUT Shape, spacing) that the inference actor needs to reproduce
`display.display` on its device. Table lookups stay here on the CPU, where pydicom applies them:
a Modality LUT Sequence or VOI LUT Sequence output (and a colour frame's luminance) travels
instead of the stored values, already checked for plausibility (``facts.checked``).
"""

from __future__ import annotations

import numpy as np
from pydicom.pixels import apply_modality_lut, apply_voi

from kneescreen.errors import DecodeError
from kneescreen.fileio.dicom.meta import element_text
from kneescreen.fileio.dicom.read import decode_stored, is_colour, luminance
from kneescreen.fileio.frames import FrameFacts, StoredFrame
from kneescreen.fileio.plausibility import check_plausible
from kneescreen.fileio.radiograph import RadiographMeta, ReaderConfig


def _first(value) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window(ds) -> dict:
    """Window centre / width / function as `display.display` would use them (none -> percentile)."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None and _first(width) > 0:
        return {"window_center": _first(centre), "window_width": _first(width),
                "voi_function": (element_text(ds, "VOILUTFunction") or "LINEAR").upper()}
    return {}


def _facts(ds, meta: RadiographMeta, pixels: np.ndarray, **kw) -> FrameFacts:
    base = {
        "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]),
        "bits_stored": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16),
        "signed": int(ds.get("PixelRepresentation", 0) or 0) == 1, "photometric": meta.photometric or "",
        "pixel_spacing": meta.pixel_spacing,
        "presentation_inverse": element_text(ds, "PresentationLUTShape") == "INVERSE",
    }
    return FrameFacts(**(base | kw))


def _rescale(ds) -> dict:
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return {"rescale_slope": float(ds.RescaleSlope), "rescale_intercept": float(ds.RescaleIntercept)}
    return {}


def _through_luts(stored: np.ndarray, ds) -> tuple[np.ndarray, dict]:
    """Apply the LUT sequences here (pydicom, as `display.display` does); returns the pixels that
    travel and the facts for what remains of the transform."""
    modality_out = apply_modality_lut(stored, ds)
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        lut_in = modality_out if modality_out.dtype.kind in "iu" else np.rint(modality_out).astype(np.int64)
        out = apply_voi(lut_in, ds, index=0)
        bits = int(voi_seq[0].LUTDescriptor[2]) if "LUTDescriptor" in voi_seq[0] else 16
        return out, {"display_scale": float(2**bits - 1)}
    return modality_out, _window(ds)


def read_dicom_stored(data: bytes, config: ReaderConfig) -> StoredFrame:
    """A whole DICOM object -> `StoredFrame` (the errors of `read.read_dicom`, except that the
    plausibility checks of plain stored values are left to the device)."""
    ds, meta, notes, stored = decode_stored(data, config)
    return stored_frame(ds, meta, notes, stored, config)


def encoded_facts(ds, meta: RadiographMeta) -> FrameFacts | None:
    """The facts of a grayscale frame left compressed for the actor to decode (`frame_extract`);
    None where the display needs a table lookup first (Modality / VOI LUT sequences, applied
    here on the CPU by pydicom)."""
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    shape = np.empty((meta.rows, meta.cols, 0), np.uint8)  # _facts reads the frame's shape only
    return _facts(ds, meta, shape, **_rescale(ds), **_window(ds))


def stored_frame(ds, meta: RadiographMeta, notes: list[str], stored: np.ndarray, config: ReaderConfig) -> StoredFrame:
    """Frame 0's decoded values -> `StoredFrame` (LUTs and colour applied here, see above)."""
    if is_colour(stored, meta.photometric):
        notes.append(f"{meta.photometric} object converted to luminance")
        lum, bits = luminance(stored, ds)
        check_plausible(lum, config)
        image = np.clip(lum / (2**bits - 1), 0, 1).astype(np.float32)
        # Colour is never inverted by the CPU path (it has no MONOCHROME1 / INVERSE step).
        facts = _facts(ds, meta, image, display_scale=1.0, checked=True, presentation_inverse=False)
        return StoredFrame(image, facts, meta, notes)
    if stored.ndim != 2:
        raise DecodeError("pixel_header_mismatch", f"decoded pixel array has shape {stored.shape}, expected 2-D")
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        check_plausible(stored, config)
        pixels, kw = _through_luts(stored, ds)
        return StoredFrame(pixels, _facts(ds, meta, pixels, checked=True, **kw), meta, notes)
    return StoredFrame(stored, _facts(ds, meta, stored, **_rescale(ds), **_window(ds)), meta, notes)

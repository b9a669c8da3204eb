"""Raw frames as Arrow columns: how stored pixels travel from decode tasks to the actors (#22).

A frame is one ``large_binary`` value (its native-endian bytes; 64-bit offsets, so a block may
exceed 2 GiB) with ``frame_rows`` / ``frame_cols`` / ``frame_dtype`` beside it, and its
`FrameFacts` as ``ff_*`` scalar columns. Rows without a frame (errors, skips) hold nulls.
Blocks are bounded by bytes, not rows (`RAW_BLOCK_BYTES`): a 2,500 x 2,000 16-bit film is
10 MB, 200 times a 224 px letterboxed input (docs/operations.md, "Preprocess on the device").
With ``--frame-decode actor`` a frame may also travel compressed (`EncodedFrame`): its codestream
in ``frame``, ``frame_codec`` / ``frame_syntax`` / ``frame_bits_allocated`` set (null for raw
frames), and the actor decodes it (`kneescreen.fileio.frame_decoders`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from kneescreen.fileio.frames import EncodedFrame, FrameFacts

# Upper bound on the frame bytes of one decode output block: a quarter of the decode task's
# memory reservation (screen.pipeline.DECODE_MEMORY, 512 MiB), which leaves the rest for the
# object being decoded (its bytes, the decoder's buffers, the stored frame) while a block fills.
RAW_BLOCK_BYTES = 128 * 1024**2

_FACT_TYPES = {
    "bits_stored": pa.int16(), "signed": pa.bool_(), "photometric": pa.string(),
    "rescale_slope": pa.float64(), "rescale_intercept": pa.float64(),
    "window_center": pa.float64(), "window_width": pa.float64(), "voi_function": pa.string(),
    "presentation_inverse": pa.bool_(), "display_scale": pa.float64(), "checked": pa.bool_(),
    "spacing_row": pa.float64(), "spacing_col": pa.float64(),
}
_ENCODED_TYPES = {"frame_codec": pa.string(), "frame_syntax": pa.string(), "frame_bits_allocated": pa.int16()}
FRAME_FIELDS = pa.schema(
    [pa.field("frame", pa.large_binary()), pa.field("frame_rows", pa.int32()), pa.field("frame_cols", pa.int32()),
     pa.field("frame_dtype", pa.string())] + [pa.field(k, t) for k, t in _ENCODED_TYPES.items()]
    + [pa.field(f"ff_{k}", t) for k, t in _FACT_TYPES.items()])


def is_frame_column(name: str) -> bool:
    """Whether a column belongs to the raw-frame block layout (`FRAME_FIELDS`)."""
    return FRAME_FIELDS.get_field_index(name) >= 0


def frame_nbytes(pixels: np.ndarray | EncodedFrame | None) -> int:
    if isinstance(pixels, EncodedFrame):
        return len(pixels.data)
    return 0 if pixels is None else int(pixels.nbytes)


def _fact_values(f: FrameFacts | None) -> dict:
    if f is None:
        return dict.fromkeys(_FACT_TYPES)
    vals = {k: getattr(f, k) for k in _FACT_TYPES if hasattr(f, k)}
    row, col = f.pixel_spacing if f.pixel_spacing else (None, None)
    return vals | {"spacing_row": row, "spacing_col": col}


def frame_columns(frames: list, facts: list[FrameFacts | None]) -> dict[str, pa.Array]:
    """Frames (2-D arrays, `EncodedFrame` or None) and their facts -> the `FRAME_FIELDS` columns."""
    native = [p if p is None or isinstance(p, EncodedFrame) else np.ascontiguousarray(p, p.dtype.newbyteorder("="))
              for p in frames]
    raw = [None if isinstance(p, EncodedFrame) else p for p in native]
    enc = [p if isinstance(p, EncodedFrame) else None for p in native]
    cols = {
        "frame": pa.array([None if p is None else (p.data if e is not None else p.tobytes())
                           for p, e in zip(native, enc)], pa.large_binary()),
        "frame_rows": pa.array([None if p is None else (e.facts.rows if e is not None else p.shape[0])
                                for p, e in zip(native, enc)], pa.int32()),
        "frame_cols": pa.array([None if p is None else (e.facts.columns if e is not None else p.shape[1])
                                for p, e in zip(native, enc)], pa.int32()),
        "frame_dtype": pa.array([None if p is None else p.dtype.str for p in raw], pa.string()),
        "frame_codec": pa.array([None if e is None else e.codec for e in enc], pa.string()),
        "frame_syntax": pa.array([None if e is None else e.transfer_syntax for e in enc], pa.string()),
        "frame_bits_allocated": pa.array([None if e is None else e.bits_allocated for e in enc], pa.int16()),
    }
    values = [_fact_values(f) for f in facts]
    for k, t in _FACT_TYPES.items():
        cols[f"ff_{k}"] = pa.array([v[k] for v in values], t)
    return cols


def _value(v):
    """A batch cell as Python: NaN and None are missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _facts_at(batch: dict, i: int) -> FrameFacts:
    v = {k: _value(batch[f"ff_{k}"][i]) for k in _FACT_TYPES}
    spacing = (v.pop("spacing_row"), v.pop("spacing_col"))
    kw = {k: x for k, x in v.items() if x is not None}
    return FrameFacts(rows=int(batch["frame_rows"][i]), columns=int(batch["frame_cols"][i]),
                      pixel_spacing=spacing if None not in spacing else None,
                      **{k: (bool(x) if _FACT_TYPES[k] == pa.bool_() else x) for k, x in kw.items()})


def frames_from_batch(batch: dict, rows=None) -> tuple[list, list[FrameFacts | None]]:
    """The frames (2-D arrays, `EncodedFrame` for compressed ones, None) and facts of a batch
    (NumPy columns, as Ray Data hands them to an actor).

    The arrays are read-only views of the batch's bytes (no copy); ``rows`` picks row indices.
    """
    frames, facts = [], []
    for i in (range(len(batch["frame"])) if rows is None else rows):
        data = batch["frame"][i]
        if data is None:
            frames.append(None)
            facts.append(None)
            continue
        ff = _facts_at(batch, i)
        codec = _value(batch["frame_codec"][i]) if "frame_codec" in batch else None
        if codec is not None:
            frames.append(EncodedFrame(data=bytes(data), codec=codec, facts=ff,
                                       transfer_syntax=_value(batch["frame_syntax"][i]) or "",
                                       bits_allocated=int(_value(batch["frame_bits_allocated"][i]) or 0)))
        else:
            arr = np.frombuffer(data, dtype=np.dtype(batch["frame_dtype"][i]))
            frames.append(arr.reshape(int(batch["frame_rows"][i]), int(batch["frame_cols"][i])))
        facts.append(ff)
    return frames, facts


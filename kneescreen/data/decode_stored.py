"""The decode batch function of ``--preprocess device`` (issue #22): read, parse, decode to stored
pixels on the CPU, and stop there.

Where `decode.decode_batch` hands the actors letterboxed uint8 inputs, `decode_stored_batch`
hands them each film's stored pixel values (compressed syntaxes decoded here with the pinned
pydicom plugins, as today) and the `FrameFacts` that the actor's device needs for the display
transform, letterbox, ROI and tiles (`data.device_preprocess`). Rows, statuses, error codes and
metadata columns are `decode_batch`'s, except the two checks that need the display image or the
pixels, which move to the actor: ``implausible_pixels`` (for plain stored values) and
``joint_not_found``. With ``spec.frame_decode == "actor"`` frames of the device codecs stay
compressed (`kneescreen.fileio.frame_extract`) and the actor decodes them. The output is a
sequence of blocks bounded by frame bytes
(`frame_block.RAW_BLOCK_BYTES`), not rows: 32 full-size films are 320 MB.
"""

from __future__ import annotations

import time
from typing import Iterator

from kneescreen.data.decode import META_COLUMNS, DecodeSpec, describe, read_one
from kneescreen.data.frame_block import RAW_BLOCK_BYTES, frame_columns, frame_nbytes
from kneescreen.errors import DecodeError
from kneescreen.fileio.frame_decoders import CpuFrameDecoder
from kneescreen.fileio.frame_extract import extract_frame
from kneescreen.fileio.frames import EncodedFrame
from kneescreen.fileio.plausibility import check_plausible
from kneescreen.fileio.reader import ReaderConfig, read_stored
from kneescreen.fileio.store import join


def _row(spec: DecodeSpec, key: str, uri: str, cfg: ReaderConfig, etag: str | None) -> tuple[dict, object]:
    """One object -> (metadata row, `StoredFrame` or None); reads pinned to ``etag`` when given."""
    t0 = time.perf_counter()
    read = extract_frame if spec.frame_decode == "actor" else read_stored
    status, code, msg, meta, sf, nbytes = read_one(spec, uri, cfg, etag, read=read)
    if status == "skipped" and sf is not None and not sf.facts.checked:
        # The CPU path decides plausibility before the skip policy for objects read whole (a
        # compressed frame is decoded for it here: a skipped row never reaches the actor).
        try:
            pixels = sf.pixels
            if isinstance(pixels, EncodedFrame):
                pixels = CpuFrameDecoder().decode_one(pixels)
            check_plausible(pixels, cfg)
        except DecodeError as exc:
            status, code, msg = "error", exc.error_code, exc.message
    row = {"status": status, "error_code": code, "message": msg, "bytes_read": nbytes,
           **describe(spec, key, meta), "decode_ms": (time.perf_counter() - t0) * 1000}
    return row, (sf if status == "ok" else None)


def _emit(batch: dict, rows: list[int], cols: dict[str, list], frames: list) -> dict:
    out = {k: [batch[k][i] for i in rows] for k in batch}
    out.update(cols)
    out.update(frame_columns([f.pixels if f is not None else None for f in frames],
                             [f.facts if f is not None else None for f in frames]))
    return out


def decode_stored_batch(batch: dict, spec: DecodeSpec, block_bytes: int = RAW_BLOCK_BYTES) -> Iterator[dict]:
    """Rows (``key``, or ``uri`` when ``spec.root`` is None) -> blocks of rows with stored frames.

    Every input column passes through and every input row comes out, in order, in one or more
    blocks: a block ends before the frame that would take it past ``block_bytes`` (a block holds
    at least one row, so one film larger than that is a block of its own).

    Yields:
        Column dicts: the input's, `META_COLUMNS`, and `frame_block.FRAME_FIELDS` (nulls for rows
        that are not ``ok``).
    """
    cfg = ReaderConfig(max_pixels=spec.max_pixels, hash_pixels=False)
    keys = list(batch["key"])
    uris = [join(spec.root, k) for k in keys] if spec.root is not None else list(batch["uri"])
    # The listing's etags pin every read to the listed version, as in `decode.decode_batch`.
    etags = list(batch["etag"]) if "etag" in batch else [None] * len(keys)
    rows: list[int] = []
    cols: dict[str, list] = {k: [] for k in META_COLUMNS}
    frames: list = []
    held = 0
    for i, (key, uri, etag) in enumerate(zip(keys, uris, etags)):
        row, sf = _row(spec, key, uri, cfg, etag)
        size = frame_nbytes(sf.pixels if sf is not None else None)
        if rows and held + size > block_bytes:
            yield _emit(batch, rows, cols, frames)
            rows, cols, frames, held = [], {k: [] for k in META_COLUMNS}, [], 0
        rows.append(i)
        frames.append(sf)
        held += size
        for k in META_COLUMNS:
            cols[k].append(row[k])
    if rows or not keys:
        yield _emit(batch, rows, cols, frames)

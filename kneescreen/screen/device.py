"""The inference actor's preprocessing for ``--preprocess device`` (issue #22).

Decode tasks hand the actor stored pixel values and their `FrameFacts` (`data.decode_stored`,
blocks laid out by `data.frame_block`); `DevicePreprocessor` turns a batch of them into the
members' uint8 inputs on the actor's device (`data.device_preprocess.preprocess_stored`: display
transform, plausibility, letterbox, ROI and tiles), and turns frames that fail there into error
rows, as the CPU path's decode task would have. With ``--frame-decode actor`` some frames arrive
compressed (`EncodedFrame`); `DevicePreprocessor` decodes them first, in one batch, with the
device's frame decoder (`kneescreen.fileio.frame_decoders.best_decoder`: nvImageCodec on a GPU,
falling back to the CPU decoders per frame), and hands the arrays or tensors to
`preprocess_stored` with the same facts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kneescreen.data.device_preprocess import preprocess_stored
from kneescreen.data.frame_block import frames_from_batch
from kneescreen.fileio.frame_decoders import best_decoder, result_error
from kneescreen.fileio.frames import EncodedFrame, FrameFacts


class DevicePreprocessor:
    """Stored frames -> model inputs on one device.

    Args:
        keys: the input keys the bundle needs (`BundleManifest.input_keys`).
        device: torch device ("cuda", "cpu", ...).
    """

    def __init__(self, keys, device: str = "cpu", decoder=None):
        self.keys = tuple(keys)
        self.device = device
        self._decoder = decoder  # for compressed frames (--frame-decode actor); chosen on first use

    @property
    def decoder(self):
        """The frame decoder: `best_decoder` for this device (nvImageCodec with CPU fallback on
        a GPU where installed, else the CPU decoders), created on the first compressed frame."""
        if self._decoder is None:
            self._decoder = best_decoder(self.device)
        return self._decoder

    def decode_frames(self, frames: list) -> tuple[list, list]:
        """Compressed frames decoded in one batch: (frames with arrays / tensors in their place,
        per-frame (error_code, message) or None). A frame no decoder takes is an error row
        (`frame_decode_failed`, or the CPU decoder's own code on CPU actors), never a failed batch."""
        idx = [i for i, f in enumerate(frames) if isinstance(f, EncodedFrame)]
        errors: list = [None] * len(frames)
        if not idx:
            return frames, errors
        frames = list(frames)
        for i, result in zip(idx, self.decoder.decode([frames[i] for i in idx])):
            errors[i] = result_error(result)
            frames[i] = None if errors[i] else result
        return frames, errors

    def preprocess_stored(self, frames: list, facts: list[FrameFacts | None]):
        """(inputs, errors) for frames given as NumPy arrays or device tensors (None: blank row);
        see `data.device_preprocess.preprocess_stored`."""
        return preprocess_stored(frames, facts, self.keys, self.device)

    def __call__(self, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """A batch with frame columns -> (the batch with device failures as error rows and the
        device time added to ``decode_ms``, input key -> uint8 tensor with one row per row)."""
        t0 = time.perf_counter()
        frames, facts = frames_from_batch(batch)
        frames, decode_errors = self.decode_frames(frames)
        inputs, errors = self.preprocess_stored(frames, facts)
        errors = [d or e for d, e in zip(decode_errors, errors)]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        has = [f is not None or d is not None for f, d in zip(frames, decode_errors)]
        per_row = (time.perf_counter() - t0) * 1000 / max(1, sum(has))
        return with_errors(batch, errors, has, per_row), inputs


def with_errors(batch: dict, errors: list, has_frame: list[bool], ms: float) -> dict:
    """``batch`` with rows whose ``errors`` entry is set turned into error rows, and ``ms`` added to
    the ``decode_ms`` of rows that had a frame (the time from bytes to model input)."""
    out = dict(batch)
    status, code, message = (np.array(batch[c], dtype=object) for c in ("status", "error_code", "message"))
    for i, err in enumerate(errors):
        if err is not None:
            status[i], code[i], message[i] = "error", err[0], err[1]
    decode_ms = np.array(batch["decode_ms"], dtype=np.float64)
    decode_ms[np.asarray(has_frame, bool)] += ms
    out.update(status=status, error_code=code, message=message, decode_ms=decode_ms)
    return out

"""Frame decoders for the inference actor (issue #22): nvImageCodec on the GPU, the reader's CPU
decoders otherwise, and a per-frame fallback from the first to the second.

- `CpuFrameDecoder`: pydicom with the pinned pylibjpeg plugins for DICOM frames (the frame is
  re-encapsulated with pydicom's helpers and decoded by the reader's own `decode_pixels`), Pillow
  for PNG / JPEG files (the reader's `raster_stored`): the same stored pixels as `read_radiograph`.
- `NvImageCodecDecoder`: ``nvidia.nvimgcodec`` (PyPI ``nvidia-nvimgcodec-cu13``, the
  ``kneescreen[gpu]`` extra), one batched ``Decoder.decode`` call per batch, results as torch
  tensors on the decoder's device (zero-copy through DLPack). It refuses, per frame, what it
  would not decode to the CPU decoders' pixels (signed data, several channels, a size that
  disagrees with the header); those frames fall back.
- `FallbackDecoder`: the device decoder first, the CPU decoder for each frame it failed on; a
  frame both fail on is a `DecodeError` ``frame_decode_failed`` result (an error row), never an
  exception out of the batch.
- `best_decoder(device)`: nvImageCodec with CPU fallback on a GPU when the package is installed,
  else the CPU decoder; ``KNEESCREEN_FRAME_DECODER=cpu|nvimgcodec`` overrides the choice.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Sequence

import numpy as np

from kneescreen.errors import DecodeError, KneescreenError
from kneescreen.fileio.frames import DEVICE_CODECS, FRAME_DECODE_FAILED, EncodedFrame, FrameDecoder
from kneescreen.fileio.radiograph import ReaderConfig

_logger = logging.getLogger(__name__)
DECODER_ENV = "KNEESCREEN_FRAME_DECODER"
DECODER_CHOICES = ("cpu", "nvimgcodec")
# Frames reach the actor after the decode task checked their size against --max-pixels.
_NO_LIMIT = ReaderConfig(max_pixels=2**62, check_plausibility=False, hash_pixels=False)
# pydicom's decoders mask the bits above Bits Stored for these codecs (`correct_unused_bits`);
# JPEG 2000 keeps its codestream's precision.
_MASKED_CODECS = ("jpeg", "jpeg-lossless")
HOST_THREADS = 4


def _message(result: BaseException) -> str:
    if isinstance(result, DecodeError):
        return f"{result.error_code}: {result.message}"
    return f"{type(result).__name__}: {result}"


class CpuFrameDecoder:
    """The reader's CPU decoders, one frame at a time: results are NumPy arrays."""

    name = "cpu"

    def decode(self, frames: Sequence[EncodedFrame]) -> list:
        out: list = []
        for frame in frames:
            try:
                out.append(self.decode_one(frame))
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - one bad frame never fails the batch
                out.append(exc)
        return out

    def decode_one(self, frame: EncodedFrame) -> np.ndarray:
        """The stored pixel values of one frame, as `read_radiograph` decodes them.

        Raises:
            DecodeError: the reader's codes (``decode_failed``, ``truncated``, ...).
        """
        import warnings

        from kneescreen.fileio.raster import raster_stored

        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if not frame.transfer_syntax:
                return raster_stored(frame.data, _NO_LIMIT)[0]
            return _decode_dicom_frame(frame)


def _decode_dicom_frame(frame: EncodedFrame) -> np.ndarray:
    """One DICOM frame, re-encapsulated into a data set holding only the Image Pixel module the
    decoders read, then decoded by the reader's `decode_pixels` (same plugin, same options)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    from kneescreen.fileio.dicom.pixels import decode_pixels

    facts = frame.facts
    bits = int(facts.bits_stored)  # ints: facts read back from Arrow blocks with nulls can be floats
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(frame.transfer_syntax)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = int(facts.rows), int(facts.columns), 1
    ds.PhotometricInterpretation = facts.photometric
    ds.BitsAllocated = int(frame.bits_allocated) or (8 if bits <= 8 else 16)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = int(bool(facts.signed))
    ds.PixelData = encapsulate([frame.data])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    arr = decode_pixels(ds, frame.transfer_syntax)
    if arr.ndim != 2:
        raise DecodeError("pixel_header_mismatch", f"decoded frame has shape {arr.shape}, expected 2-D")
    return arr


def nvimgcodec_available() -> bool:
    """Whether ``nvidia.nvimgcodec`` is installed (importing it is left to the decoder)."""
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


class NvImageCodecDecoder:
    """nvImageCodec, batched: results are torch tensors on ``device`` (or exceptions).

    ``device="cpu"`` runs nvImageCodec's own CPU backends (libjpeg-turbo, PNG): for tests and
    debugging where no GPU exists; they decode baseline and 8-bit lossless JPEG and PNG, and
    JPEG 2000 only where OpenCV is installed (its OpenJPEG).
    """

    name = "nvimgcodec"

    def __init__(self, device: str = "cuda"):
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise KneescreenError(f"nvImageCodec is not installed ({exc}): pip install 'kneescreen[gpu]' "
                                  f"or set {DECODER_ENV}=cpu") from None
        import torch

        self._nv, self._torch = nvimgcodec, torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            # GPU backends only: nvImageCodec's CPU backends are not the pinned CPU decoders, and
            # a frame the GPU cannot take should fall back to those (same pixels as the reader).
            backends = [nvimgcodec.Backend(k) for k in (nvimgcodec.BackendKind.GPU_ONLY,
                                                        nvimgcodec.BackendKind.HYBRID_CPU_GPU,
                                                        nvimgcodec.BackendKind.HW_GPU_ONLY)]
            # Host threads (the hybrid JPEG backend's Huffman decode, codestream parsing): a few, not
            # one per core (nvImageCodec's default): the node's cores run the decode tasks.
            self._decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=HOST_THREADS, backends=backends)
        else:
            self._decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                               backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        # Stored values as they are: no colour conversion, no scaling of 12/16-bit data to 8 bits.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED,
                                               allow_any_depth=True)

    def decode(self, frames: Sequence[EncodedFrame]) -> list:
        results: list = [None] * len(frames)
        streams, where = [], []
        for i, frame in enumerate(frames):
            try:
                streams.append(self._code_stream(frame))
                where.append(i)
            except Exception as exc:  # noqa: BLE001 - refused or unparseable: this frame falls back
                results[i] = exc
        if not streams:
            return results
        try:
            images = self._decoder.decode(streams, params=self._params, cuda_stream=self._stream())
        except Exception as exc:  # noqa: BLE001 - e.g. device out of memory: every frame falls back
            images = [exc] * len(streams)
        for i, image in zip(where, images):
            try:
                results[i] = self._to_tensor(image, frames[i])
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        return results

    def _stream(self) -> int:
        # Decode on torch's current stream, so the tensors are ready for the kernels after them.
        if self.device.type != "cuda":
            return 0
        return self._torch.cuda.current_stream(self.device).cuda_stream

    def _code_stream(self, frame: EncodedFrame):
        facts = frame.facts
        if frame.codec not in DEVICE_CODECS:
            raise ValueError(f"codec {frame.codec!r} is not decoded on the device")
        if facts.signed:
            raise ValueError("signed pixel data is left to the CPU decoders")
        stream = self._nv.CodeStream(frame.data)
        # Reading the header parses the codestream: garbage raises here, per frame.
        shape = (stream.height, stream.width, stream.num_channels)
        if shape != (int(facts.rows), int(facts.columns), 1):
            raise ValueError(f"codestream is {shape[0]}x{shape[1]}x{shape[2]}, header says "
                             f"{facts.rows}x{facts.columns}x1")
        return stream

    def _to_tensor(self, image, frame: EncodedFrame):
        if isinstance(image, BaseException):
            raise image
        if image is None:
            raise RuntimeError(f"nvImageCodec could not decode the {frame.codec} frame")
        torch = self._torch
        if image.buffer_kind == self._nv.ImageBufferKind.STRIDED_HOST:
            t = torch.from_numpy(np.asarray(image))  # host buffers: its DLPack export wants CUDA
        else:
            t = torch.from_dlpack(image)  # zero-copy; the stream handshake is DLPack's
        if t.ndim == 3:
            t = t[..., 0]
        if t.dtype == torch.uint16:
            t = t.to(torch.int32)  # few torch ops take uint16; int32 holds every 16-bit value
        bits = int(frame.facts.bits_stored)
        if frame.codec in _MASKED_CODECS and bits < 16 and t.dtype != torch.uint8:
            t = t & ((1 << bits) - 1)
        return t


class FallbackDecoder:
    """``primary`` first; ``fallback`` for each frame it failed on; both failed: a DecodeError
    ``frame_decode_failed`` result naming both errors. Counts what fell back (``fallbacks``) and
    what failed (``failures``) for the actor's metrics."""

    def __init__(self, primary: FrameDecoder, fallback: FrameDecoder | None = None):
        self.primary, self.fallback = primary, fallback or CpuFrameDecoder()
        self.name = f"{self.primary.name}+{self.fallback.name}"
        self.fallbacks = self.failures = 0

    def decode(self, frames: Sequence[EncodedFrame]) -> list:
        results = _guarded(self.primary, frames)
        retry = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if not retry:
            return results
        self.fallbacks += len(retry)
        _logger.debug("%s: %d of %d frames fell back to %s", self.primary.name, len(retry), len(frames),
                      self.fallback.name)
        second = _guarded(self.fallback, [frames[i] for i in retry])
        for i, result in zip(retry, second):
            if isinstance(result, BaseException):
                self.failures += 1
                result = DecodeError(FRAME_DECODE_FAILED, f"{frames[i].codec} frame: {self.primary.name}: "
                                     f"{_message(results[i])}; {self.fallback.name}: {_message(result)}"[:500])
            results[i] = result
        return results


def _guarded(decoder: FrameDecoder, frames: Sequence[EncodedFrame]) -> list:
    """``decoder.decode(frames)``, with a decoder that raises or miscounts turned into one
    exception result per frame."""
    try:
        results = list(decoder.decode(frames))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        return [exc] * len(frames)
    if len(results) != len(frames):
        exc = RuntimeError(f"{decoder.name} returned {len(results)} results for {len(frames)} frames")
        return [exc] * len(frames)
    return results


def best_decoder(device: str = "cpu") -> FrameDecoder:
    """The frame decoder for an actor on ``device`` ("cpu", "cuda", "cuda:1").

    nvImageCodec (falling back to the CPU decoders per frame) on a GPU when it is installed,
    else the CPU decoders. ``KNEESCREEN_FRAME_DECODER`` overrides: ``cpu`` always, or
    ``nvimgcodec`` (on a CPU device: nvImageCodec's CPU backends, for tests and debugging).

    Raises:
        KneescreenError: an unknown override, or ``nvimgcodec`` asked for but not installed.
    """
    choice = os.environ.get(DECODER_ENV, "").strip().lower()
    if choice and choice not in DECODER_CHOICES:
        raise KneescreenError(f"{DECODER_ENV}={choice!r} is not a frame decoder; valid: {', '.join(DECODER_CHOICES)}")
    on_gpu = str(device).startswith("cuda")
    if choice == "cpu":
        return CpuFrameDecoder()
    if choice == "nvimgcodec":
        return FallbackDecoder(NvImageCodecDecoder(str(device) if on_gpu else "cpu"))
    if on_gpu and nvimgcodec_available():
        try:
            return FallbackDecoder(NvImageCodecDecoder(str(device)))
        except Exception as exc:  # noqa: BLE001 - a broken install must not stop screening
            _logger.warning("nvImageCodec unusable on %s (%s); decoding frames on the CPU", device, exc)
    return CpuFrameDecoder()


def result_error(result) -> tuple[str, str] | None:
    """(error_code, message) of a decode result that is an exception, else None."""
    if not isinstance(result, BaseException):
        return None
    if isinstance(result, DecodeError):
        return result.error_code, result.message
    return FRAME_DECODE_FAILED, _message(result)[:500]

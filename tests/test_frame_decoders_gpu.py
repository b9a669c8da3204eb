"""nvImageCodec on a GPU against the CPU decoders (#22): the same stored pixels for lossless codecs,
within one grey level for lossy JPEG (nvJPEG's IDCT is not libjpeg's), and on the device.

Run on a GPU node with the gpu extra: ``pip install 'kneescreen[gpu]' && pytest -m gpu
tests/test_frame_decoders_gpu.py``. Skipped on CPU machines (conftest) and without nvImageCodec.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_frame_decoders import _data, _frames

from kneescreen.fileio.frame_decoders import (
    CpuFrameDecoder,
    FallbackDecoder,
    NvImageCodecDecoder,
    best_decoder,
    nvimgcodec_available,
)
from kneescreen.fileio.frame_extract import extract_frame

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec not installed: pip install 'kneescreen[gpu]'")]

LOSSLESS = ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "MR2_J2KR.dcm", "emri_small_jpeg_2k_lossless.dcm",
            "JPGLosslessP14SV1_1s_1f_8b.dcm", "jpeg-lossless-12bit-mono1.dcm", "gray8.png", "gray16.png"]
# JPEG 2000 irreversible (9/7 wavelet in floating point) and baseline JPEG: decoders may differ by 1.
LOSSY = ["RG1_J2KI.dcm", "RG3_J2KI.dcm", "MR2_J2KI.dcm", "jpeg-baseline.dcm", "gray.jpg"]


def _host(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def _max_diff(a, b) -> int:
    return int(np.abs(_host(a).astype(np.int64) - _host(b).astype(np.int64)).max())


@pytest.mark.parametrize("name", LOSSLESS + LOSSY)
def test_gpu_decode_matches_the_cpu_decoder(name):
    frame = extract_frame(_data(name)).pixels
    got = NvImageCodecDecoder("cuda").decode([frame])[0]
    assert not isinstance(got, BaseException), f"{name}: {got!r}"  # decoded on the GPU, no fallback
    assert got.device.type == "cuda"
    ref = CpuFrameDecoder().decode_one(frame)
    assert tuple(got.shape) == ref.shape
    assert _max_diff(got, ref) <= (1 if name in LOSSY else 0)


def test_htj2k_decodes_on_the_gpu_like_openjpeg():
    """HTJ2K (no pydicom test file is grayscale): encoded here by nvImageCodec, decoded by it and
    by the pinned CPU decoder (OpenJPEG >= 2.5 reads HTJ2K)."""
    from nvidia import nvimgcodec

    base = extract_frame(_data("RG3_J2KR.dcm"))
    pixels = CpuFrameDecoder().decode_one(base.pixels)
    params = nvimgcodec.EncodeParams(
        quality_type=nvimgcodec.QualityType.LOSSLESS,
        jpeg2k_encode_params=nvimgcodec.Jpeg2kEncodeParams(ht=True, bitstream_type=nvimgcodec.Jpeg2kBitstreamType.J2K))
    stream = nvimgcodec.Encoder().encode(pixels[..., None], "jpeg2k", params=params)
    frame = dataclasses.replace(base.pixels, data=bytes(stream), codec="htj2k", transfer_syntax="1.2.840.10008.1.2.4.201")
    got = NvImageCodecDecoder("cuda").decode([frame])[0]
    assert not isinstance(got, BaseException), repr(got)
    assert _max_diff(got, pixels) == 0
    assert _max_diff(CpuFrameDecoder().decode_one(frame), pixels) == 0


def test_a_batch_mixing_codecs_and_bad_frames_on_the_gpu():
    frames = _frames("RG3_J2KR.dcm", "MR_small_jp2klossless.dcm", "gray8.png", "JPGLosslessP14SV1_1s_1f_8b.dcm")
    bad = dataclasses.replace(frames[0], data=frames[0].data[:200] + b"\x00" * 100)
    decoder = best_decoder("cuda")
    assert isinstance(decoder, FallbackDecoder) and decoder.primary.name == "nvimgcodec"
    out = decoder.decode(frames + [bad])
    for got, ref in zip(out[:4], CpuFrameDecoder().decode(frames)):
        assert _max_diff(got, ref) == 0
    assert getattr(out[4], "error_code", None) == "frame_decode_failed"
    assert decoder.fallbacks == 2  # the signed frame (left to the CPU) and the broken one

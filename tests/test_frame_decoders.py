"""Frames handed to the inference actor (#22): what `extract_frame` hands on for each kind of file,
that the CPU frame decoder gives the reader's stored pixels, and that a device decoder failing on
some frames falls back per frame, with frames nothing decodes as `frame_decode_failed` results."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from conftest import dicom_test_files
from PIL import Image

from kneescreen.data.jpeg_lossless import lossless_jpeg_dicom
from kneescreen.errors import ERROR_CODES, DecodeError, KneescreenError
from kneescreen.fileio import frame_decoders
from kneescreen.fileio.frame_decoders import (
    CpuFrameDecoder,
    FallbackDecoder,
    NvImageCodecDecoder,
    best_decoder,
    nvimgcodec_available,
    result_error,
)
from kneescreen.fileio.frame_extract import extract_frame
from kneescreen.fileio.frames import FRAME_DECODE_FAILED, EncodedFrame
from kneescreen.fileio.radiograph import pixel_hash
from kneescreen.fileio.reader import read_radiograph, read_stored

FILES = dicom_test_files()


def _file(name: str) -> bytes:
    with open(FILES[name], "rb") as fh:
        return fh.read()


def _dicom(pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2", jpeg: str | None = None) -> bytes:
    """A DX data set around ``pixels``: uncompressed, or ``jpeg`` = "baseline" (Pillow, 8-bit)
    or "lossless" (kneescreen.data.jpeg_lossless)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(bits), photometric])
    ds.Modality, ds.BodyPartExamined = "DX", "KNEE"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    if jpeg == "lossless":
        lossless_jpeg_dicom(ds, pixels)
    elif jpeg == "baseline":
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _knee_like(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = (np.sin(xx / 9.0) + np.cos(yy / 7.0) + 2) / 4
    noise = np.random.default_rng(seed).normal(0, 0.02, (rows, cols))
    return np.clip((base + noise) * (2**bits - 1), 0, 2**bits - 1).astype(np.int64)


def _raster(pixels: np.ndarray, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


GRAY8 = _knee_like(96, 80, 8).astype(np.uint8)
MADE = {
    "jpeg-baseline.dcm": lambda: _dicom(GRAY8, 8, jpeg="baseline"),
    "jpeg-lossless-12bit-mono1.dcm": lambda: _dicom(_knee_like(90, 70, 12), 12, "MONOCHROME1", jpeg="lossless"),
    "gray8.png": lambda: _raster(GRAY8, "PNG"),
    "gray16.png": lambda: _raster(_knee_like(64, 72, 12).astype(np.uint16), "PNG"),
    "gray.jpg": lambda: _raster(GRAY8, "JPEG", quality=90),
    "rgb.png": lambda: _raster(np.dstack([GRAY8] * 3), "PNG"),
    "palette.png": lambda: _palette_png(),
    "rgb.jpg": lambda: _raster(np.dstack([GRAY8] * 3), "JPEG", quality=90),
}


def _palette_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(GRAY8).convert("P").save(buf, format="PNG")
    return buf.getvalue()


def _data(name: str) -> bytes:
    return MADE[name]() if name in MADE else _file(name)


# name -> codec handed on (None: the stored pixels, decoded in the task)
EXTRACTS = {
    "RG1_J2KR.dcm": "jpeg2000",  # CR, MONOCHROME1, 15-bit, JPEG 2000 lossless
    "RG3_J2KI.dcm": "jpeg2000",  # JPEG 2000 lossy
    "MR_small_jp2klossless.dcm": "jpeg2000",  # signed
    "JPEG2000.dcm": "jpeg2000",
    "emri_small_jpeg_2k_lossless.dcm": "jpeg2000",  # 10 frames: frame 0, as the reader
    "JPEG-LL.dcm": "jpeg-lossless",  # process 14 SV1, 16-bit signed
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "jpeg-lossless",
    "jpeg-lossless-12bit-mono1.dcm": "jpeg-lossless",  # this package's encoder
    "jpeg-baseline.dcm": "jpeg",
    "gray8.png": "png",
    "gray16.png": "png",
    "gray.jpg": "jpeg",
    # CPU-only: JPEG-LS, RLE, 12-bit JPEG, uncompressed, colour, files Pillow converts
    "MR_small_jpeg_ls_lossless.dcm": None,
    "MR_small_RLE.dcm": None,
    "JPGExtended.dcm": None,
    "RG1_UNCR.dcm": None,
    "US1_J2KR.dcm": None,
    "rgb.png": None,
    "palette.png": None,
    "rgb.jpg": None,
}


def _encoded(ex) -> EncodedFrame | None:
    return ex.pixels if isinstance(ex.pixels, EncodedFrame) else None


@pytest.mark.parametrize("name", sorted(EXTRACTS))
def test_extract_hands_on_the_reader_pixels(name):
    """Encoded frames decode (CPU decoder) to what `read_radiograph` decodes from the same bytes
    (pixel hash); everything else is exactly `read_stored`'s frame, facts and meta."""
    data = _data(name)
    ex = extract_frame(data)
    enc = _encoded(ex)
    assert (enc.codec if enc else None) == EXTRACTS[name]
    stored = read_stored(data)
    assert ex.meta == stored.meta
    if enc is None:
        assert np.array_equal(ex.pixels, stored.pixels) and ex.facts == stored.facts
        return
    pixels = CpuFrameDecoder().decode([enc])[0]
    assert isinstance(pixels, np.ndarray), pixels
    assert pixel_hash(pixels) == read_radiograph(data).pixel_hash
    assert np.array_equal(pixels, stored.pixels)
    assert ex.facts == stored.facts == enc.facts


def test_facts_carry_the_display_header():
    data = _dicom(_knee_like(40, 30, 12), 12, "MONOCHROME1", jpeg="lossless")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.WindowCenter, ds.WindowWidth = [2000, 1000], [4000, 500]
    ds.RescaleSlope, ds.RescaleIntercept, ds.ImagerPixelSpacing = 2, -10, [0.1, 0.12]
    buf = io.BytesIO()
    ds.save_as(buf)
    facts = extract_frame(buf.getvalue()).facts
    assert (facts.window_center, facts.window_width) == (2000.0, 4000.0)
    assert (facts.rescale_slope, facts.rescale_intercept) == (2.0, -10.0)
    assert facts.pixel_spacing == (0.1, 0.12) and facts.bits_stored == 12 and not facts.signed
    assert extract_frame(buf.getvalue()).pixels.bits_allocated == 16


@pytest.mark.parametrize("data, code", [
    (b"hello, not an image at all" * 10, "not_dicom"),
    (_file("J2K_pixelrep_mismatch.dcm"), "pixel_header_mismatch"),
    (_file("RG3_J2KR.dcm")[:400_000], "truncated"),
    (_file("JPEG-LL.dcm")[:-1000], "truncated"),
    (_file("emri_small_jpeg_2k_lossless_too_short.dcm"), "truncated"),
])
def test_extract_refuses_bad_files_with_the_reader_codes(data, code):
    with pytest.raises(DecodeError) as ours:
        extract_frame(data)
    with pytest.raises(DecodeError) as readers:
        read_radiograph(data)
    assert ours.value.error_code == readers.value.error_code == code


def test_codecs_empty_decodes_everything_in_the_task():
    ex = extract_frame(_file("RG3_J2KR.dcm"), codecs=())
    assert _encoded(ex) is None and pixel_hash(ex.pixels) == read_radiograph(_file("RG3_J2KR.dcm")).pixel_hash


# --- fallback ----------------------------------------------------------------------------------

class FlakyDevice:
    """A stand-in device decoder: fails on JPEG 2000 frames (as if the GPU codec were missing),
    raises on a batch holding a PNG (as if the device ran out of memory), else decodes on the CPU."""

    name = "fake-gpu"

    def __init__(self):
        self.batches = []

    def decode(self, frames):
        self.batches.append(len(frames))
        if any(f.codec == "png" for f in frames):
            raise RuntimeError("CUDA error: out of memory")
        return [RuntimeError("nvjpeg2k: unsupported") if f.codec == "jpeg2000" else CpuFrameDecoder().decode_one(f)
                for f in frames]


def _frames(*names: str) -> list[EncodedFrame]:
    return [extract_frame(_data(n)).pixels for n in names]


def test_fallback_decodes_failed_frames_on_the_cpu_with_the_same_pixels():
    frames = _frames("MR_small_jp2klossless.dcm", "JPEG-LL.dcm", "jpeg-baseline.dcm", "RG3_J2KI.dcm")
    device = FlakyDevice()
    decoder = FallbackDecoder(device)
    out = decoder.decode(frames)
    want = CpuFrameDecoder().decode(frames)
    assert all(np.array_equal(a, b) for a, b in zip(out, want))
    assert device.batches == [4] and decoder.fallbacks == 2 and decoder.failures == 0


def test_a_raising_device_decoder_falls_back_for_the_whole_batch():
    frames = _frames("gray8.png", "JPGLosslessP14SV1_1s_1f_8b.dcm")
    decoder = FallbackDecoder(FlakyDevice())
    out = decoder.decode(frames)
    assert all(np.array_equal(a, b) for a, b in zip(out, CpuFrameDecoder().decode(frames)))
    assert decoder.fallbacks == 2


def _corrupt(frame: EncodedFrame) -> EncodedFrame:
    import dataclasses

    cut = frame.data[: len(frame.data) // 3] + b"\x00" * 64
    return dataclasses.replace(frame, data=cut)


def test_a_frame_nothing_decodes_is_a_frame_decode_failed_result_not_a_crash():
    good, bad = _frames("MR_small_jp2klossless.dcm", "JPEG2000.dcm")
    frames = [good, _corrupt(bad), good]
    out = FallbackDecoder(FlakyDevice()).decode(frames)
    assert isinstance(out[0], np.ndarray) and isinstance(out[2], np.ndarray)
    err = out[1]
    assert isinstance(err, DecodeError) and err.error_code == FRAME_DECODE_FAILED in ERROR_CODES
    assert "fake-gpu: RuntimeError: nvjpeg2k: unsupported" in err.message and "; cpu: " in err.message
    code, message = result_error(err)
    assert code == FRAME_DECODE_FAILED and message == err.message
    # Stable: the same bytes give the same message (dashboards group on it).
    again = FallbackDecoder(FlakyDevice()).decode([_corrupt(bad)])[0]
    assert again.message == err.message
    assert result_error(out[0]) is None


def test_a_decoder_returning_the_wrong_count_cannot_lose_rows():
    class Short:
        name = "short"

        def decode(self, frames):
            return []

    frames = _frames("gray8.png", "gray.jpg")
    out = FallbackDecoder(Short()).decode(frames)
    assert len(out) == 2 and all(isinstance(x, np.ndarray) for x in out)


# --- choosing a decoder ------------------------------------------------------------------------

def test_best_decoder_without_a_gpu_is_the_cpu_decoder(monkeypatch):
    monkeypatch.delenv(frame_decoders.DECODER_ENV, raising=False)
    assert best_decoder("cpu").name == "cpu"
    monkeypatch.setattr(frame_decoders, "nvimgcodec_available", lambda: False)
    assert best_decoder("cuda").name == "cpu"  # a GPU actor without the gpu extra


def test_best_decoder_env_override(monkeypatch):
    monkeypatch.setenv(frame_decoders.DECODER_ENV, "cpu")
    assert best_decoder("cuda:0").name == "cpu"
    monkeypatch.setenv(frame_decoders.DECODER_ENV, "gpu-please")
    with pytest.raises(KneescreenError, match="valid: cpu, nvimgcodec"):
        best_decoder("cuda")


@pytest.mark.skipif(nvimgcodec_available(), reason="nvImageCodec is installed here")
def test_forcing_nvimgcodec_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setenv(frame_decoders.DECODER_ENV, "nvimgcodec")
    with pytest.raises(KneescreenError, match=r"kneescreen\[gpu\]"):
        best_decoder("cpu")


# --- nvImageCodec's own CPU backends: the real package API, where it is installed --------------

@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec (kneescreen[gpu]) not installed")
def test_nvimgcodec_cpu_backends_match_the_cpu_decoder():
    """The real package's API on its CPU backends (libjpeg-turbo, PNG; OpenCV's OpenJPEG when
    present): what it decodes is the CPU decoder's pixels, lossy JPEG within one grey level (two
    IDCT implementations); what it refuses or fails on falls back to exactly those pixels."""
    names = ["gray8.png", "gray16.png", "gray.jpg", "JPGLosslessP14SV1_1s_1f_8b.dcm", "jpeg-lossless-12bit-mono1.dcm",
             "MR_small_jp2klossless.dcm", "RG3_J2KR.dcm", "jpeg-baseline.dcm"]
    frames = _frames(*names)
    nv = NvImageCodecDecoder("cpu")
    direct = nv.decode(frames)
    assert not isinstance(direct[0], BaseException) and not isinstance(direct[1], BaseException)
    assert isinstance(direct[5], ValueError) and "signed" in str(direct[5])  # left to the CPU decoders
    decoder = FallbackDecoder(nv)
    out = decoder.decode(frames)
    assert decoder.failures == 0 and decoder.fallbacks == sum(isinstance(r, BaseException) for r in direct)
    for name, got, ref in zip(names, out, CpuFrameDecoder().decode(frames)):
        got = got.numpy() if hasattr(got, "numpy") else got
        assert got.shape == ref.shape, name
        lossy = name == "jpeg-baseline.dcm"
        assert np.abs(got.astype(np.int64) - ref.astype(np.int64)).max() <= (1 if lossy else 0), name

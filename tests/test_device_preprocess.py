"""Preprocessing stored pixels with torch (`data.device_preprocess`, issue #22) equals the CPU path.

For every input the CPU path (`read_radiograph` -> `letterbox` / `view_inputs`) and the device
path (`read_stored` -> `preprocess_stored`) must give the same error code, or model inputs within
one grey level. Inputs: pydicom's bundled files (and pydicom-data), which include lossless pairs
(MR_small as native, RLE, JPEG-LS and JPEG 2000 lossless), the synthetic archive (CR/DX,
MONOCHROME1/2, 12/14/16 bits, windows, four transfer syntaxes, PNG, JPEG and planted bad files),
and headers edited to reach each display branch (SIGMOID, LINEAR_EXACT, INVERSE, rescale).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom
import pytest
import torch

from conftest import dicom_test_files
from kneescreen.data.device_preprocess import preprocess_stored
from kneescreen.data.knee.views import view_inputs
from kneescreen.data.preprocess import letterbox
from kneescreen.errors import DecodeError
from kneescreen.fileio.reader import ReaderConfig, read_radiograph, read_stored

CFG = ReaderConfig(hash_pixels=False)
KEYS = ("img_224", "img_96", "roi_64", "tiles_32")
FILES = dicom_test_files()


def _cpu(data: bytes, keys) -> tuple[tuple | None, dict]:
    try:
        rg = read_radiograph(data, CFG)
        out = view_inputs(rg.image, rg.meta.pixel_spacing, keys)
    except DecodeError as exc:
        return (exc.error_code, exc.message), {}
    for k in keys:
        if k.startswith("img_"):
            out[k] = letterbox(rg.image, int(k[4:]))
    return None, out


def _device(data: bytes, keys) -> tuple[tuple | None, dict]:
    try:
        sf = read_stored(data, CFG)
    except DecodeError as exc:
        return (exc.error_code, exc.message), {}
    inputs, errors = preprocess_stored([sf.pixels], [sf.facts], keys)
    return errors[0], {k: v[0].numpy() for k, v in inputs.items()}


def assert_same(data: bytes, keys=KEYS) -> tuple | None:
    """The two paths agree on ``data``; returns the error (or None)."""
    err_cpu, cpu = _cpu(data, keys)
    err_dev, dev = _device(data, keys)
    assert err_dev == err_cpu
    if err_cpu is None:
        for k in keys:
            assert dev[k].shape == cpu[k].shape, k
            diff = np.abs(dev[k].astype(int) - cpu[k].astype(int)).max()
            assert diff <= 1, f"{k}: max abs diff {diff} grey levels"
    return err_cpu


def _decodes(path: str) -> bool:
    try:
        read_radiograph(open(path, "rb").read(), CFG)
        return True
    except DecodeError:
        return False


# Every bundled file that decodes today, plus the ones that do not (same error code expected).
DECODING = [n for n, p in FILES.items() if os.path.getsize(p) < 40_000_000 and _decodes(p)]


@pytest.mark.parametrize("name", DECODING)
def test_pydicom_files_equal_cpu_path(name):
    """Whole film letterbox, ROI and tiles (where a joint is found) within one grey level."""
    assert_same(open(FILES[name], "rb").read())


def test_enough_real_files_decode():
    assert len(DECODING) >= 40  # guards against the parametrization silently shrinking


@pytest.mark.parametrize("name", [n for n in FILES if n not in DECODING][:60])
def test_pydicom_failures_keep_their_error_code(name):
    data = open(FILES[name], "rb").read()
    assert_same(data, ("img_64",))


def _edited(name: str, **attrs) -> bytes:
    ds = pydicom.dcmread(FILES[name])
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize("attrs", [
    {"VOILUTFunction": "SIGMOID", "WindowCenter": 600, "WindowWidth": 800},
    {"VOILUTFunction": "LINEAR_EXACT", "WindowCenter": 600.5, "WindowWidth": 900},
    {"WindowCenter": 700, "WindowWidth": 1},
    {"PresentationLUTShape": "INVERSE"},
    {"PhotometricInterpretation": "MONOCHROME1", "RescaleSlope": 0.5, "RescaleIntercept": -1024},
])
def test_display_branches_equal_cpu_path(attrs):
    err = assert_same(_edited("CT_small.dcm", **attrs), ("img_64", "img_128"))
    assert err is None


def test_blank_and_noise_frames_are_error_rows():
    ds = pydicom.dcmread(FILES["CT_small.dcm"])
    rng = np.random.default_rng(0)
    for pixels in (np.full((128, 128), 7, np.int16), rng.integers(0, 4000, (128, 128)).astype(np.int16)):
        ds.PixelData = pixels.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        assert assert_same(buf.getvalue(), ("img_64",))[0] == "implausible_pixels"


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory):
    from kneescreen.data.synth import SynthConfig, write_archive

    out = tmp_path_factory.mktemp("synth_dev")
    write_archive(str(out), SynthConfig(n=24, seed=5, size=384, formats=("dicom", "dicom", "png", "jpeg"),
                                        plant_bad=True, workers=1))
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".dcm", ".png", ".jpg", ".jpeg", ""))


def test_synthetic_archive_equals_cpu_path(synth_files):
    codes = []
    for path in synth_files:
        codes.append(assert_same(path.read_bytes()))
    ok = sum(c is None for c in codes)
    assert ok >= 20 and ok < len(codes)  # real knees placed, and the planted bad files still fail


def test_batch_keeps_row_order_and_blanks_failures():
    good = read_stored(open(FILES["CT_small.dcm"], "rb").read(), CFG)
    blank = np.zeros((64, 64), np.uint16)
    inputs, errors = preprocess_stored([good.pixels, blank, None, torch.from_numpy(good.pixels)],
                                       [good.facts, good.facts, None, good.facts], ("img_32",))
    assert [e and e[0] for e in errors] == [None, "implausible_pixels", None, None]
    x = inputs["img_32"]
    assert x.shape == (4, 32, 32) and x.dtype == torch.uint8
    assert x[0].any() and not x[1].any() and not x[2].any() and torch.equal(x[0], x[3])


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "JPEG2000.dcm"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_truncated_files_fail_alike(name, keep):
    """A cut-off object gives the same error code (or the same pixels) on both paths."""
    data = open(FILES[name], "rb").read()
    assert_same(data[: int(len(data) * keep)], ("img_64",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", DECODING[:40])
def test_cuda_equals_cpu_path(name):
    """The same within one grey level when the tensors live on a GPU."""
    data = open(FILES[name], "rb").read()
    err_cpu, cpu = _cpu(data, KEYS)
    sf = read_stored(data, CFG)
    inputs, errors = preprocess_stored([sf.pixels], [sf.facts], KEYS, device="cuda")
    assert errors[0] == err_cpu
    if err_cpu is None:
        for k in KEYS:
            assert np.abs(inputs[k][0].cpu().numpy().astype(int) - cpu[k].astype(int)).max() <= 1, k

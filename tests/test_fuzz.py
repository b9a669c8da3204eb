"""Property test: no input bytes make the reader raise anything but DecodeError."""

from __future__ import annotations

import pytest
from conftest import dicom_test_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kneescreen.errors import ERROR_CODES, DecodeError
from kneescreen.fileio.reader import ReaderConfig, read_radiograph

FILES = dicom_test_files()
SEEDS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
         "JPEG-LL.dcm", "emri_small_big_endian.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
SEED_BYTES = [open(FILES[n], "rb").read() for n in SEEDS]
CFG = ReaderConfig(max_pixels=4_000_000)


def _check(data: bytes) -> None:
    try:
        read_radiograph(data, CFG)
    except DecodeError as exc:
        assert exc.error_code in ERROR_CODES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _check(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_behind_a_dicom_preamble(data):
    _check(b"\0" * 128 + b"DICM" + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_real_dicom(seed, edits, cut):
    data = bytearray(SEED_BYTES[seed])
    for pos, value in edits:
        data[int(pos * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    _check(bytes(data))


@pytest.mark.parametrize("name", SEEDS)
def test_every_truncation_point_of_a_header(name):
    data = SEED_BYTES[name and SEEDS.index(name)]
    for n in range(0, min(len(data), 1500), 7):
        _check(data[:n])

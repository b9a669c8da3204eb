"""Reader expectation tables over real DICOM files (pydicom + pydicom-data) and edge cases."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from conftest import dicom_test_files
from PIL import Image

from kneescreen.errors import ERROR_CODES, DecodeError
from kneescreen.fileio.reader import ReaderConfig, read_radiograph

FILES = dicom_test_files()


def _read(name: str, **cfg):
    with open(FILES[name], "rb") as fh:
        return read_radiograph(fh.read(), ReaderConfig(**cfg))


# name -> (status or error code, photometric when ok, transfer syntax when ok)
EXPECTED = {
    "RG1_UNCR.dcm": ("ok", "MONOCHROME1", "1.2.840.10008.1.2.1"),  # CR chest, 15-bit
    "RG1_J2KR.dcm": ("ok", "MONOCHROME1", "1.2.840.10008.1.2.4.90"),
    "RG1_J2KI.dcm": ("ok", "MONOCHROME1", "1.2.840.10008.1.2.4.91"),
    "RG3_UNCR.dcm": ("ok", "MONOCHROME1", "1.2.840.10008.1.2.1"),
    "RG3_J2KR.dcm": ("ok", "MONOCHROME1", "1.2.840.10008.1.2.4.90"),
    "MR_small.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.1"),
    "MR_small_RLE.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.5"),
    "MR_small_bigendian.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.2"),
    "MR_small_implicit.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2"),
    "MR_small_jp2klossless.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.4.90"),
    "MR_small_jpeg_ls_lossless.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.4.80"),
    "JPEG-LL.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.4.70"),
    "JPGExtended.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.4.51"),
    "JPEGLSNearLossless_16.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.4.81"),
    "image_dfl.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.1.99"),  # deflated
    "emri_small_RLE.dcm": ("ok", "MONOCHROME2", "1.2.840.10008.1.2.5"),  # multi-frame -> frame 1
    "MR_truncated.dcm": ("truncated", None, None),
    "emri_small_jpeg_2k_lossless_too_short.dcm": ("truncated", None, None),
    "J2K_pixelrep_mismatch.dcm": ("pixel_header_mismatch", None, None),
    "OT-PAL-8-face.dcm": ("unsupported_photometric", None, None),
    "rtplan.dcm": ("no_pixel_data", None, None),
    "test-SR.dcm": ("no_pixel_data", None, None),
    "waveform_ecg.dcm": ("no_pixel_data", None, None),
    "README.txt": ("not_dicom", None, None),
    "zipMR.gz": ("not_dicom", None, None),
    "JPEG-lossy.dcm": ("decode_failed", None, None),  # known-bad 12-bit lossy stream
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_expectation_table(name):
    status, photometric, syntax = EXPECTED[name]
    if status == "ok":
        rg = _read(name)
        assert rg.meta.photometric == photometric
        assert rg.meta.transfer_syntax == syntax
        assert rg.image.dtype == np.float32 and rg.image.ndim == 2
        assert 0.0 <= rg.image.min() and rg.image.max() <= 1.0 and rg.image.max() > rg.image.min()
        assert len(rg.pixel_hash) == 64
    else:
        with pytest.raises(DecodeError) as info:
            _read(name)
        assert info.value.error_code == status
        assert info.value.error_code in ERROR_CODES and info.value.message


# Lossless encodings of one image must decode to identical stored pixels.
LOSSLESS_GROUPS = [
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_expb.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
     "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"),
]


@pytest.mark.parametrize("group", LOSSLESS_GROUPS, ids=lambda g: g[0])
def test_lossless_encodings_share_pixels_and_hash(group):
    results = [_read(n, check_plausibility=False) for n in group]
    assert len({r.pixel_hash for r in results}) == 1
    for r in results[1:]:
        np.testing.assert_array_equal(r.image, results[0].image)


def test_lossy_j2k_differs_from_lossless():
    assert _read("RG1_J2KI.dcm").pixel_hash != _read("RG1_J2KR.dcm").pixel_hash


def test_hashing_can_be_turned_off_without_changing_the_image():
    hashed, plain = _read("RG1_J2KR.dcm"), _read("RG1_J2KR.dcm", hash_pixels=False)
    assert hashed.pixel_hash and plain.pixel_hash is None
    np.testing.assert_array_equal(hashed.image, plain.image)


def _as_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_monochrome1_is_inverted_so_bone_is_bright():
    ds = pydicom.dcmread(FILES["RG1_UNCR.dcm"])
    mono1 = read_radiograph(_as_bytes(ds)).image
    # The same stored values declared MONOCHROME2 must display as the exact negative.
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2 = read_radiograph(_as_bytes(ds)).image
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # Bone (the spine, centre column) is brighter than lung fields either side in MONOCHROME1.
    h, w = mono1.shape
    spine = mono1[h // 3 : 2 * h // 3, w // 2 - 40 : w // 2 + 40].mean()
    lung = mono1[h // 3 : 2 * h // 3, w // 4 - 40 : w // 4 + 40].mean()
    assert spine > lung


def test_presentation_lut_inverse_inverts_monochrome2_once():
    ds = pydicom.dcmread(FILES["MR_small.dcm"])
    plain = read_radiograph(_as_bytes(ds)).image
    ds.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(read_radiograph(_as_bytes(ds)).image, 1.0 - plain, atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"  # both say "invert": invert once, not twice
    np.testing.assert_allclose(read_radiograph(_as_bytes(ds)).image, 1.0 - plain, atol=1e-6)


def test_window_centre_width_is_applied():
    ds = pydicom.dcmread(FILES["MR_small.dcm"])
    ds.WindowCenter, ds.WindowWidth = 600, 200
    img = read_radiograph(_as_bytes(ds)).image
    raw = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    assert np.all(img[raw <= 499] == 0.0) and np.all(img[raw > 700] == 1.0)


def test_narrow_sigmoid_window_saturates():
    ds = pydicom.dcmread(FILES["MR_small.dcm"])
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600, 2, "SIGMOID"  # most pixels 100s of widths away
    raw = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    img = read_radiograph(_as_bytes(ds)).image
    assert np.all(img[raw < 500] < 1e-6) and np.all(img[raw > 700] > 1 - 1e-6)
    assert np.isfinite(img).all() and 0.0 < img[(raw > 598) & (raw < 602)].mean() < 1.0


def test_rescale_slope_intercept_does_not_change_pixel_hash_but_feeds_display():
    ds = pydicom.dcmread(FILES["MR_small.dcm"])
    for tag in ("WindowCenter", "WindowWidth"):
        ds.pop(tag, None)
    a = read_radiograph(_as_bytes(ds))
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    b = read_radiograph(_as_bytes(ds))
    assert a.pixel_hash == b.pixel_hash  # hash is of stored values
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)  # percentile window is scale-invariant


def test_too_large_refused_before_decoding():
    with pytest.raises(DecodeError) as info:
        _read("RG1_UNCR.dcm", max_pixels=1_000_000)
    assert info.value.error_code == "too_large"


def test_multiframe_policy():
    rg = _read("emri_small.dcm", check_plausibility=False)
    assert rg.meta.frames == 10 and any("frame 1 of 10" in w for w in rg.warnings)
    with pytest.raises(DecodeError) as info:
        _read("emri_small.dcm", multiframe="reject")
    assert info.value.error_code == "multiframe"


def test_metadata_from_header():
    m = _read("RG1_UNCR.dcm").meta
    assert (m.modality, m.body_part, m.view_position, m.sex) == ("CR", "CHEST", "PA", "F")
    assert 60 < m.age < 70
    assert m.pixel_spacing is None  # the file says 0\0: uncalibrated, not zero-size pixels
    assert "patient_id" not in m.public_dict()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _smooth(shape, dtype, maxv):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((np.sin(xx / 9.0) + np.cos(yy / 7.0) + 2) / 4 * maxv).astype(dtype)


def test_png_8_and_16_bit_and_jpeg():
    a8 = _smooth((64, 80), np.uint8, 255)
    r8 = read_radiograph(_png(a8))
    assert r8.meta.format == "png" and r8.meta.bits_stored == 8
    np.testing.assert_allclose(r8.image, a8 / 255.0, atol=1e-6)
    a16 = _smooth((64, 80), np.uint16, 4095)
    r16 = read_radiograph(_png(a16))
    assert r16.meta.bits_stored == 16 and r16.image.max() == 1.0
    buf = io.BytesIO()
    Image.fromarray(a8).save(buf, format="JPEG", quality=95)
    rj = read_radiograph(buf.getvalue())
    assert rj.meta.format == "jpeg" and np.abs(rj.image - a8 / 255.0).mean() < 0.02


def test_png_of_dicom_stored_values_shares_pixel_hash():
    ds = pydicom.dcmread(FILES["MR_small.dcm"])
    stored = ds.pixel_array.astype(np.uint16)
    assert read_radiograph(_png(stored)).pixel_hash == read_radiograph(_as_bytes(ds)).pixel_hash


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_raster(cut):
    buf = io.BytesIO()
    Image.fromarray(_smooth((256, 256), np.uint8, 255)).save(buf, format="JPEG")
    data = buf.getvalue()
    with pytest.raises(DecodeError) as info:
        read_radiograph(data[: int(len(data) * cut)])
    assert info.value.error_code in ("truncated", "decode_failed")


def test_uniform_and_noise_images_are_implausible():
    with pytest.raises(DecodeError) as info:
        read_radiograph(_png(np.full((64, 64), 128, np.uint8)))
    assert info.value.error_code == "implausible_pixels"
    noise = np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)
    with pytest.raises(DecodeError) as info:
        read_radiograph(_png(noise))
    assert info.value.error_code == "implausible_pixels"


def test_decoder_is_pinned_to_pylibjpeg(monkeypatch):
    """With the pinned plugin unavailable, compressed DICOM fails loudly instead of silently
    switching to Pillow (which is installed and could decode JPEG baseline)."""
    import kneescreen.fileio.dicom.pixels as pixels

    monkeypatch.setattr(pixels, "DICOM_DECODING_PLUGIN", "no-such-plugin")
    with pytest.raises(DecodeError) as info:
        _read("SC_rgb_jpeg_dcmtk.dcm")
    assert info.value.error_code == "unsupported_transfer_syntax"

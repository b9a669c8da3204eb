"""The JPEG Lossless SV1 encoder: what it writes, pydicom's pinned decoder (pylibjpeg) reads back
exactly, at every precision a radiograph uses, and the reader sees the same pixels as the
uncompressed object."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders import JPEGLosslessSV1Decoder

from kneescreen.data.jpeg_lossless import JPEG_LOSSLESS_SV1, encode_lossless_jpeg, lossless_jpeg_dicom
from kneescreen.fileio.reader import read_radiograph


def _decode(codestream: bytes, shape: tuple[int, int], bits: int) -> np.ndarray:
    arr, _ = JPEGLosslessSV1Decoder.as_array(
        encapsulate([codestream]), rows=shape[0], columns=shape[1], samples_per_pixel=1,
        bits_allocated=8 if bits <= 8 else 16, bits_stored=bits, pixel_representation=0,
        photometric_interpretation="MONOCHROME2", number_of_frames=1, decoding_plugin="pylibjpeg")
    return arr


def _smooth(rows: int, cols: int, bits: int) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return ((np.sin(xx / 17) + np.cos(yy / 11) + 2) / 4 * (2**bits - 1)).astype(np.int64)


RNG = np.random.default_rng(7)
CASES = {
    "noise-8": (RNG.integers(0, 256, (31, 45)), 8),
    "smooth-12": (_smooth(120, 90, 12), 12),
    "noise-12": (RNG.integers(0, 4096, (17, 64)), 12),
    "smooth-15": (_smooth(64, 64, 15), 15),
    "noise-16": (RNG.integers(0, 65536, (40, 33)), 16),  # differences wrap modulo 2^16
    "extremes-16": (np.array([[0, 65535, 0, 65535], [65535, 0, 65535, 0]]), 16),  # the 32768 difference
    "flat": (np.full((9, 13), 1000), 12),  # one Huffman symbol
    "one-pixel": (np.array([[5]]), 8),
    "odd-shape-0xff-bytes": (np.full((3, 1000), 255) ^ RNG.integers(0, 2, (3, 1000)), 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_pydicoms_decoder(name):
    img, bits = CASES[name]
    codestream = encode_lossless_jpeg(img, bits)
    assert codestream[:4] == b"\xff\xd8\xff\xc3" and codestream[-2:] == b"\xff\xd9"
    assert np.array_equal(_decode(codestream, img.shape, bits), img)


def test_smooth_images_compress():
    img = _smooth(256, 256, 12)
    assert len(encode_lossless_jpeg(img, 12)) < 0.5 * img.size * 2


@pytest.mark.parametrize("img, bits", [(np.zeros((4, 4, 3), int), 8), (np.zeros((4, 4)), 8),
                                       (np.full((4, 4), 4096), 12), (np.zeros((4, 4), int), 17)])
def test_refuses_what_it_cannot_encode(img, bits):
    with pytest.raises(ValueError):
        encode_lossless_jpeg(img, bits)


def test_a_lossless_jpeg_dicom_reads_as_the_uncompressed_one():
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    img = _smooth(200, 150, 12) ^ RNG.integers(0, 4, (200, 150))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME1"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = img.astype(np.uint16).tobytes()

    def save() -> bytes:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    plain = read_radiograph(save())
    lossless_jpeg_dicom(ds, img)
    data = save()
    compressed = read_radiograph(data)
    assert compressed.meta.transfer_syntax == JPEG_LOSSLESS_SV1 != plain.meta.transfer_syntax
    assert compressed.pixel_hash == plain.pixel_hash
    assert np.array_equal(compressed.image, plain.image)
    assert len(data) < img.size * 2

"""A small lossless JPEG encoder (ITU-T T.81 process 14, selection value 1) for grayscale images.

No installed package encodes DICOM's JPEG Lossless SV1 (1.2.840.10008.1.2.4.70), the most
common compressed transfer syntax of CR/DX archives; benchmarks and tests need full-size files
of it (issue #22). Pure NumPy: predictor 1 (the left neighbour; the first column predicts from
above, the first pixel from 2^(P-1)), one optimal Huffman table (T.81 Annex K.2), no restart
intervals, no point transform. Decoded by pydicom's pylibjpeg plugin to the same values.

`encode_lossless_jpeg(pixels, precision)` -> codestream bytes;
`lossless_jpeg_dicom(ds, pixels)` puts it into a data set as encapsulated Pixel Data.
"""

from __future__ import annotations

import struct

import numpy as np

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
_ROWS_PER_CHUNK = 128  # bits are expanded a chunk at a time: ~40 bytes per pixel while in flight


def _differences(img: np.ndarray, precision: int) -> np.ndarray:
    """Prediction differences, modulo 2^16, in [-32768, 32767] (T.81 H.1.2.1)."""
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra, the left neighbour (selection value 1)
    pred[1:, 0] = x[:-1, 0]  # first column: Rb, the pixel above
    pred[0, 0] = 1 << (precision - 1)
    d = (x - pred) & 0xFFFF
    return np.where(d >= 0x8000, d - 0x10000, d)


def _category(d: np.ndarray) -> np.ndarray:
    """SSSS: bits of |d|; 16 for the difference 32768 (which has no extra bits)."""
    table = np.zeros(32769, dtype=np.int64)
    table[1:] = np.floor(np.log2(np.arange(1, 32769))).astype(np.int64) + 1
    return table[np.abs(d)]


def _huffman_lengths(freq: np.ndarray) -> dict[int, int]:
    """Code length per used symbol, at most 16 bits, no all-ones code (T.81 Annex K.2)."""
    symbols = [s for s in range(len(freq)) if freq[s] > 0]
    weights = {s: int(freq[s]) for s in symbols}
    weights[-1] = 0  # the reserved symbol: keeps every real code from being all ones
    size = {s: 0 for s in weights}
    others = {s: None for s in weights}
    live = dict(weights)
    while len(live) > 1:
        v1 = min(live, key=lambda s: (live[s], -s))
        w1 = live.pop(v1)
        v2 = min(live, key=lambda s: (live[s], -s))
        live[v2] += w1
        for chain_start in (v1, v2):
            s = chain_start
            while True:
                size[s] += 1
                if others[s] is None:
                    break
                s = others[s]
        s = v2
        while others[s] is not None:
            s = others[s]
        others[s] = v1
    bits = np.zeros(40, dtype=np.int64)
    for s in size:
        bits[size[s]] += 1
    for i in range(len(bits) - 1, 16, -1):  # Figure K.3: no code longer than 16 bits
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol's code (the longest)
    order = sorted(symbols, key=lambda s: (-weights[s], s))
    lengths, k = {}, 0
    for length in range(1, 17):
        for _ in range(int(bits[length])):
            lengths[order[k]] = length
            k += 1
    return lengths


def _canonical_codes(lengths: dict[int, int]) -> tuple[list[int], list[int], dict[int, int]]:
    """(BITS[1..16], HUFFVAL, code per symbol) of canonical Huffman codes (T.81 Annex C)."""
    huffval = sorted(lengths, key=lambda s: (lengths[s], s))
    counts = [sum(1 for s in lengths if lengths[s] == n) for n in range(1, 17)]
    codes, code, prev = {}, 0, lengths[huffval[0]] if huffval else 1
    for s in huffval:
        code <<= lengths[s] - prev
        prev = lengths[s]
        codes[s] = code
        code += 1
    return counts, huffval, codes


def _entropy_coded(d: np.ndarray, ssss: np.ndarray, lengths: dict[int, int], codes: dict[int, int]) -> bytes:
    """The scan's bits, padded with ones and byte-stuffed (0xFF -> 0xFF 0x00)."""
    code_of = np.zeros(17, dtype=np.int64)
    len_of = np.zeros(17, dtype=np.int64)
    for s, n in lengths.items():
        code_of[s], len_of[s] = codes[s], n
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(d >= 0, d, d - 1) & ((np.int64(1) << extra_len) - 1)
    value = (code_of[ssss] << extra_len) | extra
    nbits = len_of[ssss] + extra_len
    chunks = []
    for start in range(0, value.shape[0], _ROWS_PER_CHUNK):
        v, n = value[start:start + _ROWS_PER_CHUNK].ravel(), nbits[start:start + _ROWS_PER_CHUNK].ravel()
        owner = np.repeat(np.arange(v.size), n)
        pos = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
        chunks.append(((v[owner] >> (n[owner] - 1 - pos)) & 1).astype(np.uint8))
    bits = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    pad = (-bits.size) % 8
    packed = np.packbits(np.concatenate([bits, np.ones(pad, np.uint8)]))
    ff = np.flatnonzero(packed == 0xFF)
    return np.insert(packed, ff + 1, 0).tobytes()


def encode_lossless_jpeg(pixels: np.ndarray, precision: int) -> bytes:
    """A 2-D unsigned image -> a JPEG lossless (process 14, SV1) codestream.

    Args:
        pixels: rows x columns, values in [0, 2^precision).
        precision: sample precision P, 2..16 (DICOM Bits Stored).

    Raises:
        ValueError: not 2-D, a precision outside 2..16, or values that do not fit it.
    """
    img = np.asarray(pixels)
    if img.ndim != 2 or img.dtype.kind not in "iu":
        raise ValueError(f"expected a 2-D integer image, got {img.dtype} {img.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16, not {precision}")
    if img.size and (int(img.min()) < 0 or int(img.max()) >= 1 << precision):
        raise ValueError(f"values outside [0, 2^{precision})")
    rows, cols = img.shape
    d = _differences(img, precision)
    ssss = _category(d)
    lengths = _huffman_lengths(np.bincount(ssss.ravel(), minlength=17))
    counts, huffval, codes = _canonical_codes(lengths)
    sof = struct.pack(">HBHHBBBB", 11, precision, rows, cols, 1, 1, 0x11, 0)
    dht = struct.pack(">HB", 3 + 16 + len(huffval), 0x00) + bytes(counts) + bytes(huffval)
    sos = struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)  # Ss = predictor 1, Se = 0, Ah/Al = 0
    return (b"\xff\xd8" + b"\xff\xc3" + sof + b"\xff\xc4" + dht + b"\xff\xda" + sos
            + _entropy_coded(d, ssss, lengths, codes) + b"\xff\xd9")


def lossless_jpeg_dicom(ds, pixels: np.ndarray) -> None:
    """Replace ``ds``'s Pixel Data with ``pixels`` encoded as JPEG Lossless SV1 (in place).

    ``ds`` must carry Bits Stored (the precision) and a file meta; the transfer syntax becomes
    JPEG Lossless SV1 and the frame one encapsulated fragment with a basic offset table.
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    frame = encode_lossless_jpeg(pixels, int(ds.BitsStored))
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LOSSLESS_SV1)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "00"

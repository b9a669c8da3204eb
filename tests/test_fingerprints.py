"""Near-duplicate search by LSH buckets against the exact all-pairs reference (no Ray)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import pytest
from conftest import DEV_SET
from PIL import Image

from kneescreen.data.fingerprints import all_pairs_near_duplicates, band_keys, bucket_rows, near_pairs, normalise, \
    thumbnail, thumbnail_u8
from kneescreen.fileio.reader import read_radiograph

needs_dev = pytest.mark.skipif(not os.path.isdir(DEV_SET), reason="../shared/data/knee-xray-dev not present")


@functools.cache  # decoding the dev set takes seconds: once for every parameter set
def _dev_thumbs() -> tuple[list[str], np.ndarray]:
    """Dev-set thumbnails plus, for every fifth image, a half-size JPEG-q70 copy and a brightened copy."""
    import io

    keys, thumbs = [], []
    for i, path in enumerate(sorted(p for c in os.listdir(DEV_SET) if os.path.isdir(os.path.join(DEV_SET, c))
                                    for p in (os.path.join(DEV_SET, c, f) for f in os.listdir(os.path.join(DEV_SET, c))))):
        data = open(path, "rb").read()
        keys.append(os.path.relpath(path, DEV_SET))
        thumbs.append(thumbnail_u8(read_radiograph(data).image))
        if i % 5 == 0:
            im = Image.open(io.BytesIO(data)).convert("L")
            for name, copy in (("half", im.resize((im.width // 2, im.height // 2))),
                               ("bright", Image.eval(im, lambda v: min(255, int(v * 0.9) + 20)))):
                buf = io.BytesIO()
                copy.save(buf, format="JPEG", quality=70)
                keys.append(f"{keys[-1] if name == 'half' else keys[-2]}:{name}")
                thumbs.append(thumbnail_u8(read_radiograph(buf.getvalue()).image))
    stacked = np.stack(thumbs)
    stacked.flags.writeable = False  # shared by the parameter sets
    return keys, stacked


def _lsh_pairs(keys, thumbs_u8, min_corr, bands, bits) -> set[tuple[str, str]]:
    table = pa.table({"key": keys, "unit": keys, "label": ["normal"] * len(keys),
                      "thumb": pa.array([t.tobytes() for t in thumbs_u8], pa.binary())})
    rows = bucket_rows(table, bands, bits, parts=1)
    found = near_pairs(rows, min_corr).to_pylist()
    assert len(found) == len({(r["key_a"], r["key_b"]) for r in found}), "a pair was reported twice"
    return {(r["key_a"], r["key_b"]) for r in found}


@needs_dev
@pytest.mark.parametrize("min_corr,bands,bits", [(0.995, 20, 20), (0.99, 20, 20), (0.95, 60, 8), (0.9, 100, 6)])
def test_lsh_pairs_equal_all_pairs(min_corr, bands, bits):
    keys, thumbs = _dev_thumbs()
    exact = {tuple(sorted((keys[i], keys[j]))) for i, j in all_pairs_near_duplicates(normalise(thumbs), min_corr)}
    assert _lsh_pairs(keys, thumbs, min_corr, bands, bits) == exact
    if min_corr >= 0.99:  # every planted copy, and nothing else, is a near duplicate of its original
        triples = [(k, f"{k}:half", f"{k}:bright") for k in keys if f"{k}:half" in keys]
        assert exact == {tuple(sorted(p)) for t in triples for p in ((t[0], t[1]), (t[0], t[2]), (t[1], t[2]))}
    else:
        assert len(exact) > 40  # distinct dev knees above 0.9-0.95: the comparison did real work


def test_uint8_thumbnail_gives_the_float_thumbnail():
    img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    assert np.array_equal(normalise(thumbnail_u8(img))[0], thumbnail(img))


def test_band_keys_separate_bands_and_are_deterministic():
    t = normalise(np.random.default_rng(1).integers(0, 255, (5, 1024)))
    k = band_keys(t, 4, 16)
    assert k.shape == (5, 4) and np.array_equal(k >> 32, np.tile(np.arange(4), (5, 1)))
    assert np.array_equal(k, band_keys(t, 4, 16))
    with pytest.raises(ValueError):
        band_keys(t, 2, 40)

"""Reader cost on a full-size radiograph: milliseconds per read_radiograph call.

Usage: .venv/bin/python bench/reader_cost.py [--rows 3000 --cols 2500] [--baseline OLD_READER.py]

A synthetic 12-bit uncompressed DX (smooth anatomy-like field plus noise), with a VOI window in
the header and without one (percentile window). Best of 5 calls each, with the pixel hash
(duplicate audits) and without it (screening). `--baseline` times another reader file too
(e.g. `git show COMMIT:kneescreen/fileio/reader.py > /tmp/old_reader.py`), with its defaults. That
works for commits before the reader was split into `kneescreen/fileio/{radiograph,raster,dicom/...}`
(06ae0a0 and earlier), when reader.py was self-contained; a later reader.py only dispatches to
the package on the path, so time a later commit from its own checkout instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def make_dx(rows: int, cols: int, window: bool) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = (2000 + 1500 * np.sin(xx / 300) * np.cos(yy / 400) + rng.normal(0, 20, xx.shape)).clip(0, 4095)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.Rows, ds.Columns = "DX", "KNEE", rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = img.astype(np.uint16).tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def best_ms(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(min(times), 1)


def main(argv=None) -> int:
    from kneescreen.fileio import reader

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--cols", type=int, default=2500)
    p.add_argument("--baseline", default=None, help="another reader.py to time with its defaults")
    args = p.parse_args(argv)
    old = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("kneescreen._baseline_reader", args.baseline)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old
        spec.loader.exec_module(old)
    res = {"rows": args.rows, "cols": args.cols}
    for window in (True, False):
        data = make_dx(args.rows, args.cols, window)
        row = {"hash": best_ms(lambda: reader.read_radiograph(data, reader.ReaderConfig())),
               "no_hash": best_ms(lambda: reader.read_radiograph(data, reader.ReaderConfig(hash_pixels=False)))}
        if old is not None:
            row["baseline"] = best_ms(lambda: old.read_radiograph(data, old.ReaderConfig()))
        res["header_window" if window else "percentile_window"] = row
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

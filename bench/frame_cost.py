"""What a full-size film costs in flight with ``--preprocess device`` vs ``cpu`` (issue #22).

Usage: .venv/bin/python bench/frame_cost.py [--rows 2500 --cols 2000 --films 32 --out bench/results/frame_cost.json]

Writes ``--films`` copies of one synthetic 16-bit uncompressed knee DX of rows x cols into a temp
folder and runs both decode batch functions over them as a screening decode task would
(`DecodeSpec` with an img_224 + roi_128 + tiles_224 bundle's inputs, 1 torch thread):
- bytes per row of the decode output (Arrow block ``nbytes`` / rows), rows per block and block
  bytes (``--preprocess device`` cuts blocks at `frame_block.RAW_BLOCK_BYTES`), the bytes of an
  inference batch of `ScreenConfig.batch_size` (32) rows;
- milliseconds per film: CPU path (read + display + letterbox + views, in the decode task),
  device path's decode task (read to stored pixels), and the device path's actor work run on
  this CPU (`preprocess_stored`, torch, 1 thread). GPU times are not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def make_film(rows: int, cols: int) -> bytes:
    from kneescreen.data.synth import SynthConfig, draw_subjects, encode_dicom, render_knee

    sub = draw_subjects(SynthConfig(n=1, seed=4))[0]
    sub = type(sub)(**{**sub.__dict__, "syntax": "1.2.840.10008.1.2.1", "bits": 16, "photometric": "MONOCHROME2"})
    side = max(rows, cols)
    img = render_knee(sub, side)
    top, left = (side - rows) // 2, (side - cols) // 2
    return encode_dicom(sub, img[top : top + rows, left : left + cols], pixel_spacing=0.15)


def _ms(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def run(rows: int, cols: int, films: int, batch_rows: int = 32) -> dict:
    import pyarrow as pa
    import torch

    from kneescreen.data.decode import DecodeSpec, decode_batch
    from kneescreen.data.decode_stored import decode_stored_batch
    from kneescreen.data.device_preprocess import preprocess_stored
    from kneescreen.data.frame_block import RAW_BLOCK_BYTES, frames_from_batch
    from kneescreen.fileio.store import Store
    from kneescreen.screen.stages import typed_table

    torch.set_num_threads(1)
    data = make_film(rows, cols)
    keys = ("img_224", "roi_128", "tiles_224")
    with tempfile.TemporaryDirectory() as d:
        for i in range(films):
            with open(os.path.join(d, f"f{i:03d}.dcm"), "wb") as fh:
                fh.write(data)
        spec = DecodeSpec(store=Store(), sizes=(224,), views=("roi_128", "tiles_224"), root=d)
        batch = {"key": [f"f{i:03d}.dcm" for i in range(films)], "size": [len(data)] * films}
        cpu_ms, cpu_out = _ms(lambda: typed_table(decode_batch(dict(batch), spec)))
        dev_ms, blocks = _ms(lambda: [typed_table(b) for b in decode_stored_batch(dict(batch), spec)])
    assert all(s == "ok" for s in cpu_out.column("status").to_pylist())
    np_block = {c: np.array(blocks[0].column(c).to_pylist(), dtype=object) for c in blocks[0].column_names}
    frames, facts = frames_from_batch(np_block)
    pre_ms, _ = _ms(lambda: preprocess_stored(frames, facts, keys))
    per_row_dev = sum(b.nbytes for b in blocks) / films
    return {
        "film": f"{rows} x {cols} 16-bit uncompressed DX", "object_bytes": len(data), "films": films,
        "raw_block_bytes_limit": RAW_BLOCK_BYTES,
        "cpu": {"bytes_per_row": round(cpu_out.nbytes / films), "ms_per_film_decode_task": round(cpu_ms / films, 1)},
        "device": {"bytes_per_row": round(per_row_dev), "rows_per_block": [b.num_rows for b in blocks],
                   "block_bytes": [b.nbytes for b in blocks],
                   "batch_bytes": round(per_row_dev * batch_rows), "batch_rows": batch_rows,
                   "ms_per_film_decode_task": round(dev_ms / films, 1),
                   "ms_per_film_actor_preprocess_on_cpu": round(pre_ms / len(frames), 1)},
        "pyarrow": pa.__version__, "torch": torch.__version__, "torch_threads": 1,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--cols", type=int, default=2000)
    ap.add_argument("--films", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args.rows, args.cols, args.films)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

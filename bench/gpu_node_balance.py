"""Decode capacity of a node's CPU cores against its GPU's model-only rate (no Ray).

Usage (on a GPU node): python3 bench/gpu_node_balance.py --n 2000 --out bench/results/gpu_node_balance.json

Answers the sizing question behind "the pipeline keeps the model busy" on a GPU node: how many
images/s can the node's cores read + decode + letterbox (the screening decode stage, in one
process per core), and how many can the GPU infer (the bundle's own inference code: uint8 in,
bf16 autocast, EfficientNet-Lite0 gray at 160 px, random weights: the cost does not depend on
them)? The archive is the screening bench's: synthetic 256 px DICOMs, mixed transfer syntaxes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def _decode_files(paths: list[str]) -> int:
    from kneescreen.data.preprocess import letterbox
    from kneescreen.fileio.reader import ReaderConfig, read_radiograph

    cfg = ReaderConfig(hash_pixels=False)
    for p in paths:
        with open(p, "rb") as fh:
            letterbox(read_radiograph(fh.read(), cfg).image, 160)
    return len(paths)


def decode_rate(paths: list[str], procs: int) -> float:
    chunks = [paths[i::procs * 4] for i in range(procs * 4)]
    with ProcessPoolExecutor(procs) as ex:
        list(ex.map(_decode_files, [c[:2] for c in chunks]))  # warm the workers (imports)
        t0 = time.perf_counter()
        done = sum(ex.map(_decode_files, chunks))
    return done / (time.perf_counter() - t0)


def gpu_rate(batch: int, n: int, device: str = "cuda") -> float:
    import torch
    from screen_bench import bench_manifest

    from kneescreen.model.bundle import Bundle
    from kneescreen.model.registry import create_model

    import dataclasses

    manifest = dataclasses.replace(bench_manifest(160), version="bench")
    model = create_model("efficientnet_lite0", 3, "gray", weights=None).to(device).eval()
    b = Bundle(manifest, [model], device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    imgs = np.random.default_rng(0).integers(0, 255, (batch, 160, 160), dtype=np.uint8)
    with torch.inference_mode():
        for _ in range(3):
            b.member_logits({160: imgs}, batch_size=batch)
        sync()
        t0, done = time.perf_counter(), 0
        while done < n:
            b.member_logits({160: imgs}, batch_size=batch)
            done += batch
        sync()
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import torch

    from kneescreen.data.synth import SynthConfig, write_archive

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default="bench/results/gpu_node_balance.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="balance-")
    t0 = time.perf_counter()
    write_archive(work, SynthConfig(n=args.n, seed=1, size=256))
    synth_s = time.perf_counter() - t0
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(work) for f in fs if f.endswith(".dcm"))
    res = {"device": torch.cuda.get_device_name(0), "cores": cores, "images": len(paths), "synth_s": round(synth_s, 1),
           "decode_1_proc": round(decode_rate(paths[:400], 1), 1),
           f"decode_{cores}_procs": round(decode_rate(paths, cores), 1)}
    for batch in (32, 256):
        res[f"gpu_batch_{batch}"] = round(gpu_rate(batch, 20 * batch), 1)
    res["gpu_over_node_decode_at_256"] = round(res["gpu_batch_256"] / res[f"decode_{cores}_procs"], 2)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

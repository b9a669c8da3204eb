"""Screening benchmarks: pipeline vs model-only vs a plain loop, memory at 1x and 10x, rescan cost.

Usage: .venv/bin/python bench/screen_bench.py --small 150 --large 1500 --out bench/results/screen.json

The ensemble is EfficientNet-Lite0 (gray, ImageNet backbone, untrained head) at 160 px in a real
bundle: inference cost does not depend on how well the head was trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "benchmark-key-0123456789")


def make_bundle(path: str, size: int) -> None:
    import torch

    from kneescreen.bundle import save_bundle
    from kneescreen.models import create_model, normalisation

    torch.manual_seed(0)
    mean, std = normalisation("efficientnet_lite0", "gray")
    manifest = {"classes": ["normal", "osteopenia", "osteoporosis"],
                "members": [{"architecture": "efficientnet_lite0", "input_mode": "gray", "image_size": size,
                             "mean": list(mean), "std": list(std), "temperature": 1.0, "weights_init": "imagenet"}],
                "fusion": {"method": "soft", "weights": None}, "predictor": "image", "inputs": ["image"],
                "thresholds": {"low_bmd": {"threshold": 0.5}, "osteoporosis": {"threshold": 0.3}}}
    save_bundle(path, manifest, [create_model("efficientnet_lite0", 3, "gray", "imagenet").state_dict()])


class PeakRSS:
    """Peak summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def model_only(bundle_path: str, n: int, batch: int, threads: int) -> float:
    import torch

    from kneescreen.bundle import load_bundle

    torch.set_num_threads(threads)
    b = load_bundle(bundle_path)
    size = b.sizes[0]
    imgs = np.random.default_rng(0).integers(0, 255, (batch, size, size), dtype=np.uint8)
    b.member_logits({size: imgs}, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b.member_logits({size: imgs}, batch_size=batch)
        done += batch
    return done / (time.perf_counter() - t0)


def plain_loop(bundle_path: str, archive: str, batch: int, threads: int) -> float:
    """Single process, batch by batch: read + decode a batch, then infer it. No overlap."""
    import torch

    from kneescreen import storage
    from kneescreen.bundle import load_bundle
    from kneescreen.errors import DecodeError
    from kneescreen.reader import read_radiograph

    torch.set_num_threads(threads)
    b = load_bundle(bundle_path)
    keys = [o.uri for o in storage.list_objects(archive)]
    t0 = time.perf_counter()
    for i in range(0, len(keys), batch):
        arrays = []
        for uri in keys[i : i + batch]:
            try:
                arrays.append(b.prepare(read_radiograph(storage.read_bytes(uri)).image)[b.sizes[0]])
            except DecodeError:
                pass
        if arrays:
            b.predict({b.sizes[0]: np.stack(arrays)})
    return len(keys) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from kneescreen.screen import ScreenConfig, run_screen
    from kneescreen.synth import SynthConfig, write_archive
    from kneescreen.train import ensure_ray

    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=150)
    p.add_argument("--large", type=int, default=1500)
    p.add_argument("--size", type=int, default=160, help="model input size")
    p.add_argument("--image-side", type=int, default=256, help="synthetic radiograph side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--actor-cpus", type=int, default=1)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--out", default="bench/results/screen.json")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="screen-bench-")
    res = {"cpus": os.cpu_count(), "batch": args.batch, "model": "efficientnet_lite0 gray", "input_size": args.size,
           "actor_cpus": args.actor_cpus, "decode_batch": args.decode_batch}
    try:
        make_bundle(f"{work}/bundle", args.size)
        for n in (args.small, args.large):
            write_archive(f"{work}/a{n}", SynthConfig(n=n, seed=1, size=args.image_side))
        ensure_ray()
        res["model_only_images_per_s"] = round(model_only(f"{work}/bundle", 256, args.batch, os.cpu_count() or 1), 2)
        res["plain_loop_images_per_s"] = round(plain_loop(f"{work}/bundle", f"{work}/a{args.small}/images", args.batch,
                                                          os.cpu_count() or 1), 2)
        for label, n in (("small", args.small), ("large", args.large)):
            cfg = ScreenConfig(input=f"{work}/a{n}/images", output=f"{work}/out{n}", bundle=f"{work}/bundle",
                               batch_size=args.batch, actor_cpus=args.actor_cpus, decode_batch_size=args.decode_batch)
            with PeakRSS() as mem:
                full = run_screen(cfg)
            t0 = time.perf_counter()
            again = run_screen(cfg)
            rescan_s = time.perf_counter() - t0
            res[label] = {"images": n, "pipeline_images_per_s": full["throughput_images_per_s"],
                          "full_scan_s": full["timing_s"]["total"], "screen_s": full["timing_s"]["screen"],
                          "peak_rss_mb": round(mem.peak / 1e6, 1), "rescan_s": round(rescan_s, 2),
                          "rescan_screened": again["counts"]["screened"],
                          "rescan_fraction_of_full": round(rescan_s / full["timing_s"]["total"], 4)}
            print(json.dumps({label: res[label]}), flush=True)
        res["pipeline_vs_model_only"] = round(res["large"]["pipeline_images_per_s"] / res["model_only_images_per_s"], 3)
        res["pipeline_vs_plain_loop"] = round(res["large"]["pipeline_images_per_s"] / res["plain_loop_images_per_s"], 3)
        res["peak_memory_large_over_small"] = round(res["large"]["peak_rss_mb"] / res["small"]["peak_rss_mb"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

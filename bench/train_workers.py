"""Ray Train throughput on this CPU: 1 worker x 2 threads vs 2 DDP workers x 1 thread.

Usage: .venv/bin/python bench/train_workers.py --members test_cnn,efficientnet_lite0,resnet18 --n 64 --epochs 2
Reports the last epoch's training images/s (all workers together) from the run's own metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    from kneescreen.model.registry import get_spec
    from kneescreen._private.cluster import ensure_ray
    from kneescreen.fileio.store import Store
    from kneescreen.train.config import TrainConfig
    from kneescreen.train.data import TrainingData
    from kneescreen.train.trainer import train_member

    p = argparse.ArgumentParser()
    p.add_argument("--members", default="test_cnn,efficientnet_lite0,resnet18")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="bench/results/train_workers.json")
    args = p.parse_args(argv)
    ensure_ray()
    rng = np.random.default_rng(0)
    rows = []
    work = tempfile.mkdtemp(prefix="train-workers-")
    for name in args.members.split(","):
        size = get_spec(name).input_size
        images, labels = rng.integers(0, 255, (args.n, size, size), dtype=np.uint8), rng.integers(0, 3, args.n)
        data = TrainingData.from_arrays({f"img_{size}": images}, labels)
        val = data.where(np.arange(args.n) < 8)  # fits select rows of one decoded dataset
        for workers, threads in ((1, 2), (2, 1)):
            cfg = TrainConfig(data="", out=work, members=(f"{name}:gray",), weights="none", image_size=0,
                              epochs=args.epochs, batch_size=16, num_workers=workers, cpus_per_worker=threads,
                              patience=99, name=f"{name}-{workers}w")
            _, history = train_member(cfg.member_specs()[0], data, val, cfg, cfg.name, Store())
            rate = history[-1]["train_images_per_s"]
            rows.append({"member": name, "input_size": size, "workers": workers, "threads_per_worker": threads,
                         "train_images_per_s": round(rate, 2)})
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

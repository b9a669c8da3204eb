"""Driver peak memory of `kneescreen train` at two collection sizes (2,000 vs 20,000 images).

Usage:
    .venv/bin/python bench/train_rss.py --work /tmp/train-rss --sizes 2000 20000 \
        --tag after --out bench/results/train_rss.json

Per size, once (kept under ``--work`` and reused): a synthetic archive (`kneescreen synth --n N
--size 64 --images-per-patient 2`) and its split (`kneescreen split --near-duplicate-corr 1.01`,
in its own process: the split has its own benchmark, bench/split_rss.py; near-duplicate linking
is off because 64 px synthetic knees of different patients correlate above 0.995 and would all
fall into one group). Then one `run_train` per size in a fresh process, after a local Ray of
``--cpus`` logical CPUs is started (every size pays the same start-up), with a frozen member and
a fine-tuned one (``test_cnn:gray:frozen`` and ``test_cnn:gray``, one epoch, ``--weights none``,
64 px, 3 out-of-fold folds): both paths, at a compute cost this 2-core machine finishes (the
default ``efficientnet_lite0`` head fits take tens of minutes at 20,000 images here; pass
``--members`` to measure it). Only the driver process is measured:
``ru_maxrss`` (peak resident set of this process; Ray's workers, raylet and object store are other
processes) and a psutil sampler every 50 ms. ``--tag`` labels the code version measured: run it
from a copy of another commit (`git archive`) to compare designs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

MEMBERS = ["test_cnn:gray:frozen", "test_cnn:gray"]


def _cli(*args: str) -> float:
    """Run the kneescreen CLI in its own process; return its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kneescreen.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def prepare(work: str, n: int) -> dict:
    """Synthetic archive + split for n images (reused when already there)."""
    root = os.path.join(work, f"a{n}")
    out = {"n": n}
    if not os.path.exists(os.path.join(root, "labels.csv")):
        secs = _cli("synth", "--out", root, "--n", str(n), "--size", "64", "--images-per-patient", "2")
        out["synth_s"] = round(secs, 1)
    if not os.path.exists(os.path.join(root, "split", "split.csv")):
        out["split_s"] = round(_cli("split", root, "--out", os.path.join(root, "split"),
                                    "--near-duplicate-corr", "1.01"), 1)
    return out


def measure(work: str, n: int, members: list[str], epochs: int, cpus: int, tag: str) -> dict:
    """In this (fresh) process: one `run_train` on the n-image archive; the driver's peak RSS."""
    import psutil
    import ray

    from kneescreen.train.config import TrainConfig
    from kneescreen.train.run import run_train

    root = os.path.join(work, f"a{n}")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.05)

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = TrainConfig(data=root, out=os.path.join(work, f"bundle-{tag}-{n}"), split_dir=os.path.join(root, "split"),
                      members=tuple(members), weights="none", image_size=64, epochs=epochs, patience=epochs,
                      oof_folds=3, batch_size=64, storage_path=os.path.join(work, "runs"),
                      name=f"rss-{tag}-{n}-{int(time.time())}")
    t0 = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "tag": tag, "members": members, "epochs": epochs, "cpus": cpus, "wall_s": round(wall, 1),
            "rss_before_mb": round(base_kb / 1024, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
            "sampled_peak_mb": round(peak[0] / 2**20, 1), "growth_mb": round((peak_kb - base_kb) / 1024, 1),
            "dev_n": result["selection"]["n"], "test_n": result["test"]["n"],
            "deployed": result["selection"]["deployed"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kneescreen-train-rss", help="archives and bundles (kept, reused)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--members", nargs="+", default=MEMBERS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--tag", default="after", help="label for this code version (before/after)")
    ap.add_argument("--out", default=None, help="append the results to this JSON list")
    ap.add_argument("--worker", nargs=1, type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "benchmark-key-0123456789")
    if args.worker:
        print(json.dumps(measure(args.work, args.worker[0], args.members, args.epochs, args.cpus, args.tag)))
        return 0
    os.makedirs(args.work, exist_ok=True)
    results = []
    for n in args.sizes:
        print(json.dumps(prepare(args.work, n)), flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--work", args.work, "--members",
                               *args.members, "--epochs", str(args.epochs), "--cpus", str(args.cpus), "--tag",
                               args.tag], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out, "w") as fh:
            json.dump(old + results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

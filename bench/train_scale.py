"""The default training recipe end to end at programme scale: wall time by stage, driver memory.

Usage:
    .venv/bin/python bench/train_scale.py --work /tmp/train-scale --sizes 2000 20000 100000 \
        --out bench/results/train_scale.json

Per size, once (kept under ``--work`` and reused): a synthetic archive (`kneescreen synth --n N
--size 64 --images-per-patient 2`) and its split (`kneescreen split --near-duplicate-corr 1.01`:
64 px synthetic knees of different patients correlate above 0.995, so near-duplicate linking
would put them all in one group). Then, per size in a fresh process after a local Ray of
``--cpus`` logical CPUs is up, one `run_train` with `kneescreen train`'s defaults (the
``efficientnet_lite0:gray:frozen`` member with its packaged ImageNet weights, 5 out-of-fold folds,
selection, bundle, test evaluation) except ``--finetune-min-films 0`` (the frozen recipe: fine-tuned
candidates, offered from 10,000 development films on, are measured by bench/finetune_cost.py) and ``--image-size`` (default 64: the archive's side, not
the member's native 224).

Wall time by stage, timed by wrapping the functions `run_train` calls (not by log lines):
decode (split read + decoding into the object store), features (frozen features, Ray Data tasks),
head fits (the rest of the member's out-of-fold work: the head-fit task, baking the head),
covariates (age/sex model per fold), selection (`fit_ensemble`: calibration, candidates,
bootstrap selection, thresholds, triage, T-score), bundle (`save_bundle`), evaluation (test
split); "other" is the remainder. Driver memory: ``ru_maxrss`` (peak resident set of this
process only; Ray's workers, raylet and object store are other processes) and a psutil sampler
every 50 ms, plus the RSS after each stage. ``digest`` hashes the selection record and the test
report (without the bundle version, which hashes the run name): equal digests, equal results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time

# Stage -> (module, attribute) wrapped in the measuring process; `run_train` looks them up there.
STAGES = {"decode": ("kneescreen.train.run", "_load_split_data"),
          "features": ("kneescreen.train.oof", "FeatureCache.get"),
          "member": ("kneescreen.train.run", "member_out_of_fold"),
          "covariates": ("kneescreen.train.run", "covariate_out_of_fold"),
          "selection": ("kneescreen.train.run", "fit_ensemble"),
          "bundle": ("kneescreen.train.run", "save_bundle"),
          "evaluation": ("kneescreen.train.run", "evaluate_bundle")}
ORDER = ("decode", "features", "head_fits", "covariates", "selection", "bundle", "evaluation", "other")


def _cli(*args: str) -> float:
    """Run the kneescreen CLI in its own process; return its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kneescreen.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def prepare(work: str, n: int, side: int) -> dict:
    """Synthetic archive + split for n images (reused when already there)."""
    root = os.path.join(work, f"a{n}")
    out = {"n": n}
    if not os.path.exists(os.path.join(root, "labels.csv")):
        out["synth_s"] = round(_cli("synth", "--out", root, "--n", str(n), "--size", str(side),
                                    "--images-per-patient", "2"), 1)
    if not os.path.exists(os.path.join(root, "split", "split.csv")):
        out["split_s"] = round(_cli("split", root, "--out", os.path.join(root, "split"),
                                    "--near-duplicate-corr", "1.01"), 1)
    return out


def _wrap(stages: dict, rss: dict, proc) -> None:
    """Time every stage function (cumulative seconds) and note the driver's RSS after each."""
    import importlib

    for stage, (module, attr) in STAGES.items():
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        if not hasattr(owner, name):
            continue
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _stage=stage, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                stages[_stage] = stages.get(_stage, 0.0) + time.perf_counter() - t0
                rss[_stage] = round(proc.memory_info().rss / 2**20, 1)

        setattr(owner, name, timed)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=float).encode()).hexdigest()[:16]


def measure(work: str, n: int, cpus: int, image_size: int, tag: str) -> dict:
    """In this (fresh) process: one `run_train` on the n-image archive, timed by stage."""
    import psutil
    import ray

    from kneescreen.train.config import TrainConfig
    from kneescreen.train.run import run_train

    root = os.path.join(work, f"a{n}")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    stages, rss = {}, {}
    _wrap(stages, rss, proc)

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.05)

    start_mb = proc.memory_info().rss / 2**20
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = TrainConfig(data=root, out=os.path.join(work, f"bundle-{tag}-{n}"), split_dir=os.path.join(root, "split"),
                      image_size=image_size, storage_path=os.path.join(work, "runs"),
                      # The frozen recipe: at 10,000+ development films the default recipe also
                      # fine-tunes candidates (days on CPU); their cost is bench/finetune_cost.py's.
                      finetune_min_films=0,
                      name=f"scale-{tag}-{n}-{int(time.time())}")
    load = os.getloadavg()
    t0 = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stages["head_fits"] = stages.pop("member", 0.0) - stages.get("features", 0.0)
    stages["other"] = wall - sum(stages.values())
    test = {k: v for k, v in result["test"].items() if k != "bundle_version"}
    return {"n": n, "tag": tag, "members": list(cfg.members), "image_size": image_size, "cpus": cpus,
            "wall_s": round(wall, 1), "per_image_ms": round(1000 * wall / n, 2),
            "stages_s": {k: round(stages.get(k, 0.0), 1) for k in ORDER},
            "start_rss_mb": round(start_mb, 1), "rss_before_mb": round(base_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "sampled_peak_mb": round(peak[0] / 2**20, 1),
            "growth_mb": round((peak_kb - base_kb) / 1024, 1), "rss_after_stage_mb": rss,
            "dev_n": result["selection"]["n"], "test_n": result["test"]["n"],
            "deployed": result["selection"]["deployed"],
            "digest": {"selection": _digest(result["selection"]), "test": _digest(test)},
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()]}


def table(results: list[dict]) -> str:
    """The markdown table docs/benchmarks.md shows, with driver growth per image between sizes."""
    head = ["images", "wall s", "ms/image", *[f"{s} s" for s in ORDER], "driver peak MB", "growth MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --: |" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([f"{r['n']:,}", f"{r['wall_s']:.0f}", f"{r['per_image_ms']:.1f}",
                                        *[f"{r['stages_s'][s]:.1f}" for s in ORDER],
                                        f"{r['peak_rss_mb']:.0f}", f"{r['growth_mb']:.0f}"]) + " |")
    rs = sorted(results, key=lambda r: r["n"])
    for a, b in zip(rs, rs[1:]):
        per = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / (b["n"] - a["n"])
        lines.append(f"\n{a['n']:,} -> {b['n']:,}: driver peak +{per:.2f} KB per image, "
                     f"per-image wall time x{b['per_image_ms'] / a['per_image_ms']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kneescreen-train-scale", help="archives and bundles (kept, reused)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--side", type=int, default=64, help="synthetic image side in pixels")
    ap.add_argument("--image-size", type=int, default=64, help="the member's input size (TrainConfig.image_size)")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--tag", default="after", help="label for this code version (before/after)")
    ap.add_argument("--out", default=None, help="append the results to this JSON list")
    ap.add_argument("--worker", nargs=1, type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "benchmark-key-0123456789")
    if args.worker:
        print(json.dumps(measure(args.work, args.worker[0], args.cpus, args.image_size, args.tag)))
        return 0
    os.makedirs(args.work, exist_ok=True)
    results = []
    for n in args.sizes:
        print(json.dumps(prepare(args.work, n, args.side)), flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--work", args.work, "--cpus",
                               str(args.cpus), "--image-size", str(args.image_size), "--tag", args.tag],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        if args.out:  # after every size: a long run that stops later keeps what it measured
            old = json.load(open(args.out)) if os.path.exists(args.out) else []
            with open(args.out, "w") as fh:
                json.dump(old + [results[-1]], fh, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

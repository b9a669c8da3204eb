"""Driver peak RSS of `run_split` on synthetic collections of two sizes (issue #11, point 5).

Each size runs in a fresh Python process (the driver); its peak resident set is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end, which excludes Ray's worker processes
and the old code's process-pool children: what is measured is the process a user's job runs in.

The collection: 64 x 64 8-bit PNGs of smooth random fields (plausible to the reader, unrelated to
each other: median thumbnail correlation ~0), two images per patient, 1% exact copies under
another patient and 1% near copies (brightness-shifted, slightly noisy) under another patient, and
a labels.csv that `load_collection` reads. `kneescreen synth --size 64` is not used: its 64 px
knees are so alike that ~1% of all distinct pairs correlate at 0.995 or more (measured: median
pair 0.95), so every method ends with one giant near-duplicate group.

    python bench/split_rss.py --sizes 2000,20000 --work /tmp/split-bench [--pythonpath OLD_TREE]

``--pythonpath`` puts another checkout's package first (the "before" numbers: ``git archive main
kneescreen | tar -x -C OLD_TREE``). Prints one JSON line per size and writes them to ``--json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

CHILD = r"""
import json, os, resource, sys, time
tree = os.environ.get("SPLIT_BENCH_TREE")
if tree:  # the editable install's import hook would win over PYTHONPATH: drop it, put the tree first
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, tree)
import kneescreen
from kneescreen import run_split  # the package root: old trees export it too
t = time.time()
audit = run_split(sys.argv[1], sys.argv[2])
s = audit["summary"]
print("RESULT " + json.dumps({"module": kneescreen.__file__, "seconds": round(time.time() - t, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  **{k: s[k] for k in ("input_items", "kept", "dropped", "leaks", "near_duplicate_pairs",
                                       "exact_duplicate_groups")}}))
"""


def make_collection(root: pathlib.Path, n: int, seed: int = 0) -> None:
    """``n`` images under ``root/images`` and ``root/labels.csv`` (skipped when already there)."""
    from PIL import Image

    if (root / "labels.csv").exists():
        return
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    n_dup = n_near = n // 100
    for i in range(n - n_dup - n_near):
        coarse = rng.random((8, 8)).astype(np.float32)
        img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC), np.float32)
        img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
        key = f"img-{i:06d}.png"
        Image.fromarray(img).save(root / "images" / key)
        rows.append({"key": key, "label": ("normal", "osteopenia", "osteoporosis")[rng.integers(3)],
                     "patient_ref": f"P{i // 2:06d}"})
    originals = list(rows)
    for j in range(n_dup + n_near):
        src = originals[j * 7 % len(originals)]
        img = np.asarray(Image.open(root / "images" / src["key"]), np.float32)
        if j >= n_dup:  # near copy: brighter and slightly noisy, same pixels otherwise
            img = np.clip(img * 0.95 + 8 + rng.normal(0, 1, img.shape), 0, 255)
        key = f"copy-{j:06d}.png"
        Image.fromarray(img.astype(np.uint8)).save(root / "images" / key)
        rows.append({"key": key, "label": src["label"], "patient_ref": f"Q{j:06d}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "label", "patient_ref"])
        w.writeheader()
        w.writerows(rows)


def measure(root: pathlib.Path, out: pathlib.Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["SPLIT_BENCH_TREE"] = pythonpath
    env.setdefault("KNEESCREEN_PSEUDONYM_KEY", "bench-only-key-0123456789")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(out)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run_split failed on {root}:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--work", default="/tmp/split-bench")
    ap.add_argument("--pythonpath", default=None, help="checkout whose kneescreen package to measure")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = pathlib.Path(args.work, f"coll-{n}")
        t = time.time()
        make_collection(root, n)
        print(f"# collection of {n}: {time.time() - t:.1f} s", file=sys.stderr)
        r = {"images": n, **measure(root, pathlib.Path(args.work, f"out-{n}-{int(time.time())}"), args.pythonpath)}
        print(json.dumps(r), flush=True)
        results.append(r)
    if len(results) > 1:
        print(json.dumps({"rss_ratio_largest_to_smallest": round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3)}))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

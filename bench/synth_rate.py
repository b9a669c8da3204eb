"""Benchmark: synthetic archive generation rate on this machine.

Usage: .venv/bin/python bench/synth_rate.py --n 1000 --size 384
Prints one JSON line; docs/benchmarks.md records the numbers with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile

from kneescreen.data.synth import SynthConfig, write_archive


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    out = tempfile.mkdtemp(prefix="synth-bench-")
    try:
        s = write_archive(out, SynthConfig(n=args.n, size=args.size, workers=args.workers, seed=0))
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / 1e6
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"n": args.n, "size": args.size, "cpus": os.cpu_count(), "seconds": s["seconds"],
                      "images_per_s": s["images_per_s"], "archive_mb": round(size_mb, 1),
                      "python": platform.python_version()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

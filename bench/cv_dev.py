"""5-fold patient-level cross-validation on ../shared/data/knee-xray-dev -> docs/results.md numbers.

Usage: .venv/bin/python bench/cv_dev.py --out bench/results/cv_dev.json
           [--members efficientnet_lite0:gray:frozen,...] [--size 0] [--epochs 12]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from kneescreen.train.cv import run_cv
from kneescreen.train.config import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "knee-xray-dev"))
    p.add_argument("--out", default="bench/results/cv_oof_dev.json")
    p.add_argument("--size", type=int, default=0, help="member input size (0: native)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--members", default="efficientnet_lite0:gray:frozen,efficientnet_lite1:gray:frozen,"
                                        "efficientnet_lite2:gray:frozen")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = TrainConfig(data=os.path.abspath(args.source), out=os.path.abspath("bench/results"),
                      members=tuple(args.members.split(",")), weights="imagenet", image_size=args.size,
                      epochs=args.epochs, patience=4, num_workers=1, cpus_per_worker=2,
                      storage_path=os.path.abspath("bench/results/cv-runs"), name=f"cv-{int(time.time())}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    res = run_cv(cfg, os.path.abspath(args.out))
    print(f"done in {time.time() - t0:.0f} s; n={res['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The native-resolution path finds image signal that a 160 px letterbox cannot: one command.

Writes a fine-texture synthetic archive (`kneescreen synth --signal-scale fine`: the T-score moves
only trabecular spacing and solid cortex at physical scale, 2048 px films; `covariate_signal=0`,
so age and sex carry nothing) and runs the patient-level nested cross-validation of the whole
`kneescreen train` recipe (`kneescreen.train.cv`) with three frozen members side by side:

- ``efficientnet_lite0:gray:frozen`` at 160 px: the whole film letterboxed (the old path);
- ``spectral_texture:gray:frozen:roi``: the radial power spectrum of the two 20 mm metaphyseal
  ROIs around the located joint, at native resolution;
- ``efficientnet_lite0:gray:frozen:roi``: ImageNet features of the same ROIs, mean-pooled.

Each member's pooled out-of-fold row is its own result (``member:<name>``); ``deployed`` is what
the recipe would ship with all three. Results: JSON and the markdown table (bench/cv_table.py).

Usage: .venv/bin/python bench/native_cv.py [--n 160] [--size 2048] [--seed 1] [--out bench/results/native_cv.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from kneescreen.data.synth import SynthConfig, write_archive
from kneescreen.train.config import TrainConfig
from kneescreen.train.cv import run_cv

MEMBERS = ("efficientnet_lite0:gray:frozen", "spectral_texture:gray:frozen:roi", "efficientnet_lite0:gray:frozen:roi")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=160)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--archive", default="bench/results/native-archive", help="reused when it exists")
    p.add_argument("--out", default="bench/results/native_cv.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    archive = os.path.abspath(args.archive)
    t0 = time.time()
    if not os.path.exists(os.path.join(archive, "labels.csv")):
        write_archive(archive, SynthConfig(n=args.n, seed=args.seed, size=args.size, signal_scale="fine",
                                           covariate_signal=0.0))
    t_synth = time.time() - t0
    cfg = TrainConfig(data=archive, out=os.path.abspath("bench/results"), members=MEMBERS, weights="imagenet",
                      image_size=160, num_workers=1, cpus_per_worker=2,
                      storage_path=os.path.abspath("bench/results/cv-runs"), name=f"native-cv-{int(time.time())}")
    res = run_cv(cfg, os.path.abspath(args.out))
    print(f"synth {t_synth:.0f} s, cv {time.time() - t0 - t_synth:.0f} s; n={res['n']}")
    for name, r in res["predictors"].items():
        print(f"{name:45s} balanced accuracy {r['balanced_accuracy']:.2f} "
              f"({r['balanced_accuracy_lo']:.2f}-{r['balanced_accuracy_hi']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

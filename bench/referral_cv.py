"""Triage zones and T-score estimates under 5-fold patient-level outer cross-validation of the whole
training recipe (`kneescreen.train.cv`), on the real dev set and on a synthetic archive
-> docs/results.md, "Triage zones and T-score estimates".

Usage: .venv/bin/python bench/referral_cv.py [--which dev,synth] [--synth-n 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from kneescreen.data.synth import SynthConfig, write_archive
from kneescreen.train.config import TrainConfig
from kneescreen.train.cv import run_cv

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(source: str, name: str, members: str, target: float = 0.95) -> dict:
    cfg = TrainConfig(data=source, out=os.path.join(HERE, "results"), members=tuple(members.split(",")),
                      weights="imagenet", num_workers=1, cpus_per_worker=2, name=f"referral-{name}",
                      rule_out_npv=target, rule_in_ppv=target)
    t0 = time.time()
    res = run_cv(cfg, os.path.join(HERE, "results", f"referral_cv_{name}.json"))
    print(name, f"{time.time() - t0:.0f} s", json.dumps({k: res[k] for k in ("n", "class_counts", "deployed_per_fold")}))
    print(json.dumps(res["referral"], indent=1, default=float)[:4000])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--which", default="dev,synth")
    p.add_argument("--dev", default=os.path.join(HERE, "..", "..", "shared", "data", "knee-xray-dev"))
    p.add_argument("--synth-n", type=int, default=600)
    p.add_argument("--members", default="efficientnet_lite0:gray:frozen")
    p.add_argument("--target", type=float, default=0.95, help="NPV / PPV target of the triage zones")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import ray

    # A new local cluster even where a `ray start` head is running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    if "dev" in args.which:
        _run(os.path.abspath(args.dev), "dev", args.members, args.target)
    if "synth" in args.which:
        with tempfile.TemporaryDirectory() as tmp:
            # Image and age/sex both carry the T-score; two films per patient.
            write_archive(tmp, SynthConfig(n=args.synth_n, seed=19, size=256, image_signal=1.0, covariate_signal=0.5,
                                           images_per_patient=2, workers=2))
            _run(tmp, "synth" if args.target == 0.95 else f"synth_{args.target:g}", args.members, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

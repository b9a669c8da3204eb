"""What the default recipe's fine-tuned candidate costs: the recipe run twice on the same split
(split once and Ray started beforehand, outside the timings): once with
--finetune-min-films 0 (frozen members only) and once with it lowered so the fine-tuned
candidate (--finetune-members, default efficientnet_lite0:gray:finetune) is trained out of fold and
compared; the difference in wall time is the candidate's cost (Ray Train starts, training,
validation and out-of-fold scoring included). --patience equals --epochs, so every run trains
every epoch and the training image-passes are counted exactly from the split's folds.

Usage: .venv/bin/python bench/finetune_cost.py [--source DIR] [--epochs 2] [--size 0]
           [--out bench/results/finetune_cost.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time

import numpy as np

from kneescreen._private.cluster import ensure_ray
from kneescreen.data.split.run import SplitConfig, run_split
from kneescreen.fileio.store import Store
from kneescreen.model.bundle import load_bundle
from kneescreen.train.config import TrainConfig
from kneescreen.train.run import run_train

HERE = os.path.dirname(os.path.abspath(__file__))


def _passes(split_csv: str, k: int, epochs: int) -> int:
    """Training image-passes of the fine-tuned candidate: per out-of-fold run (fold f scored, fold
    f+1 for early stopping) the other folds, and the deployable run (the last fold held out)."""
    with open(split_csv) as fh:
        folds = np.array([int(r["fold"]) % k for r in csv.DictReader(fh) if r["split"] != "test"])
    ids, n = np.unique(folds), len(folds)
    per_epoch = sum(n - (folds == f).sum() - (folds == ids[(i + 1) % len(ids)]).sum() for i, f in enumerate(ids))
    return int((per_epoch + n - (folds == ids[-1]).sum()) * epochs)


def _run(source: str, work: str, tag: str, min_films: int, args, split_dir: str) -> dict:
    cfg = TrainConfig(data=source, out=os.path.join(work, tag), split_dir=split_dir, finetune_min_films=min_films,
                      epochs=args.epochs, patience=args.epochs, image_size=args.size, num_workers=1,
                      cpus_per_worker=os.cpu_count() or 1, storage_path=os.path.join(work, "runs"), name=f"cost-{tag}")
    t0 = time.perf_counter()
    out = run_train(cfg)
    wall = time.perf_counter() - t0
    m = load_bundle(cfg.out).manifest
    sets = m.selection["member_sets"]
    rates = {name: h[-1]["train_images_per_s"] for name, h in m.history.items() if "train_images_per_s" in h[-1]}
    return {"wall_s": round(wall, 1), "member_sets": {k: v["balanced_accuracy"] for k, v in sets["sets"].items()},
            "chosen": sets["chosen"], "deployed": out["selection"]["deployed"], "n_dev": sets["n_development_films"],
            "final_run_train_images_per_s": rates, "oof_folds": cfg.oof_folds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default=os.path.join(HERE, "..", "..", "shared", "data", "knee-xray-dev"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=0, help="whole-film input size (0: native, 224 for Lite0)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "finetune_cost.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    source = os.path.abspath(args.source)
    with tempfile.TemporaryDirectory() as work:
        split_dir = os.path.join(work, "split")  # split once, outside both timings
        run_split(source, split_dir, SplitConfig(seed=0), store=Store())
        ensure_ray()  # Ray's start-up outside both timings too
        frozen = _run(source, work, "frozen", 0, args, split_dir)
        tuned = _run(source, work, "recipe", 1, args, split_dir)
        passes = _passes(os.path.join(split_dir, "split.csv"), tuned["oof_folds"], args.epochs)
    extra = tuned["wall_s"] - frozen["wall_s"]
    res = {"source": source, "epochs": args.epochs, "size": args.size or "native", "cpus": os.cpu_count(),
           "frozen_only": frozen, "with_finetuned_candidate": tuned, "finetuned_extra_s": round(extra, 1),
           "training_image_passes": passes, "s_per_training_image_pass": round(extra / passes, 3),
           "s_per_development_film_per_epoch": round(extra / tuned["n_dev"] / args.epochs, 3)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

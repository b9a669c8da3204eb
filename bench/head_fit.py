"""Wall time of every frozen-head fit of the default recipe (`model.frozen.heads_out_of_fold`:
5 out-of-fold folds + the final head, L2 chosen by inner CV in each) on synthetic features.

Usage: nice -n 10 .venv/bin/python bench/head_fit.py --n 17000 --d 1280 [--threads 1] [--old-n 1000] [--old-calls 1]

Features: 3 classes with class-dependent means along a few directions plus correlated noise (a
low-rank factor model, like pooled CNN features), float32. ``--old-n`` also times the previous
solver (800-step full-batch gradient descent in float64, copied from git history below) on that
many rows for ``--old-calls`` `fit_head` calls: at 17,000 rows it does not finish in reasonable
time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kneescreen.model.covariates import LogisticModel
from kneescreen.model.frozen import L2_GRID, heads_out_of_fold


def features(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    load = rng.normal(size=(32, d)) / np.sqrt(32)
    x = rng.normal(size=(n, 32)) @ load + 0.5 * rng.normal(size=(n, d))
    x[:, :8] += 0.5 * (y[:, None] == np.arange(8) % 3)
    return x.astype(np.float32), y, np.arange(n) % 5


def old_fit_head(x, y, k, folds=None, l2_grid=L2_GRID):
    """The solver before issue #21 (kneescreen/model/frozen.py at 417c934)."""
    def fit(x, y, l2, cw):
        lr = 1.0 / (0.5 * np.linalg.norm(x, 2) ** 2 / max(len(x), 1) + l2)
        return LogisticModel(l2=l2).fit(x, y, k, steps=800, lr=lr, class_weight=cw)

    def standardise(x):
        sd = x.std(0)
        return x.mean(0), np.where(sd > 1e-6, sd, 1.0)

    x, y = np.asarray(x, np.float64), np.asarray(y, int)
    folds = np.arange(len(y)) % 3 if folds is None else np.asarray(folds)
    counts = np.bincount(y, minlength=k).astype(float)
    cw = counts.sum() / (k * np.maximum(counts, 1))
    best = (np.inf, l2_grid[0])
    for l2 in l2_grid:
        losses = []
        for f in np.unique(folds):
            tr, te = folds != f, folds == f
            mu, sd = standardise(x[tr])
            p = fit((x[tr] - mu) / sd, y[tr], l2, cw).predict_proba((x[te] - mu) / sd)
            losses.append(float(-np.log(p[np.arange(te.sum()), y[te]] + 1e-12).mean()))
        if np.mean(losses) < best[0]:
            best = (float(np.mean(losses)), l2)
    mu, sd = standardise(x)
    return fit((x - mu) / sd, y, best[1], cw), mu, sd, best[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=17000)
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--old-n", type=int, default=0, help="also time the old solver on this many rows (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--old-calls", type=int, default=1, help="old-solver fit_head calls to time (of the 6)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"n": args.n, "d": args.d, "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    x, y, folds = features(args.n, args.d)
    heads_out_of_fold(x[:300], y[:300], 3, folds[:300])  # warm-up (torch start-up), not timed
    t0 = time.perf_counter()
    logits, (_, _, _, l2) = heads_out_of_fold(x, y, 3, folds)
    out.update(new_all_heads_s=round(time.perf_counter() - t0, 1), new_l2=l2,
               oof_accuracy=round(float((logits.argmax(1) == y).mean()), 3))
    if args.old_n:
        xo, yo, fo = x[: args.old_n], y[: args.old_n], folds[: args.old_n]
        t0 = time.perf_counter()
        heads_out_of_fold(xo, yo, 3, fo)
        out["new_all_heads_at_old_n_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for f in np.unique(fo)[: args.old_calls]:
            old_fit_head(xo[fo != f], yo[fo != f], 3, folds=fo[fo != f])
        out.update(old_n=args.old_n, old_calls=args.old_calls, old_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

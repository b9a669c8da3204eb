"""Where the training driver's Python heap goes: `tracemalloc` snapshots around `run_train`.

Usage (after bench/train_rss.py has written the archive and split under --work):
    .venv/bin/python bench/train_heap.py --work /tmp/train-rss --n 20000

Prints the traced current/peak memory and the top allocation sites after decoding
(`load_training_data`), after fitting (`fit_bundle`) and at the end. Native memory (Arrow
buffers, object-store pages) is not traced: compare with bench/train_rss.py's RSS.
"""

from __future__ import annotations

import argparse
import os
import tracemalloc


def _mark(tag: str, top: int) -> None:
    cur, peak = tracemalloc.get_traced_memory()
    print(f"== {tag}: current {cur / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB", flush=True)
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:top]:
        print("   ", stat, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kneescreen-train-rss")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--members", nargs="+", default=["test_cnn:gray:frozen"])
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "benchmark-key-0123456789")
    import ray

    from kneescreen.train import run
    from kneescreen.train.config import TrainConfig

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tracemalloc.start(10)
    for name, tag in (("load_training_data", "after decoding"), ("fit_bundle", "after fitting")):
        original = getattr(run, name)

        def wrapped(*a, _original=original, _tag=tag, **k):
            out = _original(*a, **k)
            _mark(_tag, args.top)
            return out
        setattr(run, name, wrapped)
    root = os.path.join(args.work, f"a{args.n}")
    run.run_train(TrainConfig(data=root, out=os.path.join(args.work, f"heap-{args.n}"),
                              split_dir=os.path.join(root, "split"), members=tuple(args.members), weights="none",
                              image_size=64, epochs=1, patience=1, oof_folds=3, name=f"heap{args.n}"))
    _mark("end", args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Driver memory of the listing + incremental diff at 10,000 and 1,000,000 objects (no images).

Usage: .venv/bin/python bench/listing_rss.py --sizes 10000 1000000 --out bench/results/listing_rss.json

Per size, a setup process writes a committed run of comparable size (90% of the objects, rows
85% ok, 5% read_failed, 5% truncated, 5% skipped; 10% of the archive is new), then each mode
runs in a fresh process that lists a fake archive of that size (a lister yielding 1,000-key
pages, as S3 does, with no I/O) and reports its peak RSS (``ru_maxrss``) and the diff's wall time:

- ``diff``: `screen.diff.diff_listing` with its defaults (1 partition here, diffed on the driver);
- ``diff-ray``: 4 partitions as Ray tasks (a local Ray of 2 CPUs started before measuring, so both
  sizes pay the same Ray overhead; the tasks' memory is in the workers, not counted);
- ``sets``: the previous design for comparison, done/retry digest sets in driver memory
  (`ledger.screen_state`) and the listing tested against them.

``--rescan N``: a real screening run instead: a synthetic N-image DICOM archive (256 px, mixed
transfer syntaxes), an EfficientNet-Lite0 gray bundle at 160 px (bench/screen_bench.py's), one
full scan, then two incremental rescans of the unchanged archive; wall time of each `run_screen`
call (the first starts the local Ray cluster; rescans that find nothing to screen never need it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PAGE = 1000


def _key(i: int) -> str:
    return f"site{i % 40:02d}/2026/{(i // 40) % 365:03d}/img{i:09d}.dcm"


def _etag(i: int) -> str:
    return f"{(i * 2654435761) % 2**64:016x}{i:016x}"


def fake_pages(n: int, new_from: int):
    """Pages of ObjectInfo for objects 0..n-1 (objects >= new_from are the new ones)."""
    from kneescreen.fileio.store import ListPage, ObjectInfo

    for start in range(0, n, PAGE):
        yield ListPage([ObjectInfo(f"s3://bench/{_key(i)}", _key(i), 100_000 + i % 997, _etag(i))
                        for i in range(start, min(n, start + PAGE))])


def setup(out: str, n: int) -> None:
    """A committed run holding rows for the first 90% of the objects, in files of 20,000 rows (as
    the pipeline writes them: PREDICTION_FILE_ROWS)."""
    import pyarrow as pa

    from kneescreen.fileio.store import Store, join
    from kneescreen.screen import ledger

    store, done = Store(), int(n * 0.9)
    codes = [("ok", None)] * 17 + [("error", "read_failed"), ("error", "truncated"), ("skipped", "not_knee")]
    uri = join(out, "predictions", "model_version=mv", "run_id=r1")
    for f, start in enumerate(range(0, done, 20_000)):
        idx = range(start, min(done, start + 20_000))
        st = [codes[i % 20] for i in idx]
        table = pa.table({"key": [_key(i) for i in idx], "etag": [_etag(i) for i in idx],
                          "status": [s for s, _ in st], "error_code": [c for _, c in st]})
        store.write_parquet(table, join(uri, f"part-{f:04d}.parquet"))
    ledger.commit_run(store, out, {"run_id": "r1", "started_at": "2026-01-01T00:00:00", "model_version": "mv",
                                   "predictions": uri, "counts": {"listed": done, "screened": done}})


def measure(out: str, n: int, mode: str) -> dict:
    """In a fresh process: the diff of the fake listing against the committed run."""
    from kneescreen.fileio.store import Store
    from kneescreen.screen import diff, ledger, listing
    from kneescreen.screen.config import ScreenConfig

    if mode == "diff-ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False)
    listing.iter_pages = lambda *a, **k: fake_pages(n, int(n * 0.9))  # the fake lister
    store = Store()
    runs = ledger.committed_runs(store, out)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "sets":
        done, retry = ledger.screen_state(store, out, runs, "mv")
        counts = {"listed": 0, "already_done": 0, "retried": 0}
        for page in listing.iter_pages():
            for o in page.objects:
                d = ledger.object_digest(o.key, o.etag)
                counts["listed"] += 1
                counts["already_done"] += d in done
                counts["retried"] += d in retry
    else:
        cfg = ScreenConfig(input="s3://bench/", output=out, bundle="unused",
                           diff_partitions=4 if mode == "diff-ray" else None)
        result = diff.diff_listing(store, cfg, "bench", runs, "mv")
        counts = {k: result[k] for k in ("listed", "already_done", "to_screen", "retried", "partitions")}
        store.delete_prefix(result["scratch"])
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "mode": mode, "wall_s": round(wall, 2), "rss_before_mb": round(base_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "growth_mb": round((peak_kb - base_kb) / 1024, 1), **counts}


def rescan(n: int) -> dict:
    """Full scan then incremental rescans of an unchanged n-image archive (wall seconds each)."""
    from screen_bench import make_bundle

    from kneescreen.data.synth import SynthConfig, write_archive
    from kneescreen.screen.config import ScreenConfig
    from kneescreen.screen.pipeline import run_screen

    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "benchmark-key-0123456789")
    with tempfile.TemporaryDirectory() as work:
        write_archive(f"{work}/a", SynthConfig(n=n, seed=1, size=256))
        make_bundle(f"{work}/bundle", 160)
        cfg = ScreenConfig(input=f"{work}/a/images", output=f"{work}/out", bundle=f"{work}/bundle")
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            manifest = run_screen(cfg)
            runs.append({"wall_s": round(time.perf_counter() - t0, 3), "screened": manifest["counts"]["screened"],
                         "listed": manifest["counts"]["listed"], "timing_s": manifest["timing_s"]})
    full, rescans = runs[0], runs[1:]
    return {"n": n, "full": full, "rescans": rescans,
            "rescan_fraction_of_full": [round(r["wall_s"] / full["wall_s"], 4) for r in rescans]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--modes", nargs="+", default=["diff", "diff-ray", "sets"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rescan", type=int, default=None, help="measure a real full scan and rescans of N images")
    ap.add_argument("--worker", nargs=3, metavar=("OUTPUT", "N", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--setup", nargs=2, metavar=("OUTPUT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup:
        setup(args.setup[0], int(args.setup[1]))
        return 0
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.worker[2])))
        return 0
    if args.rescan:
        result = rescan(args.rescan)
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        return 0
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, __file__, "--setup", tmp, str(n)], check=True)
            for mode in args.modes:
                proc = subprocess.run([sys.executable, __file__, "--worker", tmp, str(n), mode], check=True,
                                      capture_output=True, text=True)
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

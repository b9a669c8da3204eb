"""`kneescreen link` at archive scale: driver peak RSS and wall time, 10k vs 1M archive objects
against a 300k-row DXA registry (issue #18: peak RSS at 1M <= 1.2x of 10k).

    python bench/link_scale.py --sizes 10000 1000000 --registry-rows 300000

What is real and what is simulated. Real: the registry (a 300k-row CSV of raw ids, both date
formats, three sites, some bad rows) read by Ray Data and cleaned and pseudonymised in Ray tasks;
the films streamed through the driver into hash partitions (the incremental diff's writer); the
per-partition join tasks; labels/, unlinked/ and link_audit.json written. Simulated: the listing
and the ranged header reads. A Ray Data source generates the film rows the header tasks would
return (`FILM_SCHEMA`: key, etag, pseudonymised PatientID made by the same function, study date;
2% skipped non-knee, 5% PNG/JPEG) in the tasks, via `run_link(film_source=...)`. Listing and header
reads at scale are measured in bench/listing_rss.py and bench/triage_bytes.py; what this adds is
the driver's memory for the link's own stages.

Each size runs in a fresh process (its own Ray), so ru_maxrss is that size's driver peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATIENTS = 250_000  # archive patients; the registry covers ~80% of them


def write_registry(path: pathlib.Path, rows: int) -> None:
    """A registry CSV: patients MRN0.. with 1-2 exams, dates in both formats, 0.5% bad rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        fh.write("patient_id,exam_date,t_score_lumbar_spine,t_score_total_hip,t_score_femoral_neck\n")
        for j in range(rows):
            pid = int(rng.integers(int(PATIENTS * 0.8)))
            day = 18000 + int(rng.integers(0, 2500))
            y, m, d = _ymd(day)
            date = f"{y:04d}-{m:02d}-{d:02d}" if j % 2 else f"{y:04d}{m:02d}{d:02d}"
            t = rng.normal(-1.2, 1.2, 3).round(2)
            if j % 200 == 0:
                t[0] = 12.0  # out of range: a bad row
            fh.write(f"MRN{pid:08d},{date},{t[0]},{t[1]},{'' if j % 4 == 0 else t[2]}\n")


def _ymd(day: int) -> tuple[int, int, int]:
    import datetime as dt

    d = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    return d.year, d.month, d.day


def simulated_films(n: int):
    """A `film_source` for `run_link`: n film rows made in Ray tasks, as the header tasks make them."""

    def make(batch, key: bytes):
        import datetime as dt

        import numpy as np
        import pyarrow as pa

        from kneescreen.fileio.privacy import patient_pseudo_id
        from kneescreen.link.headers import FILM_SCHEMA

        ids = batch["id"]
        rng = np.random.default_rng(int(ids[0]))
        rows = []
        for i in ids.tolist():
            status, reason = ("skipped", "not_knee") if i % 50 == 0 else ("unlinked", "not_dicom") if i % 20 == 1 else ("ok", None)
            ok = status == "ok"
            rows.append({"key": f"site-{i % 7}/{i:09d}.dcm", "etag": f"{i:016x}", "status": status, "reason": reason,
                         "patient_pseudo_id": patient_pseudo_id(f"MRN{i % PATIENTS:08d}", key) if ok else None,
                         "study_date": dt.date(1970, 1, 1) + dt.timedelta(days=18000 + int(rng.integers(0, 2500))) if ok else None,
                         "age": 70.0, "sex": "F", "bytes_read": 65536 if status != "unlinked" else 0})
        return pa.Table.from_pylist(rows, schema=FILM_SCHEMA)

    def source(store, cfg, scratch, key):
        import ray

        blocks = max(4, n // 5000)
        ds = ray.data.range(n, override_num_blocks=blocks).map_batches(make, batch_size=5000, batch_format="numpy",
                                                                      fn_kwargs={"key": key})
        return ds, {"objects": n, "bytes": n * 2_000_000}

    return source


def run_one(n: int, registry: str, out: str) -> dict:
    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "bench-link-key-0123456789")
    import ray

    from kneescreen.link.config import LinkConfig
    from kneescreen.link.run import run_link

    # A fresh local instance: never attach to a cluster another process started on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)

    t0 = time.perf_counter()
    audit = run_link(LinkConfig(archive="sim://archive", registry=registry, out=out), film_source=simulated_films(n))
    wall = time.perf_counter() - t0
    return {"objects": n, "registry_rows": audit["registry_rows"]["rows"], "linked": audit["counts"]["linked"],
            "partitions": audit["partitions"], "wall_s": round(wall, 1), "timing_s": audit["timing_s"],
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "accounted": audit["counts"]["accounted"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--registry-rows", type=int, default=300_000)
    ap.add_argument("--work", default="/tmp/kneescreen-link-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "link_scale.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    args = ap.parse_args(argv)
    work = pathlib.Path(args.work)
    registry = work / f"registry-{args.registry_rows}.csv"
    if args.one:
        print(json.dumps(run_one(args.one, str(registry), str(work / f"out-{args.one}"))))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    if not registry.exists():
        write_registry(registry, args.registry_rows)
    results = []
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--registry-rows", str(args.registry_rows),
                               "--work", str(work)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        ratio = results[-1]["driver_peak_rss_mb"] / results[0]["driver_peak_rss_mb"]
        print(f"driver peak RSS {results[-1]['objects']:,} vs {results[0]['objects']:,} objects: {ratio:.2f}x")
    pathlib.Path(args.out).write_text(json.dumps({"results": results, "command": " ".join(["python", "bench/link_scale.py",
                                                  *(argv or sys.argv[1:])])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

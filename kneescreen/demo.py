"""`kneescreen demo`: the main job on embedded defaults, as far as the built stages reach.

Today: synthesise a knee archive with planted bad files, inspect every object with the reader,
and build a leakage-audited split of the real dev set (or of the synthetic archive when the dev
set is absent). Training and screening join here as those stages land.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pathlib

from kneescreen.datasets import SplitConfig, run_split
from kneescreen.inspect import run_inspect
from kneescreen.synth import SynthConfig, write_archive

_logger = logging.getLogger(__name__)
DEV_SET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray-dev"


def run_demo(out: str = "demo-out", n: int = 200, dev_set: str | None = None) -> int:
    """Run the demo into ``out`` and print a summary. Returns an exit status."""
    root = pathlib.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _logger.info("[1/3] synthesising %d knee radiographs (+ planted bad files) into %s", n, root / "archive")
    summary = write_archive(str(root / "archive"), SynthConfig(
        n=n, seed=0, plant_bad=True, formats=("dicom", "dicom", "dicom", "png", "jpeg")))
    _logger.info("      %d images at %.1f images/s", summary["images"], summary["images_per_s"])
    _logger.info("[2/3] inspecting every object with the reader")
    buf = io.StringIO()
    run_inspect([str(root / "archive" / "images")], out=buf)
    (root / "inspect.jsonl").write_text(buf.getvalue())
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    outcome = collections.Counter(r["error_code"] or "ok" for r in rows)
    dev = pathlib.Path(dev_set) if dev_set else DEV_SET
    source = str(dev) if dev.is_dir() else str(root / "archive")
    _logger.info("[3/3] fingerprint + leakage-free split of %s", source)
    audit = run_split(source, str(root / "split"), SplitConfig())
    s = audit["summary"]
    print()
    print("kneescreen demo summary")
    print(f"  archive   {summary['images']} images + {summary['planted_bad']} planted bad objects "
          f"-> {root / 'archive'}")
    print(f"  inspect   {len(rows)} rows: " + ", ".join(f"{k}={v}" for k, v in sorted(outcome.items())))
    print(f"  split     {s['kept']} of {s['input_items']} images kept, {s['dropped']} dropped, "
          f"exact-duplicate groups {s['exact_duplicate_groups']}, near-duplicate pairs "
          f"{s['near_duplicate_pairs']}, cross-split leaks {s['leaks']}")
    for split, counts in s["split_class_counts"].items():
        print(f"            {split:5s} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"  outputs   {os.path.abspath(out)}/ (archive/, inspect.jsonl, split/split.csv, split/audit.json)")
    return 0 if s["leaks"] == 0 and len(rows) == summary["images"] + summary["planted_bad"] else 1

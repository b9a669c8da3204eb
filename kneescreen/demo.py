"""`kneescreen demo`: the main job on embedded defaults, on this machine, no cloud account.

    1. synthesise a knee archive (DICOM/PNG/JPEG) with planted bad objects and reference labels
    2. train the default ensemble on Ray Train (real knee X-rays from ../shared/data/knee-xray-dev
       when present, else the synthetic archive), calibrate, write the bundle
    3. screen the archive on Ray Data -> predictions, stats, run manifest (Parquet + JSON)
    4. rescan: an unchanged archive finds nothing new
    5. report: HTML + PNG figures from the Parquet output
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import time

from kneescreen.synth import SynthConfig, write_archive

_logger = logging.getLogger(__name__)
DEV_SET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray-dev"
DEMO_KEY = "kneescreen-demo-key-not-for-production"


def run_demo(out: str = "demo-out", n: int = 200, dev_set: str | None = None, epochs: int = 8,
             image_size: int = 160) -> int:
    """Run the demo into ``out`` and print a summary. Returns an exit status."""
    from kneescreen.evaluate import format_table
    from kneescreen.screen import ScreenConfig, run_screen
    from kneescreen.train import MemberSpec, TrainConfig, ensure_ray, run_train

    t0 = time.perf_counter()
    root = pathlib.Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("KNEESCREEN_PSEUDONYM_KEY"):
        _logger.warning("KNEESCREEN_PSEUDONYM_KEY not set: the demo uses a fixed demo key; "
                        "production runs must set their own secret")
        os.environ["KNEESCREEN_PSEUDONYM_KEY"] = DEMO_KEY
    ensure_ray()
    _logger.info("[1/5] synthesising %d knee radiographs (+ planted bad objects) into %s", n, root / "archive")
    synth = write_archive(str(root / "archive"), SynthConfig(
        n=n, seed=0, plant_bad=True, formats=("dicom", "dicom", "dicom", "png", "jpeg")))
    dev = pathlib.Path(dev_set) if dev_set else DEV_SET
    train_source = str(dev) if dev.is_dir() else str(root / "archive")
    _logger.info("[2/5] training the default ensemble on %s", train_source)
    cfg = TrainConfig(members=(MemberSpec("efficientnet_lite0", "gray", "imagenet", image_size),), epochs=epochs,
                      patience=3, num_workers=1, cpus_per_worker=max(1, (os.cpu_count() or 2)),
                      storage_path=str(root / "ray-train"), name="demo")
    trained = run_train(train_source, str(root / "bundle"), cfg)
    _logger.info("[3/5] screening %s", root / "archive" / "images")
    scfg = ScreenConfig(input=str(root / "archive" / "images"), output=str(root / "screening"),
                        bundle=str(root / "bundle"), reference=str(root / "archive" / "labels.csv"),
                        metadata=str(root / "archive" / "labels.csv"))
    first = run_screen(scfg)
    _logger.info("[4/5] rescanning the unchanged archive (incremental)")
    second = run_screen(scfg)
    from kneescreen.report import build_report

    _logger.info("[5/5] writing the report")
    report = build_report(scfg.output, str(root / "report"))
    print()
    print("kneescreen demo summary")
    print(f"  archive    {synth['images']} synthetic images + {synth['planted_bad']} planted bad objects -> {root / 'archive'}")
    print(f"  model      bundle {trained['version']} ({cfg.members[0].name}, {image_size}px) trained on {train_source}")
    print("  held-out test split of the training data:")
    for line in format_table(trained["test"]).splitlines():
        print("    " + line)
    c = first["counts"]
    print(f"  screening  run {first['run_id']}: {c['listed']} objects -> ok {c['ok']}, error {c['error']}, "
          f"skipped {c['skipped']} ({first['throughput_images_per_s']} images/s)")
    print("             error codes: " + ", ".join(f"{k}={v}" for k, v in sorted(first["error_codes"].items())))
    preds = _predictions_summary(scfg.output)
    print(f"             predicted classes: {preds}")
    if train_source != str(root / "archive"):
        print("             (the model learned real knee X-rays; the archive is synthetic, so agreement with its\n"
              "              reference labels says nothing about quality: docs/results.md has the real numbers)")
    c2 = second["counts"]
    print(f"  rescan     run {second['run_id']}: listed {c2['listed']}, already screened {c2['already_screened']}, "
          f"screened {c2['screened']} in {second['timing_s']['total']:.1f}s")
    print(f"  outputs    {root / 'screening'}/ predictions/, stats/, runs/  (query: docs/queries.md)")
    print(f"  report     {report}")
    print(f"  took       {time.perf_counter() - t0:.0f}s")
    ok = c["listed"] == synth["images"] + synth["planted_bad"] and c2["screened"] == 0
    return 0 if ok else 1


def _predictions_summary(output: str) -> str:
    import pyarrow.dataset as pads

    t = pads.dataset(os.path.join(output, "predictions"), format="parquet", partitioning="hive").to_table(
        columns=["status", "predicted_class"]).to_pandas()
    counts = collections.Counter(t.loc[t["status"] == "ok", "predicted_class"])
    return json.dumps(dict(sorted(counts.items())))

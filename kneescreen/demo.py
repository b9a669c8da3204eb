"""`kneescreen demo`: the main job on embedded defaults, on this machine, no cloud account.

    1. synthesise a knee archive (DICOM/PNG/JPEG) with planted bad objects, and a DXA registry
       beside it (raw patient ids, both date formats, bad rows) with known truth
    2. link: pair each DICOM film with the same patient's nearest DXA exam within 365 days
       (`kneescreen link`) -> labels/ + link_audit.json, checked against the truth
    3. train the default ensemble on Ray Train on the linked labels (``--train-on dev``: the real
       knee X-rays of ../shared/data/knee-xray-dev instead), calibrate, write the bundle
    4. screen the archive on Ray Data with the link output as reference -> predictions, stats,
       patients, run manifest (Parquet + JSON); then rescan: an unchanged archive finds nothing new
    5. report: HTML + PNG figures from the Parquet output

Why train on the linked labels by default: it is the path a screening programme takes (its own
archive + its DXA registry), end to end. The real dev set shows a model on real knees, but its
classes are nearly separated by age, and its films are not the archive being screened.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass

import pyarrow.dataset as pads

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import opt
from kneescreen.data.synth import SynthConfig
from kneescreen.data.synth_registry import write_archive_with_registry
from kneescreen.fileio.privacy import ENV_KEY, ENV_KEY_FILE
from kneescreen.link.config import LinkConfig
from kneescreen.link.run import run_link
from kneescreen.report import build_report
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.pipeline import run_screen
from kneescreen.train.config import TrainConfig
from kneescreen.train.evaluate import format_table
from kneescreen.train.run import run_train

_logger = logging.getLogger(__name__)
DEV_SET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-xray-dev"
DEMO_KEY = "kneescreen-demo-key-not-for-production"


@dataclass(frozen=True)
class DemoConfig:
    """``kneescreen demo`` settings: everything has a default."""

    out: str = opt("demo-out", "output folder")
    n: int = opt(200, "synthetic archive size")
    train_on: str = opt("link", "link: the labels `kneescreen link` made from the registry; dev: real knee X-rays "
                        "(--dev-set)", choices=("link", "dev"))
    dev_set: str | None = opt(None, "labelled real knee X-rays for --train-on dev (default ../shared/data/knee-xray-dev)")
    epochs: int = opt(8, "training epochs")
    image_size: int = opt(0, "member input size (0: the architecture's native size)")


def _link(root: pathlib.Path, synth: dict) -> tuple[dict, bool]:
    """Link the archive to its registry; (audit, whether the synthetic truth was recovered)."""
    _logger.info("[2/5] linking %s to the DXA registry %s", root / "archive" / "images", synth["registry"]["registry"])
    audit = run_link(LinkConfig(archive=str(root / "archive" / "images"), registry=synth["registry"]["registry"],
                                out=str(root / "link")))
    truth = synth["registry"]
    ok = (audit["counts"]["linked"] == truth["linked"] and audit["conflicting_patients"] == truth["conflicting_patients"]
          and audit["registry_rows"]["bad"] == truth["bad_rows"] and audit["counts"]["accounted"])
    return audit, ok


def _train(cfg: DemoConfig, root: pathlib.Path) -> tuple[str, TrainConfig, dict]:
    dev = pathlib.Path(cfg.dev_set) if cfg.dev_set else DEV_SET
    source = str(dev) if cfg.train_on == "dev" and dev.is_dir() else str(root / "link")
    _logger.info("[3/5] training the default ensemble on %s", source)
    tcfg = TrainConfig(data=source, out=str(root / "bundle"), epochs=cfg.epochs, image_size=cfg.image_size,
                       patience=3, num_workers=1, cpus_per_worker=max(1, (os.cpu_count() or 2)), name="demo")
    return source, tcfg, run_train(tcfg)


def _print_summary(root, synth, link, link_ok, source, tcfg, trained, first, second, report, t0) -> None:
    print()
    print("kneescreen demo summary")
    print(f"  archive    {synth['images']} synthetic images + {synth['planted_bad']} planted bad objects -> {root / 'archive'}")
    sel = trained["selection"]
    size = f"{tcfg.image_size}px" if tcfg.image_size else "native size"
    c = link["counts"]
    print(f"  link       {c['listed']} objects x {link['registry_rows']['rows']} DXA rows -> linked {c['linked']} "
          f"({', '.join(f'{k} {v}' for k, v in link['classes'].items())}; gap median {link['gap_days']['median']} d), "
          f"unlinked {sum(c['unlinked'].values())}, {link['conflicting_patients']} conflicting patients, "
          f"{sum(link['registry_rows']['bad'].values())} bad rows; synthetic truth "
          f"{'recovered' if link_ok else 'NOT recovered'} -> {root / 'link'}")
    chosen = sel["member_sets"]["sets"][sel["member_sets"]["chosen"]]["members"]
    print(f"  model      bundle {trained['version']} ({', '.join(chosen)}, {size}) trained on {source}")
    print(f"  deployed   {sel['deployed']}: best out-of-fold evidence over {sel['n']} images "
          f"(balanced accuracy {sel['candidates'][sel['deployed']]['balanced_accuracy']:.2f}; rule in the manifest)")
    print("  held-out test split of the training data:")
    for line in format_table(trained["test"], compact=True).splitlines():
        print("    " + line)
    c = first["counts"]
    print(f"  screening  run {first['run_id']}: {c['listed']} objects -> ok {c['ok']}, error {c['error']}, "
          f"skipped {c['skipped']} ({first['throughput_images_per_s']} images/s)")
    print("             error codes: " + ", ".join(f"{k}={v}" for k, v in sorted(first["error_codes"].items())))
    print(f"             predicted classes: {_predictions_summary(str(root / 'screening'))}")
    if source != str(root / "link"):
        print("             (the model learned real knee X-rays; the archive is synthetic, so agreement with its\n"
              "              reference labels says nothing about quality: docs/results.md has the real numbers)")
    c2 = second["counts"]
    print(f"  rescan     run {second['run_id']}: listed {c2['listed']}, already screened {c2['already_screened']}, "
          f"screened {c2['screened']} in {second['timing_s']['total']:.1f}s")
    print(f"  worklist   {_worklist_summary(second, str(root / 'bundle'))}")
    print(f"  outputs    {root / 'screening'}/ predictions/, stats/, patients/, runs/  (query: docs/queries.md)")
    print(f"  report     {report}")
    print(f"  took       {time.perf_counter() - t0:.0f}s")


def run_demo(cfg: DemoConfig = DemoConfig()) -> int:
    """Run the demo into ``cfg.out`` and print a summary. Returns an exit status."""
    t0 = time.perf_counter()
    root = pathlib.Path(cfg.out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    if not os.environ.get(ENV_KEY) and not os.environ.get(ENV_KEY_FILE):
        _logger.warning("%s not set: the demo uses a fixed demo key; production runs must set their own secret", ENV_KEY)
        os.environ[ENV_KEY] = DEMO_KEY
    ensure_ray()
    _logger.info("[1/5] synthesising %d knee radiographs (+ planted bad objects) into %s", cfg.n, root / "archive")
    synth = write_archive_with_registry(str(root / "archive"), SynthConfig(
        n=cfg.n, seed=0, plant_bad=True, formats=("dicom", "dicom", "dicom", "png", "jpeg")))
    link, link_ok = _link(root, synth)
    source, tcfg, trained = _train(cfg, root)
    _logger.info("[4/5] screening %s, then rescanning it unchanged (incremental)", root / "archive" / "images")
    scfg = ScreenConfig(input=str(root / "archive" / "images"), output=str(root / "screening"),
                        bundle=str(root / "bundle"), reference=str(root / "link"),
                        metadata=str(root / "archive" / "labels.csv"))
    first = run_screen(scfg)
    second = run_screen(scfg)
    _logger.info("[5/5] writing the report")
    report = build_report(scfg.output, str(root / "report"))
    _print_summary(root, synth, link, link_ok, source, tcfg, trained, first, second, report, t0)
    ok = link_ok and first["counts"]["listed"] == synth["images"] + synth["planted_bad"] and second["counts"]["screened"] == 0
    return 0 if ok else 1


def _worklist_summary(run: dict, bundle: str) -> str:
    """Patients per triage zone in the run's snapshot, and the bundle's zone thresholds."""
    from kneescreen.fileio.store import Store
    from kneescreen.model.bundle import read_manifest

    zones = pads.dataset(run["patients"], format="parquet", partitioning=None).to_table(
        columns=["triage_zone"]).to_pandas()["triage_zone"].fillna("refer")
    counts = collections.Counter(zones)
    tri = read_manifest(bundle, Store()).triage
    stated = ", ".join(f"{z.zone} {'empty' if z.threshold is None else f'risk {z.threshold:.3f}'}"
                       for z in (tri.rule_out, tri.rule_in)) if tri else "no zones"
    return (f"{len(zones)} patients: rule_out {counts['rule_out']}, refer {counts['refer']}, rule_in "
            f"{counts['rule_in']} ({stated}; report: Referral worklist)")


def _predictions_summary(output: str) -> str:
    t = pads.dataset(os.path.join(output, "predictions"), format="parquet", partitioning="hive").to_table(
        columns=["status", "predicted_class"]).to_pandas()
    counts = collections.Counter(t.loc[t["status"] == "ok", "predicted_class"])
    return json.dumps(dict(sorted(counts.items())))

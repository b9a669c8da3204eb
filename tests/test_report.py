"""`kneescreen report` from real screening output: figures, tables, drift, S3 input."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kneescreen.cli import main
from kneescreen.fileio.store import Store
from kneescreen.report import build_report, trend_rows
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.ledger import committed_runs
from kneescreen.screen.pipeline import run_screen

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def screened(ray_local, small_archive, tiny_bundle, tmp_path_factory):
    root, _ = small_archive
    out = tmp_path_factory.mktemp("screened")
    cfg = ScreenConfig(input=str(root / "images"), output=str(out / "o"), bundle=tiny_bundle,
                       reference=str(root / "labels.csv"), metadata=str(root / "labels.csv"), batch_size=8)
    run_screen(cfg)
    run_screen(cfg)  # a rescan: a second run in the trend
    return str(out / "o")


def test_report_has_every_figure_and_the_metric_table(screened, tmp_path):
    assert main(["report", "--output", screened, "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    for name in ("prevalence", "confusion", "roc_calibration", "errors", "trend", "t_score"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
        assert f"alt='{name}'" in html
    assert len(re.findall(r"data:image/png;base64,", html)) == 6  # self-contained
    # The referral worklist: zones, scans avoided, yield, T-score accuracy, top patients by pseudonym.
    worklist = html[html.index("<h2>Referral worklist</h2>"):]
    assert "DXA scans avoided" in worklist and "per 100 referrals" in worklist and "interval coverage" in worklist
    assert "Highest-risk patients" in worklist and ".dcm" not in worklist and ".png" not in worklist
    assert "Agreement with reference labels" in html and "sensitivity" in html
    # Reference labels and age/sex sidecar: the report says what the image adds, with intervals.
    section = html[html.index("What the radiograph adds over age and sex"):]
    assert "<td>all</td><td>deployed</td>" in section and "<td>all</td><td>image only</td>" in section
    assert re.search(r"<td>[+-]\d\.\d\d \([+-]\d\.\d\d to [+-]\d\.\d\d\)</td>", section)
    # The runs table lists each committed run once: the first screen and the rescan.
    runs_table = html[html.index("<h2>Runs</h2>"):]
    run_ids = [r["run_id"] for r in committed_runs(Store.resolve(), screened)]
    assert len(run_ids) == 2
    assert runs_table.count("<tr><td>") == 2 and all(f"<tr><td>{r}</td>" in runs_table for r in run_ids)


def test_report_from_s3(screened, s3_bucket, tmp_path):
    import pathlib

    from kneescreen.fileio.store import Store

    for p in pathlib.Path(screened).rglob("*"):
        if p.is_file():
            Store.resolve().write_bytes(f"s3://{s3_bucket}/o/{p.relative_to(screened).as_posix()}", p.read_bytes())
    path = build_report(f"s3://{s3_bucket}/o", str(tmp_path))
    assert "Risk class prevalence" in open(path).read()


def test_drift_flag_on_non_overlapping_intervals():
    import pandas as pd

    runs = [{"run_id": f"r{i}", "model_version": "m", "finished_at": f"2026-01-0{i + 1}", "counts": {"screened": 100},
             "throughput_images_per_s": 10.0} for i in range(3)]
    stats = pd.DataFrame([
        {"run_id": f"r{i}", "subgroup_type": "all", "target": "low_bmd", "metric": "prevalence", "value": v,
         "ci_lo": lo, "ci_hi": hi} for i, (v, lo, hi) in enumerate([(0.5, 0.4, 0.6), (0.52, 0.42, 0.62), (0.8, 0.7, 0.88)])])
    assert [r["drift"] for r in trend_rows(runs, stats)] == [False, False, True]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(screened, tmp_path):
    build_report(screened, str(tmp_path))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400", f"file://{tmp_path / 'report.html'}"],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000  # a rendered page with figures, not a blank one

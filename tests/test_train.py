"""Ray Train fine-tuning: a 2-worker DDP run on the tiny model, and resume after a kill."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from kneescreen.model.bundle import load_bundle
from kneescreen.train.config import TrainConfig
from kneescreen.train.run import run_train

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_two_worker_training_writes_a_bundle(ray_local, train_archive, tmp_path):
    cfg = TrainConfig(data=str(train_archive), out=str(tmp_path / "bundle"), members=("test_cnn:gray", "test_cnn:rgb"),
                      weights="none", image_size=0, epochs=2, num_workers=2, batch_size=8,
                      storage_path=str(tmp_path / "runs"), name="t2w", fusion="fuzzy_rank")
    out = run_train(cfg)
    b = load_bundle(str(tmp_path / "bundle"))
    m = b.manifest
    assert out["version"] == b.version and m.predictor == "fused" and m.inputs == ("image", "age", "sex")
    assert [h["epoch"] for h in m.history["test_cnn-gray"]] == [1, 2]
    assert all(mm.temperature > 0 for mm in m.members)
    assert 0 < m.thresholds.low_bmd.threshold <= 1 and m.thresholds.low_bmd.sensitivity >= 0.9
    names = set(out["test"]["predictors"])
    assert {"member:test_cnn-gray", "member:test_cnn-rgb", "image_ensemble:fuzzy_rank", "covariates_only",
            "fused"} <= names
    # Checkpoints of every epoch-end went to the run's storage path.
    assert list((tmp_path / "runs" / "t2w-test_cnn-gray").glob("checkpoint_*"))
    # The split written beside the bundle has no leaks.
    audit = json.loads((tmp_path / "bundle" / "split" / "audit.json").read_text())
    assert audit["summary"]["leaks"] == 0


def test_killed_training_resumes_from_its_checkpoint(train_archive, tmp_path):
    args = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(train_archive), "--out",
            str(tmp_path / "bundle"), "--members", "test_cnn:gray", "--weights", "none", "--epochs", "60",
            "--patience", "100", "--storage-path", str(tmp_path / "runs"), "--name", "killme"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "runs" / "killme-test_cnn-gray"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(run_dir.glob("checkpoint_*"))) < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies mid-training: driver, raylet, workers
    proc.wait(30)
    assert len(list(run_dir.glob("checkpoint_*"))) >= 2, "no checkpoint appeared before the deadline"
    assert not (tmp_path / "bundle" / "manifest.json").exists()
    # Same --name and --storage-path, fewer epochs: Train V2 picks up the latest checkpoint.
    rerun = subprocess.run([*args, "--epochs", "6"], capture_output=True, text=True, env=env,
                           timeout=480, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "resumed from checkpoint after epoch" in log
    epochs = [h["epoch"] for h in load_bundle(str(tmp_path / "bundle")).manifest.history["test_cnn-gray"]]
    assert epochs[-1] == 6 and epochs[0] > 1  # the rerun did not start again from epoch 1

"""Ray Train fine-tuning: a 2-worker DDP run on the tiny model, and resume after a kill."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from kneescreen._private import console
from kneescreen.model.bundle import load_bundle
from kneescreen.train.config import TrainConfig
from kneescreen.train.run import run_train

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_two_worker_training_writes_a_bundle(ray_local, train_archive, tmp_path, monkeypatch):
    """A fine-tuned member (2 DDP workers) and a frozen one; out-of-fold selection over 3 folds.
    The quiet console shows each epoch Ray Train reported (callback -> driver log record)."""
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    log_path = console.setup("train", str(tmp_path / "bundle"), verbose=False)
    cfg = TrainConfig(data=str(train_archive), out=str(tmp_path / "bundle"),
                      members=("test_cnn:gray", "test_cnn:rgb:frozen"), weights="none", image_size=0, epochs=2,
                      num_workers=2, batch_size=8, storage_path=str(tmp_path / "runs"), name="t2w",
                      fusion="fuzzy_rank", oof_folds=3)
    try:
        out = run_train(cfg)
    finally:
        console._reset()
        console._state["quiet"] = False
    shown = tty.getvalue()
    for epoch in (1, 2):
        assert f"training test_cnn-gray: {epoch}/2 epochs" in shown, shown[-2000:]
    assert "test_cnn-gray: epoch 2/2 loss" in pathlib.Path(log_path).read_text()
    b = load_bundle(str(tmp_path / "bundle"))
    m = b.manifest
    sel = m.selection
    assert out["version"] == b.version and sel["deployed"] in sel["candidates"]
    kind = sel["deployed"].split(":")[0]
    assert m.predictor == {"covariates_only": "covariates", "image": "image", "fused": "fused"}[kind]
    # Every fusion rule is a candidate with two members, alone and fused with age and sex.
    assert {"covariates_only", "image:fuzzy_rank", "image:soft", "fused:weighted", "fused:majority"} <= set(sel["candidates"])
    assert sel["n"] == sum(m.training_data["n"][s] for s in ("train", "val")) and sel["folds"] == 3
    assert [h["epoch"] for h in m.history["test_cnn-gray"]] == [1, 2]
    assert [mm.training for mm in m.members] == ["finetune", "frozen"] and all(mm.temperature > 0 for mm in m.members)
    assert 0 < m.thresholds.low_bmd.threshold <= 1 and m.thresholds.low_bmd.sensitivity >= 0.9
    names = set(out["test"]["predictors"])
    assert {"member:test_cnn-gray", "member:test_cnn-rgb", f"image_ensemble:{m.fusion.method}", "covariates_only",
            f"fused:{m.fusion.method}", "deployed"} <= names
    assert set(out["test"]["image_value"]["paired"]) >= {f"fused:{m.fusion.method}", "deployed"}
    # Checkpoints of the deployable run and of each out-of-fold run went to the storage path.
    for run in ("t2w-test_cnn-gray", "t2w-oof0-test_cnn-gray", "t2w-oof2-test_cnn-gray"):
        assert list((tmp_path / "runs" / run).glob("checkpoint_*")), run
    # The split written beside the bundle has no leaks.
    audit = json.loads((tmp_path / "bundle" / "split" / "audit.json").read_text())
    assert audit["summary"]["leaks"] == 0


@pytest.mark.own_cluster  # the job starts its own local Ray and is killed with it
def test_killed_training_resumes_from_its_checkpoint(train_archive, tmp_path):
    args = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(train_archive), "--out",
            str(tmp_path / "bundle"), "--members", "test_cnn:gray", "--weights", "none", "--oof-folds", "3", "--epochs", "60",
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
    # Worker lines go to the run's log file (the console stays quiet without --verbose).
    log = "".join(f.read_text() for f in (tmp_path / "bundle" / "logs").glob("*.log"))
    assert "resumed from checkpoint after epoch" in log
    epochs = [h["epoch"] for h in load_bundle(str(tmp_path / "bundle")).manifest.history["test_cnn-gray"]]
    assert epochs[-1] == 6 and epochs[0] > 1  # the rerun did not start again from epoch 1

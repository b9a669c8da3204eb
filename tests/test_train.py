"""Ray Train fine-tuning: the default recipe's fine-tuned candidate as a 2-worker DDP run on the
tiny model (its member sets chosen out of fold), and resume after a kill."""

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


def _rule_choice(record: dict) -> str:
    """The member set `MEMBER_SET_RULE` picks from the scores the manifest records."""
    sets, base = record["sets"], record["baseline"]
    order = list(sets)
    best = min(order, key=lambda n: (-round(sets[n]["balanced_accuracy"], 9), len(sets[n]["members"]), order.index(n)))
    if best != base and (sets[best]["vs_baseline"]["p_a_better"] or 0.0) < record["confidence"]:
        return base
    return best


def test_default_recipe_offers_a_two_worker_fine_tuned_candidate(ray_local, train_archive, tmp_path, monkeypatch):
    """The default recipe with --finetune-min-films lowered to 10: the frozen default, a fine-tuned
    candidate (2 DDP workers, out of fold over 3 folds) and both are compared by the out-of-fold
    rule, which the manifest records. The quiet console shows each epoch Ray Train reported
    (callback -> driver log record)."""
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    log_path = console.setup("train", str(tmp_path / "bundle"), verbose=False)
    cfg = TrainConfig(data=str(train_archive), out=str(tmp_path / "bundle"), finetune_min_films=10,
                      finetune_members=("test_cnn:gray",), weights="none", image_size=64, epochs=2,
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
    n_dev = sum(m.training_data["n"][s] for s in ("train", "val"))
    assert out["version"] == b.version and sel["deployed"] in sel["candidates"]
    kind = sel["deployed"].split(":")[0]
    assert m.predictor == {"covariates_only": "covariates", "image": "image", "fused": "fused"}[kind]
    # The member sets, each scored out of fold; the deployed one is what the rule picks.
    sets = sel["member_sets"]
    assert sets["n_development_films"] == n_dev >= 10 and sets["baseline"] == "frozen"
    assert {k: v["members"] for k, v in sets["sets"].items()} == {
        "frozen": ["efficientnet_lite0-gray-frozen"], "finetuned": ["test_cnn-gray"],
        "frozen+finetuned": ["efficientnet_lite0-gray-frozen", "test_cnn-gray"]}
    assert all(0 <= v["balanced_accuracy"] <= 1 for v in sets["sets"].values())
    assert sets["chosen"] == _rule_choice(sets)
    assert [mm.name for mm in m.members] == sets["sets"][sets["chosen"]]["members"]
    assert all(mm.temperature > 0 for mm in m.members)
    assert sel["n"] == n_dev and sel["folds"] == 3
    # Every member trained is in the history, chosen or not: the fine-tuned run's epochs are its cost.
    assert [h["epoch"] for h in m.history["test_cnn-gray"]] == [1, 2]
    assert m.history["efficientnet_lite0-gray-frozen"][0]["features"] > 0
    if len(m.members) > 1:  # every fusion rule is a candidate with two members
        assert {"image:fuzzy_rank", "image:soft", "fused:weighted", "fused:majority"} <= set(sel["candidates"])
    assert {"covariates_only", "image:fuzzy_rank"} <= set(sel["candidates"])
    assert 0 < m.thresholds.low_bmd.threshold <= 1 and m.thresholds.low_bmd.sensitivity >= 0.9
    names = set(out["test"]["predictors"])
    assert {*(f"member:{mm.name}" for mm in m.members), f"image_ensemble:{m.fusion.method}", "covariates_only",
            f"fused:{m.fusion.method}", "deployed"} <= names
    assert set(out["test"]["image_value"]["paired"]) >= {f"fused:{m.fusion.method}", "deployed"}
    # One Ray Train run for the member: its checkpoints and every fit's weights (the deployable
    # model, then one per fold) under the storage path, nothing per fold beside it.
    run_dir = tmp_path / "runs" / "t2w-test_cnn-gray"
    assert list(run_dir.glob("checkpoint_*"))
    assert sorted(p.name for p in (run_dir / "fits").iterdir()) == ["final.pt", "oof0.pt", "oof1.pt", "oof2.pt"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("t2w-")) == ["t2w-test_cnn-gray"]
    for fold in range(3):
        assert f"test_cnn-gray oof{fold}: epoch 2/2 loss" in pathlib.Path(log_path).read_text()
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
    history = load_bundle(str(tmp_path / "bundle")).manifest.history["test_cnn-gray"]
    # Every epoch once, those of the killed attempt included (carried in the checkpoint), and the
    # rerun went on from a checkpoint instead of starting again from epoch 1.
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[0]["start_epoch"] == 0 and history[-1]["start_epoch"] > 0

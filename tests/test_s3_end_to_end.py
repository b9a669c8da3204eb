"""Every command reads and writes S3 through one Store named only by ``--endpoint-url``:
images, ImageNet-style weights, the split, Ray Train checkpoints, the bundle, evaluation,
screening output and the report. The driver runs with AWS_ENDPOINT_URL removed from its
environment, so a code path that forgets the endpoint reaches AWS (unreachable here) and fails."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
import torch

from kneescreen.fileio.store import Store
from kneescreen.model import registry

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.own_cluster]  # the driver starts its own
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    store = Store(s3_server)
    bucket = "e2e-endpoint"
    store.client.create_bucket(Bucket=bucket)
    buf = io.BytesIO()
    torch.save(registry.TestCNN().state_dict(), buf)  # a 1000-class "ImageNet" state dict for --weights
    store.write_bytes(f"s3://{bucket}/weights/test_cnn-imagenet.pt", buf.getvalue())
    work = tmp_path_factory.mktemp("s3e2e")
    cwd, report = work / "cwd", work / "report"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "s3_cli_driver.py"), s3_server, bucket, str(report)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    keys = [o.key for o in store.list_objects(f"s3://{bucket}")]
    return store, bucket, keys, cwd, report


def test_training_reads_and_writes_only_through_the_endpoint(s3_run):
    store, bucket, keys, cwd, _ = s3_run
    assert "bundle/manifest.json" in keys and any(k.startswith("bundle/members/") for k in keys)
    assert "bundle/split/split.csv" in keys and "bundle/train_config.yaml" in keys
    # Checkpoints default under the bundle, never in the current directory.
    assert any(k.startswith("bundle/checkpoints/kneescreen-train-test_cnn-gray/checkpoint_") for k in keys)
    assert list(cwd.iterdir()) == []
    manifest = json.loads(store.read_bytes(f"s3://{bucket}/bundle/manifest.json"))
    assert manifest["members"][0]["weights_init"] == f"s3://{bucket}/weights/test_cnn-imagenet.pt"
    assert manifest["training_data"]["n"]["train"] > 0
    assert {"bundle/evaluation/test.json", "bundle/evaluation/test.parquet"} <= set(keys)


def test_screening_and_its_replayed_config_agree(s3_run):
    store, bucket, keys, _, _ = s3_run
    runs = sorted((json.loads(store.read_bytes(f"s3://{bucket}/{k}")) for k in keys if k.startswith("out/runs/")),
                  key=lambda r: r["started_at"])
    assert [r["mode"] for r in runs] == ["incremental", "full"]
    assert runs[0]["counts"]["listed"] == runs[1]["counts"]["screened"] == 48
    fs, path = store.filesystem(f"s3://{bucket}/out/predictions")
    df = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()
    first, replay = (df[df["run_id"] == r["run_id"]].set_index("key").sort_index() for r in runs)
    assert list(first.index) == list(replay.index)
    assert (first["predicted_class"] == replay["predicted_class"]).all()
    assert ((first["p_osteoporosis"] - replay["p_osteoporosis"]).abs().max()) < 1e-6


def test_report_from_s3_output(s3_run):
    *_, report = s3_run
    html = (report / "report.html").read_text()
    assert "Risk class prevalence" in html and html.count("<tr><td>") >= 2

"""A real `ray job submit` against a local head node with Ray 2.60 token auth, S3 in and out."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import _free_port

from kneescreen.io.store import Store
from kneescreen.screen.ledger import committed_runs

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.own_cluster]
ROOT = pathlib.Path(__file__).resolve().parents[1]
RAY = str(pathlib.Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head --block` in its own process group (so teardown stops this head only)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(16))
    # The venv's bin first on PATH, as an activated environment or a container image has it.
    # The pseudonym key as a mounted secret file on the head node, where job drivers run (as the
    # KubeRay manifests do), never in the job's runtime environment.
    key_file = tmp_path / "pseudonym-key"
    key_file.write_text(os.environ["KNEESCREEN_PSEUDONYM_KEY"] + "\n")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "KNEESCREEN_PSEUDONYM_KEY_FILE": str(key_file),
           "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("KNEESCREEN_PSEUDONYM_KEY", None)
    gcs, dash = _free_port(), _free_port()
    # Ray's Unix sockets live under the temp dir; pytest's tmp paths exceed the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=4",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield f"http://127.0.0.1:{dash}", env, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict, entrypoint: list[str], runtime_env: dict) -> subprocess.CompletedProcess:
    deadline = time.time() + 300  # a loaded 2-core CI machine can take minutes
    while True:  # the job agent comes up a few seconds after the head
        proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                               "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
                              env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        busy = "No available agent" in proc.stdout + proc.stderr or "Failed to connect" in proc.stdout + proc.stderr
        if not busy or time.time() > deadline:
            return proc
        time.sleep(2)


def test_ray_job_submit_screens_s3_archive(head_node, s3_server, s3_bucket, small_archive, tiny_bundle):
    address, env, token = head_node
    root, summary = small_archive
    for p in sorted(q for q in (root / "images").rglob("*") if q.is_file()):
        Store.resolve().write_bytes(f"s3://{s3_bucket}/archive/{p.relative_to(root / 'images').as_posix()}", p.read_bytes())
    runtime_env = {
        "excludes": [".venv", ".git", "bench/results", "demo-out", "runs"],
        # The endpoint and test credentials reach the job through its runtime environment (on a
        # cluster: IRSA / instance profile); the pseudonym key comes from the head's secret file.
        "env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION", "AWS_REGION")},
    }
    out = f"s3://{s3_bucket}/results"
    proc = _submit(address, env, ["python", "jobs/screen.py", "--input", f"s3://{s3_bucket}/archive",
                                  "--output", out, "--bundle", tiny_bundle, "--batch-size", "8"], runtime_env)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, proc.stdout[-4000:] + proc.stderr[-2000:]
    runs = committed_runs(Store.resolve(), out)
    assert len(runs) == 1 and runs[0]["counts"]["screened"] == summary["images"] + summary["planted_bad"]
    import pyarrow.parquet as pq

    fs, path = Store.resolve().filesystem(runs[0]["predictions"])
    table = pq.read_table(path, filesystem=fs, partitioning=None)
    assert table.num_rows == runs[0]["counts"]["listed"]
    # The secret is nowhere in what the job API shows (ray job list: entrypoints, runtime envs).
    listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and os.environ["KNEESCREEN_PSEUDONYM_KEY"] not in listed.stdout + listed.stderr
    # Token auth is really on: a client without the token is refused.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = str(token.parent)  # no ~/.ray/auth_token there either
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=no_token, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

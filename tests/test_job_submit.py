"""A real `ray job submit` against a local head node with Ray 2.60 token auth, S3 in and out."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import _free_port, _side_port_flags

from kneescreen.fileio.store import Store
from kneescreen.screen.ledger import committed_runs

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.own_cluster]
ROOT = pathlib.Path(__file__).resolve().parents[1]
RAY = str(pathlib.Path(sys.executable).parent / "ray")


README = ROOT / "README.md"


def readme_local_cluster() -> str:
    """The README's "Local cluster" bash block, as a user pastes it."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Local cluster"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)]


def _adapt(block: str, out: pathlib.Path, gcs: int, dash: int, temp_dir: str) -> str:
    """The README block with the few changes a shared test machine needs, each one checked to
    apply once (a README edit that drops a line the test relies on fails here):

    - the venv is the one running these tests (a worktree need not have its own .venv);
    - outputs go to the test's folder, not the checkout;
    - the head gets free ports, never Ray's defaults (`conftest._side_port_flags`), and a short
      temp dir (Unix socket paths are limited to 107 bytes);
    - ``ray stop`` is left out: it stops every Ray process on the machine, not only this head
      (the fixture stops its own process group instead).
    """
    subs = [
        ("source .venv/bin/activate", f"source {sys.prefix}/bin/activate"),
        ("OUT=$PWD/local-run ", f"OUT={out} "),
        ("ray start --head ", f"ray start --head --port={gcs} --dashboard-port={dash} --temp-dir={temp_dir} "
                              + " ".join(_side_port_flags(head=True)) + " "),
        ("\nray stop\n", "\n"),
    ]
    for old, new in subs:
        assert block.count(old) == 1, f"README's Local cluster block changed: {old!r}"
        block = block.replace(old, new)
    return block


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, s3_server):
    """Runs the README's Local cluster block in a fresh environment (its own HOME, so no
    ~/.ray/auth_token from elsewhere, and no pseudonym key in the environment) and yields
    (dashboard address, the environment the block ended with, its output folder). The head
    node's processes share the block's process group; teardown stops that group only."""
    tmp_path = tmp_path_factory.mktemp("local-cluster")
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    home, out = tmp_path / "home", tmp_path / "local-run"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "VIRTUAL_ENV",
                        "KNEESCREEN_PSEUDONYM_KEY", "KNEESCREEN_PSEUDONYM_KEY_FILE")}
    # `ray job` finds the head here (the README's default is 127.0.0.1:8265, maybe taken on a
    # shared machine); nothing else reads it.
    env.update(HOME=str(home), RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}")
    script = _adapt(readme_local_cluster(), out, gcs, dash, temp_dir) + f"env -0 > {tmp_path / 'env'}\n"
    proc = subprocess.Popen(["bash", "-e", "-x", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-6000:]
        ended = dict(kv.split("=", 1) for kv in (tmp_path / "env").read_text().split("\0") if "=" in kv)
        yield f"http://127.0.0.1:{dash}", ended, out, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict, entrypoint: list[str], runtime_env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_readme_local_cluster_block_works(local_cluster):
    """Train, screen and rescan jobs as the README runs them: the rescan finds nothing new."""
    _, env, out, log = local_cluster
    assert log.count("succeeded") >= 3, log[-4000:]
    assert env["RAY_AUTH_MODE"] == "token" and (pathlib.Path(env["HOME"]) / ".ray" / "auth_token").is_file()
    assert (out / "bundle" / "manifest.json").is_file()
    first, second = committed_runs(Store.resolve(), str(out / "screening"))  # oldest first
    assert first["counts"]["listed"] == second["counts"]["listed"] >= 40  # 40 images + the planted bad files
    assert first["counts"]["screened"] == first["counts"]["listed"]
    assert second["counts"]["screened"] == 0 and second["counts"]["already_screened"] == first["counts"]["listed"]


def test_ray_job_submit_screens_s3_archive(local_cluster, s3_bucket, small_archive, tiny_bundle):
    """The same head, the environment the README block left: S3 in and out, the secret kept out
    of the job API, and a client without the token refused."""
    address, env, local_out, _ = local_cluster
    secret = (local_out / "pseudonym.key").read_text().strip()
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
    assert listed.returncode == 0 and "jobs/screen.py" in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    # Token auth is really on: a client without the token is refused.
    no_token = {**env, "HOME": str(pathlib.Path(env["HOME"]).parent)}  # no ~/.ray/auth_token there
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=no_token, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

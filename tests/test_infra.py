"""infra/: every manifest parses, names files and entrypoints that exist, and its job arguments
are accepted by the job's own parser (run with --dry-run)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _docs():
    for f in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                yield f, doc


def _rayjobs():
    for f, doc in _docs():
        if doc.get("kind") == "RayJob":
            yield f, doc
        if doc.get("kind") == "ConfigMap":  # RayJob templates used by the CronJob
            for value in doc.get("data", {}).values():
                inner = yaml.safe_load(value)
                if inner and inner.get("kind") == "RayJob":
                    yield f, inner


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{pathlib.Path(name).stem}", ROOT / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_manifest_parses():
    kinds = [doc.get("kind") for _, doc in _docs()]
    for kind in ("RayCluster", "RayJob", "CronJob", "ServiceAccount"):
        assert kind in kinds
    assert json.loads((INFRA / "aws" / "iam-policy.json").read_text())["Statement"]


def test_rayjob_entrypoints_exist_and_parse(capsys):
    jobs = list(_rayjobs())
    assert len(jobs) >= 4  # train, screen, scheduled rescan, CronJob template
    for f, job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and (ROOT / argv[1]).is_file(), (f, argv[:2])
        assert _load_job(argv[1]).main([*argv[2:], "--dry-run"]) == 0, f
        resolved = json.loads(capsys.readouterr().out)
        assert resolved, f
        for group in [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "kneescreen"
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["KNEESCREEN_PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kneescreen-pseudonym"


def test_gpu_workers_autoscale():
    cluster = next(doc for _, doc in _docs() if doc.get("kind") == "RayCluster")
    group = cluster["spec"]["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_dockerfile_copies_existing_paths_and_runs_a_job():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src.rstrip("/")).exists(), src
    cmd = json.loads(next(line for line in text.splitlines() if line.startswith("CMD "))[4:])
    assert (ROOT / cmd[1]).is_file()


def test_iam_policy_is_least_privilege():
    policy = json.loads((INFRA / "aws" / "iam-policy.json").read_text())
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert st["Effect"] == "Allow" and all(a.startswith("s3:") and "*" not in a for a in actions)
        assert all(r != "*" and not r.endswith(":::*") for r in resources)
        if any("ARCHIVE_BUCKET" in r for r in resources):
            assert set(actions) <= {"s3:ListBucket", "s3:GetObject"}  # the archive is read-only


def test_cluster_launcher_config():
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes and nodes["gpu_worker"]["max_workers"] >= 1
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())


@pytest.mark.parametrize("job", ["jobs/train.py", "jobs/screen.py", "jobs/rescan.py"])
def test_jobs_show_help(job):
    with pytest.raises(SystemExit) as info:
        _load_job(job).main(["--help"])
    assert info.value.code == 0

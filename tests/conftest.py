"""Shared fixtures: real DICOM files, a real S3 server process, small synthetic archives."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time

import pytest

# A fixed pseudonym key for tests; production reads a secret (kneescreen.fileio.privacy).
os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "test-only-key-0123456789abcdef")
# Ray Train V2's controller polls its workers every 2 s by default; every fine-tuning run in the
# suite (about thirty, most a few seconds of work) waits on that poll to start and to finish.
# Polling faster changes no result, only the idle time (measured: ~17 s -> ~14 s per run here).
# Set before any Ray starts, so the shared instance, jobs and clusters the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

DEV_SET = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "knee-xray-dev")


def dicom_test_files() -> dict[str, str]:
    """pydicom's bundled files plus the pydicom-data package, from disk (never downloaded)."""
    import data_store
    import pydicom

    dirs = [
        os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"),
        os.path.join(os.path.dirname(data_store.__file__), "data"),
    ]
    out = {}
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, "*"))):
            if os.path.isfile(f):
                out.setdefault(os.path.basename(f), f)
    return out


@pytest.fixture(scope="session")
def dicom_files() -> dict[str, str]:
    return dicom_test_files()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _side_port_flags(head: bool) -> list[str]:
    """`ray start` flags giving a test node free ports for what Ray otherwise binds at fixed
    defaults: the dashboard agent (52365) and, on a head, Ray Client (10001). Another Ray on the
    machine (`make test`'s other worker) may hold the defaults, and a node whose agent cannot bind
    has no job API."""
    flags = [f"--dashboard-agent-listen-port={_free_port()}"]
    return flags + [f"--ray-client-server-port={_free_port()}"] if head else flags


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server *process* on 127.0.0.1; yields its endpoint URL and sets the AWS env."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start within 30 s")
    env = {
        "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket for one test."""
    import uuid

    from kneescreen.fileio.store import Store

    name = f"t-{uuid.uuid4().hex[:12]}"
    Store.resolve().client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory):
    """A 24-image synthetic DICOM/PNG/JPEG archive with planted bad files."""
    from kneescreen.data.synth import SynthConfig, write_archive

    out = tmp_path_factory.mktemp("archive")
    summary = write_archive(str(out), SynthConfig(n=24, seed=3, size=128, formats=("dicom", "dicom", "png", "jpeg"),
                                                  plant_bad=True, workers=1))
    return out, summary


@pytest.fixture(scope="session")
def labels(small_archive) -> dict[str, dict]:
    """``small_archive``'s labels.csv rows by key."""
    import csv

    root, _ = small_archive
    with open(root / "labels.csv") as fh:
        return {r["key"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="session")
def planted(small_archive) -> dict[str, str]:
    """``small_archive``'s planted bad objects: key -> the error code they must produce."""
    import csv

    root, _ = small_archive
    with open(root / "planted.csv") as fh:
        return {r["key"]: r["expected"] for r in csv.DictReader(fh)}


@pytest.fixture(scope="session")
def train_archive(tmp_path_factory):
    """A 48-image synthetic DICOM archive (24 patients) for training tests."""
    from kneescreen.data.synth import SynthConfig, write_archive

    out = tmp_path_factory.mktemp("train-archive")
    write_archive(str(out), SynthConfig(n=48, seed=7, size=96, workers=1))
    return out


RAY_CPUS = 2  # logical CPUs of the shared instance, like Ray's own ``ray_start_regular_shared``
_SHARED: dict[str, str] = {}  # the shared instance's GCS address


def _ray_up() -> bool:
    """Whether Ray is initialised in this process (without importing it)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """The session's one local Ray instance (``RAY_CPUS`` logical CPUs), shared by every module
    this process runs (one per xdist worker under `make test`).

    Started on first use and left running for the next module: one start per session, not one
    per module. Tests marked ``own_cluster`` (their own head nodes, or a job killed with its
    cluster) shut this process's instance down first (``pytest_runtest_setup``); the other
    worker's instance may run beside them, so their nodes take free ports (`_side_port_flags`).
    Module scope, not session, so that a module after such a test starts it again here.

    Started after the S3 server so its workers inherit the endpoint and test credentials, the
    way cluster workers get them from their own environment (instance profile, IRSA)."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _SHARED.get("gcs"):
        ray.shutdown()  # not ours (started before the S3 server set the environment): replace it
    if not ray.is_initialized():
        # address="local": a new instance, never a cluster some `ray start` left on this machine.
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
        _SHARED["gcs"] = ray.get_runtime_context().gcs_address
    yield ray


@pytest.fixture(autouse=True)
def _ray_only_with_the_marker(request):
    """A test that starts Ray in this process must carry the ``ray`` marker, so that
    ``make test-fast`` (``-m "not slow and not ray"``) stays Ray-free."""
    before = _ray_up()
    yield
    if not before and _ray_up() and request.node.get_closest_marker("ray") is None:
        pytest.fail("this test started Ray but has no `ray` marker (use the ray_local fixture)", pytrace=False)


def pytest_runtest_setup(item):
    """``own_cluster`` tests get the machine's Ray to themselves: the shared instance goes first."""
    if item.get_closest_marker("own_cluster") and _ray_up():
        sys.modules["ray"].shutdown()


def pytest_sessionfinish(session, exitstatus):
    if _ray_up():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random-weight test_cnn bundle with a fitted stacker: exercises fused and fallback rows."""
    import numpy as np
    import torch

    from kneescreen.model.bundle import save_bundle
    from kneescreen.model.manifest import BundleManifest
    from kneescreen.model.covariates import LogisticModel
    from kneescreen.model.registry import create_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    manifest = {
        "classes": ["normal", "osteopenia", "osteoporosis"],
        "members": [{"architecture": "test_cnn", "input_mode": "gray", "image_size": 64, "mean": [0.5],
                     "std": [0.25], "temperature": 1.0, "weights_init": None}],
        "fusion": {"method": "soft", "weights": None}, "predictor": "fused", "inputs": ["image", "age", "sex"],
        "covariates": {"model": LogisticModel().fit(rng.normal(size=(30, 4)), rng.integers(0, 3, 30), 3).to_dict(),
                       "age_mean": 65.0, "age_sd": 12.0},
        "stacker": {"model": {"kind": "product", "beta": 0.5, "bias": [0.0, 0.1, -0.1]}},
        "thresholds": {"low_bmd": {"threshold": 0.6}, "osteoporosis": {"threshold": 0.3}},
        "triage": {"rule_out": {"zone": "rule_out", "threshold": 0.45}, "rule_in": {"zone": "rule_in", "threshold": 0.8},
                   "prevalence": 0.5},
        "t_score": {"predictor": "covariates", "features": ["age_z", "female", "age_missing", "sex_missing"],
                    "coef": [-0.6, -0.4, 0.0, 0.0], "intercept": -1.2, "half_width": 1.1, "n": 60},
    }
    out = tmp_path_factory.mktemp("bundle")
    save_bundle(str(out), BundleManifest.from_dict(manifest), [create_model("test_cnn", 3, "gray").state_dict()])
    return str(out)


# Tests that start a Ray cluster of their own (head nodes, a job killed with its cluster), in the
# two units of work `make test`'s two workers start with (`pytest_xdist_make_scheduler`), about as
# long as each other (3-4 minutes on 2 cores). Their `own_cluster` markers say the same; the
# collection hook fails if the two ever differ, because the scheduler sees node ids, not markers.
OWN_CLUSTER = {
    "tests/test_multinode.py::": "own_cluster-1",
    "tests/test_job_submit.py::": "own_cluster-1",
    "tests/test_train.py::test_killed_training_resumes_from_its_checkpoint": "own_cluster-2",
    "tests/test_s3_end_to_end.py::": "own_cluster-2",
}


def _own_cluster(nodeid: str) -> str | None:
    """The own-cluster unit of a test, None for a test on the shared instance."""
    return next((unit for prefix, unit in OWN_CLUSTER.items() if nodeid.startswith(prefix)), None)


def pytest_collection_modifyitems(config, items):
    """Markers follow the fixtures, so `-m "not s3"` / `-m "not ray"` select consistently; `gpu`
    tests skip (with the reason) where CUDA is absent.

    Order. In one process (plain `pytest`), `own_cluster` tests run last: the shared Ray starts
    once and stops once. Under pytest-xdist (`make test`: ``-n 2``) they come first, unit by
    unit, and ``slow`` modules next: see `pytest_xdist_make_scheduler`."""
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA device (run on a GPU node: pytest -m gpu)")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"s3_server", "s3_bucket"}:
            item.add_marker(pytest.mark.s3)
        if "ray_local" in fixtures or item.get_closest_marker("own_cluster"):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if bool(item.get_closest_marker("own_cluster")) != bool(_own_cluster(item.nodeid)):
            raise pytest.UsageError(f"{item.nodeid}: its own_cluster marker and conftest.OWN_CLUSTER disagree")
    if not hasattr(config, "workerinput"):  # not an xdist worker
        items.sort(key=lambda item: bool(_own_cluster(item.nodeid)))  # stable
        return
    units = sorted(set(OWN_CLUSTER.values()))
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") and not _own_cluster(item.nodeid)}

    def rank(item) -> tuple:
        unit = _own_cluster(item.nodeid)
        return (units.index(unit), 0) if unit else (len(units), item.module.__name__ not in slow)

    items.sort(key=rank)  # stable


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two xdist workers, each with its own shared Ray instance. Units of work:
    the `own_cluster` tests in two units (`OWN_CLUSTER`), one per worker and scheduled first,
    because they are the longest (together about 8 minutes of one worker on 2 cores): at most two
    test clusters at once, one per worker; every other module is a unit of its own (module
    fixtures are built once), in collection order (``slow`` modules first, so that no long module
    is left for the end). Own clusters share the machine with each other and with the other
    worker's instance: their nodes get free ports (`_side_port_flags`), never Ray's defaults.

    A scheduler, not ``--dist loadgroup``: pytest-xdist 3.8 marks groups by rewriting
    ``item._nodeid``, which pytest 9.2 no longer reads, so its groups are silently ignored."""
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _own_cluster(nodeid) or nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the collection order above
    return Units(config, log)

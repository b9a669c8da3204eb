"""infra/: deployable as written, checked without a Docker engine or a Kubernetes cluster.

- every ray.io manifest (RayCluster, RayJob, RayCronJob, and the RayJob template the CronJob
  creates) validates strictly against the KubeRay v1.7.0 CRDs in ../shared/kuberay-crds
  (unknown fields are errors, as with `kubectl apply --validate=strict`); the old
  `RayJob.spec.schedule` manifest (tests/fixtures) fails;
- every built-in kind validates strictly against the Kubernetes 1.31 OpenAPI schemas that the
  `kubernetes-validate` package ships;
- the cluster-launcher YAML validates against the installed Ray's own ray-schema.json;
- the Dockerfile's base image matches pyproject.toml, its COPY sources exist, and every entry
  point the manifests call exists in the image layout and accepts its arguments (--dry-run);
- token auth is on everywhere, the pseudonym key comes from a mounted Secret, and no secret value
  ships in the repository.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import re
import shlex
import tomllib

import crd_schema
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from referencing import Registry, Resource

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
OLD_SCHEDULED_RAYJOB = ROOT / "tests" / "fixtures" / "rayjob-spec-schedule.yaml"
# Kubernetes minor the built-in kinds are validated against; the CronJob's kubectl image is pinned
# to the same minor (kubectl's version skew policy: within one minor of the API server).
K8S_VERSION = "1.31"
BUILTIN_KINDS = {"CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} "
                                "(../shared is absent in this checkout)")


# --- loading ---------------------------------------------------------------------------------

def _docs():
    """(file, document) for every YAML document under infra/, and the RayJob templates that
    ConfigMaps carry (what the CronJob creates is validated like any other manifest)."""
    for f in sorted(INFRA.rglob("*.yaml")):
        if f.parent.name == "aws":
            continue  # the cluster launcher's config, not a Kubernetes manifest
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            yield f, doc
            if doc.get("kind") == "ConfigMap":
                for value in doc.get("data", {}).values():
                    inner = yaml.safe_load(value)
                    if isinstance(inner, dict) and "apiVersion" in inner:
                        yield f, inner


def _ray_docs():
    return [(f, d) for f, d in _docs() if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _doc_id(item) -> str:
    f, d = item
    meta = d.get("metadata", {})
    return f"{f.name}:{d.get('kind')}:{meta.get('name') or meta.get('generateName')}"


def _job_spec(doc: dict) -> dict:
    """The RayJob spec of a RayJob, or of the RayJobs a RayCronJob creates."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else _job_spec(doc)["rayClusterSpec"]


def _groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _load_job(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    out = {}
    for f in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(f.read_text(), Loader=yaml.CSafeLoader)  # libyaml: the CRDs are large
        out[crd["spec"]["names"]["kind"]] = crd
    assert {"RayCluster", "RayJob", "RayCronJob"} <= set(out), sorted(out)
    return out


def _object_meta_check():
    """ObjectMeta (strict) from the Kubernetes schemas kubernetes-validate ships, plus the API
    server's rule that a new object needs a name or a generateName."""
    base = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    defs = json.loads((base / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ Registry()
    ref = {"$ref": f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    validator = jsonschema.Draft202012Validator(ref, registry=registry)

    def check(meta, path: str) -> list[str]:
        if not isinstance(meta, dict):
            return [f"{path}: must be an object"]
        errors = [f"{path}.{'.'.join(map(str, e.path)) or ''}: {e.message}".replace(".:", ":")
                  for e in validator.iter_errors(meta)]
        if not (meta.get("name") or meta.get("generateName")):
            errors.append(f"{path}: name or generateName is required")
        return errors

    return check


META_CHECK = _object_meta_check()


def _ray_errors(doc: dict, crds: dict) -> list[str]:
    return crd_schema.validate_resource(doc, crds, META_CHECK)


# --- strict schema validation ----------------------------------------------------------------

def test_every_manifest_parses_and_the_kinds_are_all_there():
    kinds = [doc.get("kind") for _, doc in _docs()]
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding",
                 "ConfigMap"):
        assert kind in kinds, kind
    assert not (INFRA / "kuberay" / "rayjob-rescan-scheduled.yaml").exists()  # spec.schedule: no such field
    assert json.loads((INFRA / "aws" / "iam-policy.json").read_text())["Statement"]


@needs_crds
@pytest.mark.parametrize("item", _ray_docs(), ids=_doc_id)
def test_ray_manifest_validates_strictly_against_kuberay_crds(item, crds):
    f, doc = item
    assert _ray_errors(doc, crds) == [], f


@needs_crds
def test_every_ray_manifest_is_checked(crds):
    """The parametrized test above sees all of them: the cluster, both jobs, the cron job and
    the CronJob's template."""
    kinds = sorted(d["kind"] for _, d in _ray_docs())
    assert kinds == ["RayCluster", "RayCronJob", "RayJob", "RayJob", "RayJob"], kinds


@needs_crds
def test_old_spec_schedule_rayjob_fails_validation(crds):
    doc = yaml.safe_load(OLD_SCHEDULED_RAYJOB.read_text())
    errors = _ray_errors(doc, crds)
    assert "spec.schedule: unknown field 'schedule'" in errors, errors


def _mutate(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with the dotted ``path`` set (a missing last key is added);
    ``value is DELETE`` removes it."""
    out = copy.deepcopy(doc)
    node = out
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
        node = node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return out


DELETE = object()
HEAD_CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"
MUTATIONS = [  # (file, kind, path, value, expected error)
    ("rayjob-screen.yaml", "RayJob", f"{HEAD_CONTAINER}.imagePullPolicyy", "Always",
     f"{HEAD_CONTAINER.replace('.0', '[0]')}.imagePullPolicyy: unknown field 'imagePullPolicyy'"),
    ("rayjob-screen.yaml", "RayJob", "spec.rayClusterSpec.authOptions.mode", "tokens",
     "spec.rayClusterSpec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']"),
    ("rayjob-screen.yaml", "RayJob", "spec.rayClusterSpec.authOption", {"mode": "token"},
     "spec.rayClusterSpec.authOption: unknown field 'authOption'"),
    ("rayjob-screen.yaml", "RayJob", f"{HEAD_CONTAINER}.resources.limits.cpu", ["4"],
     f"{HEAD_CONTAINER.replace('.0', '[0]')}.resources.limits.cpu: must be an integer or a string, not list"),
    ("rayjob-screen.yaml", "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.groupName", DELETE,
     "spec.rayClusterSpec.workerGroupSpecs[0].groupName: required field missing"),
    ("rayjob-screen.yaml", "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2**31,
     "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas: 2147483648 is out of int32 range"),
    ("rayjob-screen.yaml", "RayJob", "metadata.labelz", {"a": "b"},
     "metadata: Additional properties are not allowed ('labelz' was unexpected)"),
    ("raycronjob-rescan.yaml", "RayCronJob", "spec.schedule", DELETE, "spec.schedule: required field missing"),
    ("raycronjob-rescan.yaml", "RayCronJob", "spec.concurrencyPolicy", "Forbid",
     "spec.concurrencyPolicy: unknown field 'concurrencyPolicy'"),
    ("raycluster.yaml", "RayCluster", "spec.headGroupSpec.rayStartParams.num-cpus", 0,
     "spec.headGroupSpec.rayStartParams.num-cpus: must be string, not int (0)"),
]


@needs_crds
@pytest.mark.parametrize("file,kind,path,value,expected", MUTATIONS, ids=[m[2].rsplit(".", 1)[-1] for m in MUTATIONS])
def test_strict_validation_catches_mistakes(crds, file, kind, path, value, expected):
    """A test that cannot fail is a defect: typical manifest mistakes are each reported, at their path."""
    doc = next(d for f, d in _ray_docs() if f.name == file and d["kind"] == kind)
    assert _ray_errors(doc, crds) == []
    assert expected in _ray_errors(_mutate(doc, path, value), crds)


def test_validator_structural_schema_rules():
    """The extensions the KubeRay CRDs do not use today but any CRD may: each has its own rule."""
    schema = {"type": "object", "properties": {
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "integer"}},
        "bare": {"type": "object"},
        "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "maybe": {"type": "string", "nullable": True},
        "never": {"type": "string"},
        "res": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {"spec": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
        "items": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
    }}
    ok = {"strict": {"a": "x"}, "open": {"a": "x", "anything": {"goes": 1}}, "map": {"k": 1}, "port": "http",
          "maybe": None, "res": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": 1}},
          "items": [{"name": "a"}, {"name": "b"}], "tags": ["a", "b"]}
    assert crd_schema.validate(ok, schema, "", META_CHECK) == []
    assert crd_schema.validate({"port": 8080}, schema) == []
    bad = {"strict": {"a": "x", "b": 1}, "open": {"a": 1}, "map": {"k": "one"}, "bare": {"z": 1}, "port": 1.5,
           "never": None, "res": {"kind": "Pod", "metadata": {"name": "p", "bogus": 1}, "spec": {"x": 1, "y": 2}},
           "items": [{"name": "a"}, {"name": "a"}], "tags": ["a", "a"]}
    errors = crd_schema.validate(bad, schema, "", META_CHECK)
    assert errors == [
        "strict.b: unknown field 'b'",
        "open.a: must be string, not int (1)",
        "map.k: must be integer, not str ('one')",
        "bare.z: unknown field 'z'",
        "port: must be an integer or a string, not float",
        "never: null is not allowed",
        "res.metadata: Additional properties are not allowed ('bogus' was unexpected)",
        "res.spec.y: unknown field 'y'",
        "res.apiVersion: required in an embedded resource",
        "items: duplicate entries for key {'name': 'a'}",
        "tags: duplicate items in a set",
    ], errors


BUILTIN = [item for item in _docs() if item[1].get("kind") in BUILTIN_KINDS]


@pytest.mark.parametrize("item", BUILTIN, ids=_doc_id)
def test_builtin_kind_validates_strictly_against_kubernetes_schema(item):
    f, doc = item
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, f


def test_builtin_strict_validation_catches_a_typo():
    cron = next(d for _, d in BUILTIN if d["kind"] == "CronJob")
    typo = _mutate(cron, "spec.jobTemplate.spec.template.spec.containers.0.comand", ["kubectl"])
    with pytest.raises(kubernetes_validate.ValidationError, match="comand"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    assert {d["kind"] for _, d in BUILTIN} >= BUILTIN_KINDS - {"Secret"}  # no Secret ships: below


# --- what the manifests say ------------------------------------------------------------------

def test_token_auth_is_on_for_every_ray_cluster():
    clusters = [(f, _cluster_spec(d)) for f, d in _ray_docs()]
    assert len(clusters) == 5
    for f, cluster in clusters:
        assert cluster["authOptions"]["mode"] == "token", f
        major, minor, _ = map(int, cluster["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f  # Ray token auth exists from 2.52
    long_lived = next(d for _, d in _ray_docs() if d["kind"] == "RayCluster")
    # `ray job submit` clients need a token Secret whose name they know (docs/operations.md).
    assert long_lived["spec"]["authOptions"]["secretName"] == "kneescreen-ray-token"


def test_every_cluster_spec_is_the_same():
    """Five copies of one cluster (the long-lived one, train, screen, RayCronJob, CronJob template):
    a fix in one that misses the others is caught here."""
    reference = copy.deepcopy(next(d for _, d in _ray_docs() if d["kind"] == "RayCluster")["spec"])
    del reference["authOptions"]["secretName"]  # only the long-lived cluster's token has a fixed name
    for f, doc in _ray_docs():
        if doc["kind"] != "RayCluster":
            assert _cluster_spec(doc) == reference, _doc_id((f, doc))


def test_gpu_inference_and_cpu_decode_groups_autoscale():
    cluster = next(d for _, d in _ray_docs() if d["kind"] == "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu-decode"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["replicas"] <= g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu
    # Decode capacity is what GPU nodes lack (benchmarks.md): the cpu-decode group can add more
    # cores than all GPU pods hold.
    assert groups["cpu-decode"]["maxReplicas"] * int(cpu["cpu"]) > groups["gpu"]["maxReplicas"] * int(gpu["cpu"])


def test_gpu_workers_request_what_the_sizing_rule_says():
    """The GPU pod per GPU (kneescreen.screen.sizing.gpu_pod_request): the measured node's cores,
    memory for their decode tasks, the actor and raw frames in flight (docs/operations.md)."""
    from kneescreen.screen.sizing import gpu_pod_request

    want = gpu_pod_request()
    assert want == {"cpu": 15, "memory_gib": 56, "gpu": 1}
    for f, doc in _ray_docs():
        gpu = next(g for g in _cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == "gpu")
        resources = gpu["template"]["spec"]["containers"][0]["resources"]
        for kind in ("requests", "limits"):
            assert resources[kind] == {"cpu": str(want["cpu"]), "memory": f"{want['memory_gib']}Gi",
                                       "nvidia.com/gpu": "1"}, _doc_id((f, doc))


def test_pseudonym_key_comes_from_a_mounted_secret_on_the_head_only():
    for f, doc in _ray_docs():
        cluster = _cluster_spec(doc)
        head = cluster["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e for e in head["containers"][0]["env"]}
        path = pathlib.PurePosixPath(env["KNEESCREEN_PSEUDONYM_KEY_FILE"]["value"])
        mounts = {m["name"]: m for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in head["volumes"]}
        mount = next(m for m in mounts.values() if path.parent == pathlib.PurePosixPath(m["mountPath"]))
        secret = volumes[mount["name"]]["secret"]
        assert mount["readOnly"] and secret["secretName"] == "kneescreen-pseudonym", f
        assert any(i["path"] == path.name for i in secret["items"]), f
        assert "KNEESCREEN_PSEUDONYM_KEY" not in env, f  # the variable would hold the secret itself
        for group in cluster["workerGroupSpecs"]:  # only the driver's pod reads the key
            pod = group["template"]["spec"]
            assert not pod.get("volumes") and "PSEUDONYM" not in json.dumps(pod), (f, group["groupName"])
        assert "PSEUDONYM" not in _job_spec(doc).get("runtimeEnvYAML", "") if doc["kind"] != "RayCluster" else True


def test_no_secret_value_ships():
    """No Secret manifest at all: one with a placeholder long enough to pass the key check would
    run production with a public key."""
    assert not [d for _, d in _docs() if d.get("kind") == "Secret"]
    for f in INFRA.rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert "stringData" not in text and "REPLACE_WITH" not in text, f
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert not re.search(r"runtime-env-json[^\n]*PSEUDONYM", ops)  # shown by `ray job list` and the dashboard


def test_kubectl_image_is_a_pinned_existing_tag():
    """Bitnami removed its versioned public kubectl tags in 2025; the Kubernetes project's image at
    a full version (no shell: the CronJob runs kubectl directly) is pinned to the validated minor."""
    text = "\n".join(f.read_text() for f in INFRA.rglob("*.yaml"))
    assert "bitnami" not in text
    images = [c["image"] for _, d in _docs() if d.get("kind") == "CronJob"
              for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]]
    assert len(images) == 1
    m = re.fullmatch(r"registry\.k8s\.io/kubectl:v(\d+)\.(\d+)\.(\d+)", images[0])
    assert m and f"{m[1]}.{m[2]}" == K8S_VERSION, images


# --- the image -------------------------------------------------------------------------------

def _dockerfile() -> dict:
    """The Dockerfile's stages: base image (ARGs resolved), WORKDIR, COPYs (source, dest,
    from-stage), RUN bind mounts (source, from-stage) and CMD."""
    text = re.sub(r"\\\n", " ", (INFRA / "docker" / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0])
            stages.append({"from": image, "workdir": "/", "copies": [], "binds": [], "cmd": None})
        elif op == "WORKDIR":
            stages[-1]["workdir"] = str(pathlib.PurePosixPath(stages[-1]["workdir"]) / rest)
        elif op == "COPY":
            words = shlex.split(rest)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            paths = [w for w in words if not w.startswith("--")]
            dest = str(pathlib.PurePosixPath(stages[-1]["workdir"]) / paths[-1])
            stages[-1]["copies"] += [(src, dest, flags.get("from")) for src in paths[:-1]]
        elif op == "RUN":
            for mount in re.findall(r"--mount=(\S+)", rest):
                opts = dict(o.split("=", 1) for o in mount.split(","))
                if opts.get("type") == "bind":
                    stages[-1]["binds"].append((opts["source"], opts.get("from")))
        elif op == "CMD":
            stages[-1]["cmd"] = json.loads(rest)
    return {"args": args, "stages": stages}


def _in_image(image_path: str) -> pathlib.Path | None:
    """The repository file that the final stage's COPYs put at ``image_path``, if any."""
    final = _dockerfile()["stages"][-1]
    for src, dest, stage in final["copies"]:
        if stage is None and src.endswith("/") and image_path.startswith(dest.rstrip("/") + "/"):
            return ROOT / src / image_path[len(dest.rstrip("/")) + 1:]
    return None


def test_dockerfile_base_image_matches_pyproject():
    df = _dockerfile()
    bases = {s["from"] for s in df["stages"]}
    assert bases == {"rayproject/ray:2.60.0-py311-gpu"}, bases  # build and runtime stages alike
    tag = bases.pop().split(":")[1]
    ray_version, py, flavor = tag.split("-")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{py[2]}.{py[3:]}")
    ray_pin = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert str(ray_pin.specifier) == f"=={ray_version}"
    assert flavor == df["args"]["FLAVOR"] == "gpu"
    assert "--build-arg FLAVOR=cpu" in (INFRA / "docker" / "Dockerfile").read_text()  # the CPU variant


def test_dockerfile_copies_existing_paths_and_installs_a_wheel():
    df = _dockerfile()
    for stage in df["stages"]:
        sources = [(src, from_stage) for src, _, from_stage in stage["copies"]] + stage["binds"]
        for src, from_stage in sources:
            if from_stage is None:  # from the build context: the repository
                assert (ROOT / src.rstrip("/")).exists(), src
    assert ("infra/docker/constraints.txt", None) in df["stages"][-1]["binds"]
    assert ("/tmp/wheels", "wheel") in df["stages"][-1]["binds"]
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "pip wheel" in text and "kneescreen-*.whl" in text and "--constraint" in text
    cmd = df["stages"][-1]["cmd"]
    assert cmd[0] == "python" and _in_image(cmd[1]) and _in_image(cmd[1]).is_file()


def test_constraints_pin_every_runtime_dependency():
    constraints = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert not req.extras, line  # pip refuses extras in a constraints file
            (version,) = [s.version for s in req.specifier if s.operator == "=="]
            constraints[canonicalize_name(req.name)] = version
    deps = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    assert {canonicalize_name(d.name) for d in deps} == set(constraints)
    for dep in deps:
        assert dep.specifier.contains(constraints[canonicalize_name(dep.name)]), dep


def test_entrypoints_exist_in_the_image_and_accept_their_arguments(capsys):
    jobs = [(f, d) for f, d in _ray_docs() if d["kind"] in ("RayJob", "RayCronJob")]
    assert len(jobs) == 4  # train, screen, RayCronJob, the CronJob's template
    for f, doc in jobs:
        argv = shlex.split(_job_spec(doc)["entrypoint"])
        script = _in_image(argv[1])
        assert argv[0] == "python" and script is not None and script.is_file(), (f, argv[:2])
        assert _load_job(script).main([*argv[2:], "--dry-run"]) == 0, f
        assert json.loads(capsys.readouterr().out), f


def test_manifests_and_launcher_run_the_project_image():
    version = PYPROJECT["project"]["version"]
    image = re.compile(rf"ACCOUNT\.dkr\.ecr\.eu-west-1\.amazonaws\.com/kneescreen:{re.escape(version)}-(cpu|gpu)")
    for f, doc in _ray_docs():
        for group in _groups(_cluster_spec(doc)):
            pod = group["template"]["spec"]
            gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            m = image.fullmatch(pod["containers"][0]["image"])
            assert m and m[1] == ("gpu" if gpus else "cpu"), (f, pod["containers"][0]["image"])
    launcher = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    docker = launcher["docker"]
    assert image.fullmatch(docker["head_image"])[1] == "cpu" and image.fullmatch(docker["worker_image"])[1] == "gpu"
    cpu_node = launcher["available_node_types"]["cpu_worker"]
    assert image.fullmatch(cpu_node["docker"]["worker_image"])[1] == "cpu"


# --- cluster launcher, IAM, jobs -------------------------------------------------------------

def test_cluster_launcher_config_validates_against_ray_schema():
    import ray.autoscaler

    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes and nodes["gpu_worker"]["max_workers"] >= 1
    assert nodes["cpu_worker"]["max_workers"] >= 1
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "docker": {**cfg["docker"], "imagee": "x"}}, schema)


def test_cluster_launcher_turns_on_token_auth_and_reads_the_key_from_a_file():
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "~/.ray/auth_token" in cfg["file_mounts"]  # the default path Ray 2.60 reads the token from
    key_file = next(c for c in starts if "--head" in c)
    assert "KNEESCREEN_PSEUDONYM_KEY_FILE=" in key_file and "KNEESCREEN_PSEUDONYM_KEY=" not in key_file


def test_iam_policy_is_least_privilege():
    policy = json.loads((INFRA / "aws" / "iam-policy.json").read_text())
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert st["Effect"] == "Allow" and all(a.startswith("s3:") and "*" not in a for a in actions)
        assert all(r != "*" and not r.endswith(":::*") for r in resources)
        if any("ARCHIVE_BUCKET" in r for r in resources):
            assert set(actions) <= {"s3:ListBucket", "s3:GetObject"}  # the archive is read-only


@pytest.mark.parametrize("job", ["jobs/train.py", "jobs/screen.py", "jobs/rescan.py"])
def test_jobs_show_help(job):
    with pytest.raises(SystemExit) as info:
        _load_job(ROOT / job).main(["--help"])
    assert info.value.code == 0

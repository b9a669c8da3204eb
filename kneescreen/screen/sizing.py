"""Sizing a screening run from measured rates (issue #22): inference actors, their batch, and how
many decode tasks feed them, resolved at run time from the cluster's resources
(``ray.cluster_resources()``) wherever the user set nothing.

CPU runs keep the rule measured on CPUs (benchmarks.md "Screening pipeline on this CPU"): one
1-CPU actor per two cluster CPUs, batch 32, as many decode tasks as Ray Data schedules.

GPU runs (``--use-gpu``): one actor per GPU at batch 256, and at most as many concurrent decode
tasks (one CPU each) as it takes to keep the GPUs at `GPU_TARGET` of their model-only rate: more
would only pile decoded blocks up in the object store, and on an autoscaling cluster the cap is
what the pending decode tasks ask the autoscaler for. Where the cluster has fewer CPUs than that,
the run is decode-bound and the plan says by how much (``bottleneck``, ``describe()``).

The measured rates, and where they were measured:

- `MODEL_RATE`: images/s of one GPU running the bundle's inference code (uint8 in, bf16
  autocast, EfficientNet-Lite0 gray 160 px), per batch size: one NVIDIA H200, torch 2.11 cu130,
  no Ray; `bench/gpu_node_balance.py --n 4000`, docs/benchmarks.md "Decode capacity against a GPU".
- `DECODE_RATE_FULL`: images/s one CPU core reads + decodes + letterboxes of full-size films:
  1 / 28.6 ms for a 3000 x 2500 12-bit DX (docs/benchmarks.md "Reader cost on a full-size
  radiograph", float32, no hash); 16 cores of the H200 node make ~560 images/s. The default,
  because real archives hold full-size films.
- `DECODE_RATE_SMALL`: the same for 256 px synthetic DICOMs: 1,292 images/s on the H200 node's
  16 cores (benchmarks.md, same section), 80.75 per core.

Other decode paths (raw pixels to the device, GPU decode) move work off the CPUs at rates not
measured yet: measure yours with ``bench/gpu_node.py`` and pass ``--decode-rate``.
"""

from __future__ import annotations

import dataclasses
import math

from kneescreen.screen.config import ScreenConfig

MODEL_RATE = {32: 3_615.0, 256: 17_955.0}
DECODE_RATE_FULL = 35.0
DECODE_RATE_SMALL = 1_292.0 / 16
GPU_BATCH = 256  # where the measured GPU rate is 5x the batch-32 one
CPU_BATCH = 32  # a CPU actor's working set (32 x 224^2 activations) stays cache-friendly
GPU_TARGET = 0.9  # keep each GPU busy at this fraction of its model-only rate

# The GPU worker pod, per GPU (infra/kuberay; `gpu_pod_request`): the measured node has 16 cores
# per GPU; one is left to the kubelet and system daemons.
NODE_CPUS_PER_GPU = 16
GIB_PER_DECODE_CPU = 2  # a decode task reserves 512 MiB (pipeline.DECODE_MEMORY); the rest: its worker
ACTOR_GIB = 8  # allowance for an inference actor's host memory: torch, the CUDA context, the ensemble
RAW_FRAME_BYTES = 2_500 * 2_000 * 2  # a full-size 16-bit film, as raw stored pixels
BATCHES_IN_FLIGHT = 4  # raw-frame batches the object store holds per GPU when preprocessing on it
OBJECT_STORE_SHARE = 0.3  # Ray's default object store size: 30% of the pod's memory


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved sizes of a run, and the rates behind them (GPU runs).

    Attributes:
        actors / batch_size: the inference pool and its batch.
        decode_tasks: at most this many concurrent decode tasks (None: Ray Data decides).
        model_rate / decode_rate: images/s of all actors (measured model-only rate) and of
            ``decode_tasks`` cores at the per-core decode rate; None on CPU runs.
        decode_cpus_wanted: cores that keep the GPUs at `GPU_TARGET` of ``model_rate``.
        bottleneck: ``"decode"`` or ``"model"``: which of the two rates is lower.
    """

    actors: int
    batch_size: int
    decode_tasks: int | None = None
    model_rate: float | None = None
    decode_rate: float | None = None
    decode_cpus_wanted: int | None = None
    decode_rate_per_cpu: float | None = None
    bottleneck: str | None = None

    @property
    def expected_rate(self) -> float | None:
        """images/s the slower side allows (None on CPU runs)."""
        if self.model_rate is None or self.decode_rate is None:
            return None
        return min(self.model_rate, self.decode_rate)

    def describe(self) -> str:
        """One line for the run log: the sizes, and on GPU runs what bounds the rate."""
        line = f"{self.actors} actor(s) x batch {self.batch_size}"
        if self.model_rate is None:
            return line
        line += (f", {self.decode_tasks} decode task(s) at {self.decode_rate_per_cpu:g} images/s each: "
                 f"decode ~{self.decode_rate:,.0f} images/s vs model ~{self.model_rate:,.0f} images/s "
                 f"({self.bottleneck}-bound)")
        if self.bottleneck == "decode":
            line += (f"; {self.decode_cpus_wanted} decode CPUs would keep the GPUs at {GPU_TARGET:.0%} "
                     "(add cpu-decode workers, or decode on the GPU)")
        return line


def model_rate(batch: int) -> float:
    """Measured model-only images/s of one GPU at ``batch`` (the nearest measured batch not above
    it; below the smallest, scaled down linearly)."""
    known = sorted(MODEL_RATE)
    below = [b for b in known if b <= batch]
    if not below:
        return MODEL_RATE[known[0]] * batch / known[0]
    return MODEL_RATE[below[-1]]


def resolve_actors(cfg: ScreenConfig, cluster: dict) -> int:
    """The inference pool size: as configured, else sized from the cluster's resources."""
    if cfg.actors is not None:
        return cfg.actors
    if cfg.use_gpu:
        return max(1, int(cluster.get("GPU", 0)))  # none yet (autoscaling from zero): one
    return max(1, int(cluster.get("CPU", 1)) // (2 * max(1, cfg.actor_cpus)))


def plan_screening(cfg: ScreenConfig, cluster: dict) -> Plan:
    """Sizes for a run on a cluster with ``cluster`` resources (``ray.cluster_resources()``);
    settings the user gave win."""
    actors = resolve_actors(cfg, cluster)
    if not cfg.use_gpu:
        return Plan(actors=actors, batch_size=cfg.batch_size or CPU_BATCH, decode_tasks=cfg.decode_tasks)
    batch = cfg.batch_size or GPU_BATCH
    per_cpu = cfg.decode_rate or DECODE_RATE_FULL
    model = actors * model_rate(batch)
    wanted = max(1, math.ceil(GPU_TARGET * model / per_cpu))
    # GPU actors take no CPU (pipeline: num_cpus=0), so every cluster CPU can decode.
    available = max(1, int(cluster.get("CPU", 0)))
    tasks = cfg.decode_tasks or min(wanted, available)
    decode = tasks * per_cpu
    return Plan(actors=actors, batch_size=batch, decode_tasks=tasks, model_rate=model, decode_rate=decode,
                decode_cpus_wanted=wanted, decode_rate_per_cpu=per_cpu,
                bottleneck="decode" if decode < GPU_TARGET * model else "model")


def gpu_pod_request(cpus_per_gpu: int = NODE_CPUS_PER_GPU - 1, raw_frames: bool = True) -> dict:
    """What a GPU worker pod with one GPU requests (infra/kuberay's ``gpu`` group).

    CPUs: all the node offers per GPU (screening on GPUs is decode-bound, and decode tasks on the
    GPU's own node send nothing over the network). Memory: `GIB_PER_DECODE_CPU` per CPU, the
    actor's allowance, and with ``raw_frames`` (decoding or preprocessing on the device) an
    object store (`OBJECT_STORE_SHARE` of the pod) that holds `BATCHES_IN_FLIGHT` batches of
    full-size raw frames.

    Returns:
        ``{"cpu": int, "memory_gib": int, "gpu": 1}``.
    """
    heap = cpus_per_gpu * GIB_PER_DECODE_CPU + ACTOR_GIB
    store = BATCHES_IN_FLIGHT * GPU_BATCH * RAW_FRAME_BYTES / 2**30 if raw_frames else 0.0
    memory = max(heap / (1 - OBJECT_STORE_SHARE), heap + store, store / OBJECT_STORE_SHARE)
    return {"cpu": cpus_per_gpu, "memory_gib": int(math.ceil(memory / 8) * 8), "gpu": 1}

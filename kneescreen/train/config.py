"""Training settings: one frozen dataclass is the source of the CLI flags, the ``--config`` YAML
keys, the defaults and the config written beside the bundle (``train_config.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from kneescreen.config import opt
from kneescreen.errors import KneescreenError
from kneescreen.io.store import join
from kneescreen.model.fusion import FUSION_METHODS
from kneescreen.model.registry import get_spec, list_models


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member to train (resolved from ``TrainConfig.members``)."""

    architecture: str = "efficientnet_lite0"
    input_mode: str = "gray"
    weights: str | None = "imagenet"
    image_size: int | None = None  # default: the architecture's input size

    def size(self) -> int:
        return self.image_size or get_spec(self.architecture).input_size

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.input_mode}"


@dataclass(frozen=True)
class TrainConfig:
    """What `run_train` needs; ``kneescreen train`` and jobs/train.py flags map onto these fields."""

    data: str = opt(help="labelled collection: folder-per-class, folder/prefix with labels.csv, or a labels file")
    out: str = opt(help="bundle folder or s3:// prefix")
    split_dir: str | None = opt(None, "reuse this split (default: <out>/split, created if missing)")
    # The default model: EfficientNet-Lite0 (offline ImageNet weights), gray input, 160 px: the
    # best image member found that trains on a 2-core CPU in minutes (docs/results.md).
    members: tuple[str, ...] = opt(("efficientnet_lite0:gray",),
                                   "architecture:input_mode per member (gray|rgb; see kneescreen.model.registry)")
    weights: str = opt("imagenet", "imagenet | none | path or s3 URI of an ImageNet state dict")
    image_size: int = opt(160, "every member's input size; 160 trains in minutes on a CPU (docs/results.md), "
                               "0 = each architecture's native size (224-299), the better choice on GPUs")
    epochs: int = opt(15, "maximum epochs per member")
    batch_size: int = opt(16, "training batch per worker")
    lr: float = opt(1e-3, "AdamW learning rate (cosine schedule)")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    patience: int = opt(5, "early stopping: epochs without a validation macro-F1 gain")
    num_workers: int = opt(1, "Ray Train workers (DDP)", aliases=("--workers",))
    use_gpu: bool = opt(False, "one GPU per worker, bf16 autocast, NCCL")
    cpus_per_worker: int = opt(1, "CPUs (and torch threads) per worker")
    placement_strategy: str = opt("PACK", "PACK fills a node first; SPREAD puts workers on different nodes",
                                  choices=("PACK", "SPREAD"))
    seed: int = opt(0, "seed for the split, initialisation and augmentation")
    fusion: str = opt("soft", "how member probabilities are combined", choices=FUSION_METHODS)
    target_sensitivity: float = opt(0.9, "low-BMD sensitivity the validation thresholds aim for")
    storage_path: str | None = opt(None, "Ray Train checkpoints, folder or s3:// (default: <out>/checkpoints)")
    name: str = opt("kneescreen-train", "run name: rerunning the same name resumes from its checkpoints")
    max_failures: int = opt(1, "worker failures Ray Train retries from the last checkpoint")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")

    def member_specs(self) -> tuple[MemberSpec, ...]:
        """``members`` parsed and checked.

        Raises:
            KneescreenError: an unknown architecture or input mode, or no members.
        """
        specs = []
        for item in self.members:
            arch, _, mode = item.strip().partition(":")
            if arch not in list_models():
                raise KneescreenError(f"members: unknown architecture {arch!r}; valid: {', '.join(list_models())}")
            if (mode or "gray") not in ("gray", "rgb"):
                raise KneescreenError(f"members: input mode must be gray or rgb, not {mode!r} (in {item!r})")
            weights = None if self.weights in ("none", "") else self.weights
            specs.append(MemberSpec(arch, mode or "gray", weights, self.image_size or None))
        if not specs:
            raise KneescreenError("members: give at least one architecture:input_mode")
        return tuple(specs)

    def checkpoints(self) -> str:
        """Where Ray Train keeps checkpoints: never the current directory unless asked."""
        return self.storage_path or join(self.out, "checkpoints")

    def validate(self) -> None:
        """Refuse settings that would fail later, before any work starts.

        Raises:
            KneescreenError: what is wrong and the flag to change.
        """
        self.member_specs()
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise KneescreenError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.target_sensitivity <= 1:
            raise KneescreenError(f"--target-sensitivity must be in (0, 1], not {self.target_sensitivity}")

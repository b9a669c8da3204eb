"""Training settings: one frozen dataclass is the source of the CLI flags, the ``--config`` YAML
keys, the defaults and the config written beside the bundle (``train_config.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from kneescreen.config import opt
from kneescreen.data.preprocess import VIEWS, input_key
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import join
from kneescreen.model.fusion import FUSION_METHODS
from kneescreen.model.registry import get_spec, list_models


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member to train (resolved from ``TrainConfig.members``)."""

    architecture: str = "efficientnet_lite0"
    input_mode: str = "gray"
    weights: str | None = "imagenet"
    image_size: int | None = None  # default: the architecture's input size
    head: str = "finetune"  # finetune: Ray Train end to end; frozen: ImageNet features + shrinkage head
    view: str = "img"  # img: the letterboxed film; roi / tiles: native-resolution regions (data.preprocess)

    def size(self) -> int:
        return self.image_size or get_spec(self.architecture).input_size

    @property
    def input_key(self) -> str:
        return input_key(self.view, self.size())

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.input_mode}" + ("" if self.view == "img" else f"-{self.view}")


@dataclass(frozen=True)
class TrainConfig:
    """What `run_train` needs; ``kneescreen train`` and jobs/train.py flags map onto these fields."""

    data: str = opt(help="labelled collection: folder-per-class, folder/prefix with labels.csv, or a labels file")
    out: str = opt(help="bundle folder or s3:// prefix")
    split_dir: str | None = opt(None, "reuse this split (default: <out>/split, created if missing)")
    # The default member: EfficientNet-Lite0 (offline ImageNet weights) as a frozen feature
    # extractor with a shrinkage linear head. It fits in seconds on a CPU, so choosing the deployed
    # predictor on out-of-fold predictions over the whole collection stays cheap; fine-tuned
    # members (":finetune") cost one Ray Train run per fold (docs/results.md).
    members: tuple[str, ...] = opt(("efficientnet_lite0:gray:frozen",),
                                   "architecture:input_mode[:finetune|frozen[:img|roi|tiles]] per member "
                                   "(gray|rgb; see kneescreen.model.registry; roi/tiles: native-resolution "
                                   "regions around the knee joint, e.g. spectral_texture:gray:frozen:roi)")
    weights: str = opt("imagenet", "imagenet | none | path or s3 URI of an ImageNet state dict")
    image_size: int = opt(0, "every member's input size; 0 = each architecture's native size (224-299); "
                             "160 makes fine-tuning on a CPU 1.6x faster (docs/benchmarks.md)")
    oof_folds: int = opt(5, "patient-level folds for the out-of-fold predictions that choose the deployed "
                            "predictor (merged from the split's folds)")
    selection_confidence: float = opt(0.9, "paired-bootstrap probability with which a predictor must beat "
                                           "age + sex to be deployed instead of it")
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
    rule_out_npv: float = opt(0.95, "triage: the rule-out zone's NPV whose one-sided 95% lower bound (out of fold) "
                                    "must reach this")
    rule_in_ppv: float = opt(0.95, "triage: the rule-in zone's PPV whose one-sided 95% lower bound (out of fold) "
                                   "must reach this")
    t_score_coverage: float = opt(0.9, "coverage of the split-conformal T-score interval")
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
            parts = item.strip().split(":")
            if len(parts) > 4:
                raise KneescreenError(f"members: at most architecture:input_mode:training:view, not {item!r} "
                                      f"(e.g. efficientnet_lite0:gray:frozen:img)")
            arch, mode, head, view = (parts + ["", "", ""])[:4]
            if arch not in list_models():
                raise KneescreenError(f"members: unknown architecture {arch!r}; valid: {', '.join(list_models())}")
            if (mode or "gray") not in ("gray", "rgb"):
                raise KneescreenError(f"members: input mode must be gray or rgb, not {mode!r} (in {item!r})")
            if (head or "finetune") not in ("finetune", "frozen"):
                raise KneescreenError(f"members: training must be finetune or frozen, not {head!r} (in {item!r})")
            if (view or "img") not in VIEWS:
                raise KneescreenError(f"members: view must be one of {', '.join(VIEWS)}, not {view!r} (in {item!r})")
            weights = None if self.weights in ("none", "") else self.weights
            spec = get_spec(arch)
            if weights == "imagenet" and not spec.offline_weights and spec.torchvision_name is None:
                raise KneescreenError(f"members: no ImageNet weights are published for {arch} (in {item!r}); pass "
                                      f"--weights none (random initialisation) or --weights PATH|s3://URI of a "
                                      f"state dict, or drop {item!r} from --members")
            # --image-size sets whole-image members; native views keep the architecture's size.
            size = self.image_size if (view or "img") == "img" and self.image_size else None
            specs.append(MemberSpec(arch, mode or "gray", weights, size, head or "finetune", view or "img"))
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
        finetuned = any(m.head == "finetune" for m in self.member_specs())
        if self.oof_folds < (3 if finetuned else 2):
            raise KneescreenError(f"--oof-folds must be at least {3 if finetuned else 2} "
                                  f"{'with fine-tuned members ' if finetuned else ''}(train, early-stopping "
                                  f"and scored folds), not {self.oof_folds}")
        if not 0.5 <= self.selection_confidence <= 1:
            raise KneescreenError(f"--selection-confidence must be in [0.5, 1], not {self.selection_confidence}")
        for name in ("rule_out_npv", "rule_in_ppv", "t_score_coverage"):
            if not 0 < getattr(self, name) < 1:
                raise KneescreenError(f"--{name.replace('_', '-')} must be in (0, 1), not {getattr(self, name)}")
        if not 0 < self.target_sensitivity <= 1:
            raise KneescreenError(f"--target-sensitivity must be in (0, 1], not {self.target_sensitivity}")

    def check_io(self, store) -> None:
        """Inputs reachable and the output writable, checked with ``store`` before Ray starts.

        Raises:
            KneescreenError: which path, and what to pass instead.
        """
        if not _reachable(store, self.data):
            raise KneescreenError(f"--data {self.data}: nothing there; pass a folder per class, a folder or "
                                  f"prefix with labels.csv, or a labels file")
        if self.weights not in ("imagenet", "none", "") and not store.exists(self.weights):
            raise KneescreenError(f"--weights {self.weights}: no such file; pass an existing state dict, "
                                  f"imagenet or none")
        if self.split_dir and not store.exists(join(self.split_dir, "split.csv")):
            raise KneescreenError(f"--split-dir {self.split_dir}: no split.csv there; pass the folder "
                                  f"`kneescreen split` wrote, or leave --split-dir out to split into --out")
        probe = join(self.out, ".write-probe")
        try:
            store.write_bytes(probe, b"")
            store.delete(probe)
        except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
            raise KneescreenError(f"--out {self.out}: not writable ({type(e).__name__}: {e}); pass a folder or "
                                  f"s3:// prefix you can write") from e


def _reachable(store, uri: str) -> bool:
    """A file or object, or a folder or prefix with something below it."""
    if store.exists(uri):
        return True
    try:
        page = next(iter(store.list_pages(uri, recursive=False, page_size=1)), None)
    except Exception:  # noqa: BLE001 - unreachable, whatever the reason
        return False
    return page is not None and bool(page.objects or page.dirs)

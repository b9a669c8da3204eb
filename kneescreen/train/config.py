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


# The recipe's defaults (train.recipe). Below FINETUNE_MIN_FILMS development films frozen heads
# win out of fold (docs/results.md) and a fine-tuned candidate costs k+1 trainings (one per fold
# and the deployable one, in one Ray Train run) for nothing; from there on the recipe trains it and
# lets the out-of-fold rule decide.
DEFAULT_MEMBERS = ("efficientnet_lite0:gray:frozen",)
FINETUNE_MEMBERS = ("efficientnet_lite0:gray:finetune",)
FINETUNE_MIN_FILMS = 10_000


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
        return (f"{self.architecture}-{self.input_mode}" + ("" if self.view == "img" else f"-{self.view}")
                + ("-frozen" if self.head == "frozen" else ""))  # as MemberManifest.name


@dataclass(frozen=True)
class TrainConfig:
    """What `run_train` needs; ``kneescreen train`` and jobs/train.py flags map onto these fields."""

    data: str = opt(help="labelled collection: folder-per-class, folder/prefix with labels.csv, or a labels file")
    out: str = opt(help="bundle folder or s3:// prefix")
    split_dir: str | None = opt(None, "reuse this split (default: <out>/split, created if missing)")
    # Empty (the default): the recipe (train.recipe): DEFAULT_MEMBERS, EfficientNet-Lite0 (offline
    # ImageNet weights) as a frozen feature extractor with a shrinkage linear head, which fits in
    # seconds on a CPU; from FINETUNE_MIN_FILMS development films on, also fine-tuned candidates
    # (one Ray Train run per fold, docs/operations.md "Fine-tuned candidates"), chosen out of fold.
    members: tuple[str, ...] = opt((), "architecture:input_mode[:finetune|frozen[:img|roi|tiles]] per member "
                                       "(gray|rgb; see kneescreen.model.registry; roi/tiles: native-resolution "
                                       "regions around the knee joint, e.g. spectral_texture:gray:frozen:roi); "
                                       "given, exactly these are trained; empty (default): the recipe, "
                                       f"{','.join(DEFAULT_MEMBERS)} plus --finetune-members candidates from "
                                       "--finetune-min-films development films on")
    finetune_min_films: int = opt(FINETUNE_MIN_FILMS, "the recipe offers --finetune-members (alone and with the "
                                                      "frozen default, chosen out of fold) from this many "
                                                      "development (non-test) films on; 0 = never")
    finetune_members: tuple[str, ...] = opt(FINETUNE_MEMBERS, "the recipe's fine-tuned candidates, same grammar as "
                                                              "--members (training must be finetune)")
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
    use_gpu: bool = opt(False, "one GPU per worker, bf16 autocast, channels-last, NCCL")
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
        """``members`` parsed and checked; the recipe's frozen default (`DEFAULT_MEMBERS`) when empty.

        Raises:
            KneescreenError: an unknown architecture, input mode, training or view, or weights
                the architecture cannot have.
        """
        return tuple(self._spec(item, "--members") for item in self.members or DEFAULT_MEMBERS)

    def finetune_specs(self) -> tuple[MemberSpec, ...]:
        """``finetune_members`` parsed and checked (each must be fine-tuned).

        Raises:
            KneescreenError: a bad member string, a frozen one, or none.
        """
        specs = tuple(self._spec(item, "--finetune-members") for item in self.finetune_members)
        for item, spec in zip(self.finetune_members, specs):
            if spec.head != "finetune":
                raise KneescreenError(f"--finetune-members: {item!r} is not fine-tuned; write "
                                      f"{spec.architecture}:{spec.input_mode}:finetune:{spec.view}, or set "
                                      f"--finetune-min-films 0 to train only frozen members")
        if not specs:
            raise KneescreenError("--finetune-members: give at least one, or --finetune-min-films 0 for none")
        return specs

    def offers_finetuning(self) -> bool:
        """Whether the recipe may add fine-tuned candidates (no explicit ``--members``, threshold > 0)."""
        return not self.members and self.finetune_min_films > 0

    def _spec(self, item: str, flag: str) -> MemberSpec:
        parts = item.strip().split(":")
        if len(parts) > 4:
            raise KneescreenError(f"{flag}: at most architecture:input_mode:training:view, not {item!r} "
                                  f"(e.g. efficientnet_lite0:gray:frozen:img)")
        arch, mode, head, view = (parts + ["", "", ""])[:4]
        if arch not in list_models():
            raise KneescreenError(f"{flag}: unknown architecture {arch!r}; valid: {', '.join(list_models())}")
        if (mode or "gray") not in ("gray", "rgb"):
            raise KneescreenError(f"{flag}: input mode must be gray or rgb, not {mode!r} (in {item!r})")
        if (head or "finetune") not in ("finetune", "frozen"):
            raise KneescreenError(f"{flag}: training must be finetune or frozen, not {head!r} (in {item!r})")
        if (view or "img") not in VIEWS:
            raise KneescreenError(f"{flag}: view must be one of {', '.join(VIEWS)}, not {view!r} (in {item!r})")
        weights = None if self.weights in ("none", "") else self.weights
        spec = get_spec(arch)
        if weights == "imagenet" and not spec.offline_weights and spec.torchvision_name is None:
            raise KneescreenError(f"{flag}: no ImageNet weights are published for {arch} (in {item!r}); pass "
                                  f"--weights none (random initialisation) or --weights PATH|s3://URI of a "
                                  f"state dict, or drop {item!r} from {flag}")
        # --image-size sets whole-image members; native views keep the architecture's size.
        size = self.image_size if (view or "img") == "img" and self.image_size else None
        return MemberSpec(arch, mode or "gray", weights, size, head or "finetune", view or "img")

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
        if self.finetune_min_films < 0:
            raise KneescreenError(f"--finetune-min-films must be at least 0 (0 = never), not {self.finetune_min_films}")
        offered = self.offers_finetuning() and bool(self.finetune_specs())
        finetuned = offered or any(m.head == "finetune" for m in self.member_specs())
        if self.oof_folds < (3 if finetuned else 2):
            raise KneescreenError(f"--oof-folds must be at least {3 if finetuned else 2} "
                                  f"{'with fine-tuned members ' if finetuned else ''}(train, early-stopping "
                                  f"and scored folds), not {self.oof_folds}"
                                  + ("; or pass --finetune-min-films 0" if offered else ""))
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

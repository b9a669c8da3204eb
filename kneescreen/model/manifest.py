"""The bundle manifest as frozen dataclasses: the one place a manifest is parsed and serialised.

``manifest.json`` keeps the layout of format ``kneescreen-bundle/1`` (nested JSON objects with
the field names below), so bundles written before these types existed load unchanged. Parsing is
strict: a missing required field or an unknown one is a `KneescreenError` that says which, since
a silently ignored field in a medical model (a threshold, a fusion weight) changes predictions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field

from kneescreen.errors import KneescreenError
from kneescreen.labels import CLASSES

FORMAT = "kneescreen-bundle/1"


@dataclass(frozen=True)
class MemberManifest:
    """One ensemble member: how to build it, feed it and calibrate it."""

    architecture: str
    input_mode: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_init: str | None = None
    temperature: float = 1.0
    file: str | None = None  # weights file inside the bundle, set by `save_bundle`
    # "finetune": trained end to end; "frozen": ImageNet backbone + shrinkage linear head
    # (kneescreen.model.frozen). Both load and run the same way.
    training: str = "finetune"
    # What the member sees (`kneescreen.data.preprocess.VIEWS`): "img" the letterboxed film,
    # "roi" / "tiles" native-resolution regions around the located knee joint.
    view: str = "img"

    @property
    def name(self) -> str:
        # "-frozen" keeps a frozen member apart from the same network fine-tuned (train.recipe's
        # frozen+finetuned set holds both) in histories, evaluation rows and file names.
        return (f"{self.architecture}-{self.input_mode}" + ("" if self.view == "img" else f"-{self.view}")
                + ("-frozen" if self.training == "frozen" else ""))

    @property
    def input_key(self) -> str:
        """The batch column this member reads (``img_160``, ``roi_128``, ...)."""
        return f"{self.view}_{self.image_size}"


@dataclass(frozen=True)
class FusionManifest:
    method: str = "soft"  # kneescreen.model.fusion.FUSION_METHODS
    weights: tuple[float, ...] | None = None  # member weights for "weighted"


@dataclass(frozen=True)
class CovariateManifest:
    """The age/sex model (`LogisticModel.to_dict`) and its feature standardisation."""

    model: dict
    age_mean: float = 65.0
    age_sd: float = 12.0
    features: tuple[str, ...] = ("age_z", "female", "age_missing", "sex_missing")


@dataclass(frozen=True)
class StackerManifest:
    """The fused model (`ProductStacker.to_dict`): covariate x image probabilities."""

    model: dict
    inputs: tuple[str, ...] = ("covariate_model_probs", "image_ensemble_probs")
    fit_on: str = "validation"


@dataclass(frozen=True)
class Threshold:
    threshold: float
    target_sensitivity: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    note: str | None = None


@dataclass(frozen=True)
class Thresholds:
    low_bmd: Threshold
    osteoporosis: Threshold


@dataclass(frozen=True)
class TriageZone:
    """One triage zone's threshold and what it achieved out of fold (`kneescreen.triage`)."""

    zone: str  # rule_out (risk < threshold) | rule_in (risk >= threshold)
    threshold: float | None = None  # None: the zone is empty (``reason`` says why)
    target: float = 0.95  # NPV (rule_out) / PPV (rule_in) the lower bound must reach
    confidence: float = 0.95  # one-sided Clopper-Pearson confidence of that bound
    n: int = 0  # out-of-fold rows in the zone
    k: int = 0  # of them correct (normal for rule_out, low BMD for rule_in)
    value: float | None = None  # achieved NPV / PPV
    lower: float | None = None  # its lower bound
    fraction: float = 0.0  # share of the out-of-fold rows triaged into the zone
    rate_positive: float | None = None  # P(zone | low BMD), to restate the value at another prevalence
    rate_negative: float | None = None  # P(zone | normal)
    reason: str | None = None


@dataclass(frozen=True)
class TriageManifest:
    """Rule-out / rule-in thresholds on the deployed low-BMD risk and the prevalence they assume."""

    rule_out: TriageZone
    rule_in: TriageZone
    prevalence: float | None = None  # out-of-fold low-BMD prevalence the NPV / PPV hold at
    n: int = 0
    n_positive: int = 0
    confidence: float = 0.95
    score: str = "low-BMD risk of the deployed predictor, pooled out-of-fold"


@dataclass(frozen=True)
class TScoreManifest:
    """The T-score estimate (`kneescreen.model.tscore`); ``predictor`` None: no estimate (``reason``)."""

    predictor: str | None = None  # covariates | image | fused
    features: tuple[str, ...] = ()
    coef: tuple[float, ...] = ()
    intercept: float = 0.0
    age_mean: float = 65.0
    age_sd: float = 12.0
    half_width: float | None = None  # split-conformal; None: too few rows for the coverage
    coverage: float = 0.9
    n: int = 0  # training rows with a reference T-score
    selection: dict | None = None
    reason: str | None = None


@dataclass(frozen=True)
class BundleManifest:
    """Everything but the weights: members, fusion, calibration, covariates, thresholds, lineage."""

    members: tuple[MemberManifest, ...]
    thresholds: Thresholds
    classes: tuple[str, ...] = CLASSES
    fusion: FusionManifest = FusionManifest()
    predictor: str = "image"  # covariates | image | fused: what screening deploys (model.selection)
    inputs: tuple[str, ...] = ("image",)
    covariates: CovariateManifest | None = None
    stacker: StackerManifest | None = None
    # Each predictor's validation-chosen low-BMD threshold, so evaluations compare predictors
    # at the same target sensitivity (the deployed one's is `thresholds.low_bmd`).
    predictor_thresholds: dict = field(default_factory=dict)
    # How `predictor` was chosen: rule, every candidate's out-of-fold metrics and its paired-
    # bootstrap difference against covariates_only (kneescreen.model.selection.select).
    selection: dict | None = None
    # Added after format 1 first shipped: optional, so older bundles load (and hash) unchanged.
    triage: TriageManifest | None = None
    t_score: TScoreManifest | None = None
    training_data: dict | None = None
    train_config: dict | None = None
    history: dict | None = None
    files: dict = field(default_factory=dict)  # weights file -> sha256
    format: str = FORMAT
    version: str | None = None

    @property
    def sizes(self) -> list[int]:
        """Letterbox sizes of the whole-image members."""
        return sorted({m.image_size for m in self.members if m.view == "img"})

    @property
    def input_keys(self) -> list[str]:
        """Every member input column (`MemberManifest.input_key`), whole-image and native views."""
        return sorted({m.input_key for m in self.members})

    @property
    def views(self) -> tuple[str, ...]:
        """The native-resolution input keys (decode them with `DecodeSpec.views`)."""
        return tuple(k for k in self.input_keys if not k.startswith("img_"))

    def low_bmd_threshold(self, predictor: str) -> float:
        """One predictor's low-BMD threshold (the deployed predictor's when it has none)."""
        return float(self.predictor_thresholds.get(predictor, self.thresholds.low_bmd.threshold))

    def to_dict(self) -> dict:
        """JSON-ready dict (None-valued optional sections left out, as format 1 wrote them)."""
        return _to_json(self)

    def with_version(self) -> BundleManifest:
        """This manifest with ``version`` set to the content hash of everything else."""
        return dataclasses.replace(self, version=content_version(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> BundleManifest:
        """Parse a manifest dict.

        Raises:
            KneescreenError: wrong format, a missing required field, an unknown field, or a value
                of the wrong kind; the message names the field.
        """
        if data.get("format", FORMAT) != FORMAT:
            raise KneescreenError(f"{where}: bundle format {data.get('format')!r}, expected {FORMAT!r}; "
                                  "this kneescreen cannot read it (retrain or upgrade kneescreen)")
        return _from_json(cls, data, where)


def content_version(manifest: dict) -> str:
    """16 hex digits of sha256 over the manifest body (everything but ``version``/``created``)."""
    body = {k: v for k, v in manifest.items() if k not in ("version", "created")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(cls, data, where: str):
    if not isinstance(data, dict):
        raise KneescreenError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # Written by older code than the dataclasses; carried in no field and never read.
    unknown = sorted(set(data) - names - {"created"})
    if unknown:
        raise KneescreenError(f"{where}: unknown field(s) {unknown}; written by a newer kneescreen? "
                              f"known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise KneescreenError(f"{where}: missing required field {f.name!r}")
    return cls(**kwargs)


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_json(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KneescreenError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    expected = origin or tp
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise KneescreenError(f"{where}: expected {getattr(expected, '__name__', expected)}, "
                              f"got {type(value).__name__} {value!r:.40}")
    return value

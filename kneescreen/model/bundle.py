"""The model bundle: ``manifest.json`` + member weights, content-addressed and verified on load.

Layout (a folder or an s3:// prefix)::

    manifest.json            members, fusion, calibration, covariate models, thresholds, metrics
    members/0-<arch>-<mode>.pt   state dicts (tensors only)

``version`` is a content hash over the manifest body and every file's sha256, so two bundles
with the same version are the same model. Loading re-hashes every file, refuses a mismatch
(a tampered or half-copied bundle), and reads weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kneescreen.data.knee.views import view_inputs
from kneescreen.data.preprocess import letterbox
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES
from kneescreen.model.covariates import (
    LogisticModel,
    ProductStacker,
    covariate_features,
)
from kneescreen.model.forward import instance_logits
from kneescreen.model.fusion import apply_temperature, fuse
from kneescreen.model.manifest import BundleManifest, content_version
from kneescreen.model.registry import create_model
from kneescreen.model.tscore import predict_t_score
from kneescreen.triage import assign_zones

_logger = logging.getLogger(__name__)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_bundle(dest: str, manifest: BundleManifest, member_states: list[dict], store: Store | None = None) -> str:
    """Write weights, then the manifest (last, so a half-written bundle has no manifest).

    Returns:
        The bundle version.
    """
    store = store or Store.resolve()
    members, files = [], {}
    for i, (member, state) in enumerate(zip(manifest.members, member_states)):
        name = f"members/{i}-{member.name}.pt"
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
        data = buf.getvalue()
        store.write_bytes(join(dest, name), data)
        members.append(dataclasses.replace(member, file=name))
        files[name] = _sha(data)
    saved = dataclasses.replace(manifest, members=tuple(members), files=files, version=None).with_version()
    store.write_bytes(join(dest, "manifest.json"), json.dumps(saved.to_dict(), indent=2).encode())
    return saved.version


@dataclass
class Prediction:
    probs: np.ndarray  # (n, 3) final calibrated probabilities
    pred: np.ndarray  # (n,) class index
    low_bmd_score: np.ndarray  # P(osteopenia) + P(osteoporosis)
    low_bmd_flag: np.ndarray
    osteoporosis_flag: np.ndarray
    predictor: np.ndarray  # per row: the deployed predictor, or "image" when age or sex is missing
    covariates_imputed: np.ndarray
    member_probs: list[np.ndarray] = field(default_factory=list)
    image_probs: np.ndarray | None = None
    covariate_probs: np.ndarray | None = None  # the age/sex model's, NaN where age or sex is missing
    # rule_out / refer / rule_in at the manifest's triage thresholds (None: bundle without triage)
    triage_zone: np.ndarray | None = None
    # T-score estimate and split-conformal interval (NaN: the bundle has no T-score estimate)
    t_score_est: np.ndarray | None = None
    t_score_lo: np.ndarray | None = None
    t_score_hi: np.ndarray | None = None


class Bundle:
    """A verified manifest with its models, ready for inference.

    Build it with `load_bundle` (from storage) or `Bundle.from_states` (from state dicts in
    memory: training, cross-validation, screening actors).
    """

    def __init__(self, manifest: BundleManifest, models: list[torch.nn.Module], device: str = "cpu"):
        self.manifest = manifest
        self.models = models
        self.device = device
        cov, stacker = manifest.covariates, manifest.stacker
        self.covariate_model = LogisticModel.from_dict(cov.model) if cov else None
        self.stacker = ProductStacker.from_dict(stacker.model) if stacker else None

    @classmethod
    def from_states(cls, manifest: BundleManifest, states: list[dict], device: str = "cpu") -> Bundle:
        """Build every member from its state dict (strict keys) and put it in eval mode."""
        models = []
        for spec, state in zip(manifest.members, states, strict=True):
            model = create_model(spec.architecture, len(manifest.classes), spec.input_mode, weights=None)
            model.load_state_dict(state, strict=True)
            models.append(model.to(device).eval())
        return cls(manifest, models, device)

    @property
    def version(self) -> str:
        return self.manifest.version or "unsaved"

    @property
    def sizes(self) -> list[int]:
        """Letterbox sizes of the whole-image members (``img_<size>`` inputs)."""
        return self.manifest.sizes

    @property
    def views(self) -> tuple[str, ...]:
        """Native-resolution inputs the members need (``roi_<s>``, ``tiles_<s>``)."""
        return self.manifest.views

    def states(self) -> list[dict]:
        """CPU state dicts of the members (to ship to Ray actors through the object store)."""
        return [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models]

    def prepare(self, image: np.ndarray, pixel_spacing=None) -> dict:
        """One decoded radiograph -> every member input (``img_<s>`` letterboxes and the native views).

        Raises:
            DecodeError: ``joint_not_found`` when a native view needs the joint and none is found.
        """
        out = {f"img_{s}": letterbox(image, s) for s in self.sizes}
        out.update(view_inputs(image, pixel_spacing, self.views))
        return out

    @staticmethod
    def _input(batches: dict, spec) -> np.ndarray:
        # An int key is shorthand for a whole-image size (``{160: imgs}`` == ``{"img_160": imgs}``).
        if spec.input_key in batches:
            return batches[spec.input_key]
        if spec.view == "img" and spec.image_size in batches:
            return batches[spec.image_size]
        raise KneescreenError(f"member {spec.name} needs input {spec.input_key!r}; got {sorted(map(str, batches))}")

    @torch.inference_mode()
    def member_logits(self, batches: dict, batch_size: int = 32) -> list[np.ndarray]:
        """Each member's logits; ``batches`` maps input keys (`BundleManifest.input_keys`) to uint8
        arrays or tensors (already on the model's device with ``--preprocess device``), (n, s, s)
        or multi-instance (n, k, s, s) (instances mean-pooled)."""
        out = []
        for spec, model in zip(self.manifest.members, self.models):
            arr = self._input(batches, spec)
            logits = []
            for i in range(0, len(arr), batch_size):
                x = arr[i : i + batch_size]
                x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))).to(self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
                    logits.append(instance_logits(model, x, spec.input_mode, spec.mean, spec.std).float().cpu().numpy())
            out.append(np.concatenate(logits) if logits else np.zeros((0, len(CLASSES))))
        return out

    def image_ensemble(self, member_probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probs, pred) of the bundle's fusion rule over calibrated member probabilities."""
        fusion = self.manifest.fusion
        return fuse(fusion.method, member_probs, fusion.weights)

    def covariate_probs(self, ages, sexes) -> tuple[np.ndarray, np.ndarray]:
        """(age/sex model probabilities, per-row imputed flag); requires a covariate model."""
        cov = self.manifest.covariates
        x, imputed = covariate_features(ages, sexes, cov.age_mean, cov.age_sd)
        return self.covariate_model.predict_proba(x), imputed

    def predict(self, batches: dict[int, np.ndarray], ages=None, sexes=None) -> Prediction:
        """Calibrated ensemble prediction for a batch (``batches``: input key -> uint8 arrays, see
        `member_logits`)."""
        return self.predict_logits(self.member_logits(batches), ages, sexes)

    def predict_logits(self, logits: list[np.ndarray], ages=None, sexes=None) -> Prediction:
        """`predict` from the members' logits computed elsewhere (Ray Data tasks in training)."""
        n = len(logits[0])
        member_probs = [apply_temperature(lg, spec.temperature) for lg, spec in zip(logits, self.manifest.members)]
        image_probs, image_pred = self.image_ensemble(member_probs)
        probs, pred = image_probs.copy(), image_pred.copy()
        predictor = np.full(n, "image", dtype=object)
        imputed = np.ones(n, bool)
        kind = self.manifest.predictor
        cov_out = None
        if self.covariate_model is not None:
            p_cov, imputed = self.covariate_probs([None] * n if ages is None else ages,
                                                  [None] * n if sexes is None else sexes)
            cov_out = np.where(imputed[:, None], np.nan, p_cov)
        if cov_out is not None and (kind == "covariates" or (kind == "fused" and self.stacker is not None)):
            chosen = self.stacker.predict_proba(p_cov, image_probs) if kind == "fused" else p_cov
            # Missing age or sex: fall back to the image ensemble for that row (flagged).
            use = ~imputed
            probs[use] = chosen[use]
            pred[use] = chosen[use].argmax(1)
            predictor[use] = kind
        th, triage = self.manifest.thresholds, self.manifest.triage
        low = probs[:, 1] + probs[:, 2]
        zones = assign_zones(low, triage.rule_out.threshold, triage.rule_in.threshold) if triage else None
        est, lo, hi = predict_t_score(self.manifest.t_score, [None] * n if ages is None else ages,
                                      [None] * n if sexes is None else sexes, image_probs)
        return Prediction(
            probs=probs, pred=pred, low_bmd_score=low,
            low_bmd_flag=low >= th.low_bmd.threshold,
            osteoporosis_flag=probs[:, 2] >= th.osteoporosis.threshold,
            predictor=predictor, covariates_imputed=imputed, member_probs=member_probs, image_probs=image_probs,
            covariate_probs=cov_out, triage_zone=zones, t_score_est=est, t_score_lo=lo, t_score_hi=hi,
        )


def read_manifest(uri: str, store: Store) -> BundleManifest:
    """Read, verify (content version) and parse a bundle's ``manifest.json``.

    Raises:
        KneescreenError: no manifest, an edited one, or one this version cannot parse.
    """
    try:
        raw = json.loads(store.read_bytes(join(uri, "manifest.json")))
    except FileNotFoundError:
        raise KneescreenError(f"{uri}: no manifest.json; not a kneescreen bundle (train one with `kneescreen train`)") from None
    if content_version(raw) != raw.get("version"):
        raise KneescreenError(f"{uri}: manifest content does not match its version {raw.get('version')}; "
                              "the manifest was edited after the bundle was written")
    return BundleManifest.from_dict(raw, where=f"{uri}/manifest.json")


def _read_state(uri: str, manifest: BundleManifest, file: str, store: Store) -> dict:
    data = store.read_bytes(join(uri, file))
    expected = manifest.files.get(file)
    if _sha(data) != expected:
        raise KneescreenError(f"{uri}: {file} sha256 {_sha(data)[:12]}... does not match the manifest's "
                              f"{str(expected)[:12]}...; refusing a tampered or incomplete bundle")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unsafe or corrupt pickle is refused, never run
        raise KneescreenError(f"{uri}: {file} is not a plain tensor state dict "
                              f"({type(exc).__name__}); refusing to load it") from None


def load_bundle(uri: str, device: str = "cpu", store: Store | None = None) -> Bundle:
    """Load and verify a bundle.

    Raises:
        KneescreenError: missing manifest, unknown format, or any file whose sha256 (or the
            version) does not match: the bundle was modified or copied incompletely.
    """
    store = store or Store.resolve()
    manifest = read_manifest(uri, store)
    states = [_read_state(uri, manifest, spec.file, store) for spec in manifest.members]
    bundle = Bundle.from_states(manifest, states, device)
    _logger.info("loaded bundle %s (%d members, predictor %s)", manifest.version, len(states), manifest.predictor)
    return bundle

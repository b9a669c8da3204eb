"""The model bundle: ``manifest.json`` + member weights, content-addressed and verified on load.

Layout (a folder or an s3:// prefix)::

    manifest.json            members, fusion, calibration, covariate models, thresholds, metrics
    members/0-<arch>-<mode>.pt   state dicts (tensors only)

``version`` is a content hash over the manifest body and every file's sha256, so two bundles
with the same version are the same model. Loading re-hashes every file, refuses a mismatch
(a tampered or half-copied bundle), and reads weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kneescreen import storage
from kneescreen.covariates import LogisticModel, ProductStacker, covariate_features
from kneescreen.errors import KneescreenError
from kneescreen.fusion import apply_temperature, fuse
from kneescreen.labels import CLASSES
from kneescreen.models import create_model
from kneescreen.preprocess import letterbox, to_input

_logger = logging.getLogger(__name__)
FORMAT = "kneescreen-bundle/1"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("version", "created")}
    return _sha(json.dumps(body, sort_keys=True).encode())[:16]


def save_bundle(dest: str, manifest: dict, member_states: list[dict], endpoint: str | None = None) -> str:
    """Write weights, then the manifest (last, so a half-written bundle has no manifest).

    Returns:
        The bundle version.
    """
    manifest = copy.deepcopy(manifest)
    manifest["format"] = FORMAT
    files = {}
    for i, (member, state) in enumerate(zip(manifest["members"], member_states)):
        name = f"members/{i}-{member['architecture']}-{member['input_mode']}.pt"
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
        data = buf.getvalue()
        storage.write_bytes(storage.join(dest, name), data, endpoint)
        member["file"] = name
        files[name] = _sha(data)
    manifest["files"] = files
    manifest["version"] = _version(manifest)
    storage.write_bytes(storage.join(dest, "manifest.json"), json.dumps(manifest, indent=2).encode(), endpoint)
    return manifest["version"]


@dataclass
class Prediction:
    probs: np.ndarray  # (n, 3) final calibrated probabilities
    pred: np.ndarray  # (n,) class index
    low_bmd_score: np.ndarray  # P(osteopenia) + P(osteoporosis)
    low_bmd_flag: np.ndarray
    osteoporosis_flag: np.ndarray
    predictor: np.ndarray  # per row: "fused" or "image" (fallback when covariates are missing)
    covariates_imputed: np.ndarray
    member_probs: list[np.ndarray] = field(default_factory=list)
    image_probs: np.ndarray | None = None


class Bundle:
    """A loaded, verified bundle ready for inference."""

    def __init__(self, manifest: dict, models: list[torch.nn.Module], device: str = "cpu"):
        self.manifest = manifest
        self.models = models
        self.device = device
        self.version = manifest["version"]
        cov = manifest.get("covariates")
        self.covariate_model = LogisticModel.from_dict(cov["model"]) if cov else None
        st = manifest.get("stacker")
        self.stacker = ProductStacker.from_dict(st["model"]) if st else None

    @property
    def sizes(self) -> list[int]:
        return sorted({m["image_size"] for m in self.manifest["members"]})

    def prepare(self, image: np.ndarray) -> dict[int, np.ndarray]:
        """One decoded radiograph -> uint8 letterboxed arrays at each member's size."""
        return {s: letterbox(image, s) for s in self.sizes}

    @torch.inference_mode()
    def member_logits(self, batches: dict[int, np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        out = []
        for spec, model in zip(self.manifest["members"], self.models):
            arr = batches[spec["image_size"]]
            logits = []
            for i in range(0, len(arr), batch_size):
                x = to_input(torch.from_numpy(np.ascontiguousarray(arr[i : i + batch_size])).to(self.device),
                             spec["input_mode"], spec["mean"], spec["std"])
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
                    logits.append(model(x).float().cpu().numpy())
            out.append(np.concatenate(logits) if logits else np.zeros((0, len(CLASSES))))
        return out

    def predict(self, batches: dict[int, np.ndarray], ages=None, sexes=None) -> Prediction:
        """Calibrated ensemble prediction for a batch (``batches``: size -> (n, s, s) uint8)."""
        n = len(next(iter(batches.values())))
        logits = self.member_logits(batches)
        member_probs = [apply_temperature(lg, spec["temperature"]) for lg, spec in zip(logits, self.manifest["members"])]
        fusion = self.manifest["fusion"]
        image_probs, image_pred = fuse(fusion["method"], member_probs, fusion.get("weights"))
        probs, pred = image_probs.copy(), image_pred.copy()
        predictor = np.full(n, "image", dtype=object)
        imputed = np.ones(n, bool)
        if self.stacker is not None and self.manifest.get("predictor") == "fused":
            ages = [None] * n if ages is None else list(ages)
            sexes = [None] * n if sexes is None else list(sexes)
            cov = self.manifest["covariates"]
            x, imputed = covariate_features(ages, sexes, cov["age_mean"], cov["age_sd"])
            fused = self.stacker.predict_proba(self.covariate_model.predict_proba(x), image_probs)
            # Missing age or sex: fall back to the image ensemble for that row (flagged).
            use = ~imputed
            probs[use] = fused[use]
            pred[use] = fused[use].argmax(1)
            predictor[use] = "fused"
        th = self.manifest["thresholds"]
        low = probs[:, 1] + probs[:, 2]
        return Prediction(
            probs=probs, pred=pred, low_bmd_score=low,
            low_bmd_flag=low >= th["low_bmd"]["threshold"],
            osteoporosis_flag=probs[:, 2] >= th["osteoporosis"]["threshold"],
            predictor=predictor, covariates_imputed=imputed, member_probs=member_probs, image_probs=image_probs,
        )


def load_bundle(uri: str, device: str = "cpu", endpoint: str | None = None) -> Bundle:
    """Load and verify a bundle.

    Raises:
        KneescreenError: missing manifest, unknown format, or any file whose sha256 (or the
            version) does not match: the bundle was modified or copied incompletely.
    """
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json"), endpoint))
    except FileNotFoundError:
        raise KneescreenError(f"{uri}: no manifest.json; not a kneescreen bundle (train one with `kneescreen train`)") from None
    if manifest.get("format") != FORMAT:
        raise KneescreenError(f"{uri}: bundle format {manifest.get('format')!r}, expected {FORMAT!r}")
    if _version(manifest) != manifest.get("version"):
        raise KneescreenError(f"{uri}: manifest content does not match its version {manifest.get('version')}; "
                              "the manifest was edited after the bundle was written")
    models = []
    for spec in manifest["members"]:
        data = storage.read_bytes(storage.join(uri, spec["file"]), endpoint)
        expected = manifest["files"].get(spec["file"])
        if _sha(data) != expected:
            raise KneescreenError(f"{uri}: {spec['file']} sha256 {_sha(data)[:12]}... does not match the manifest's "
                                  f"{str(expected)[:12]}...; refusing a tampered or incomplete bundle")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unsafe or corrupt pickle is refused, never run
            raise KneescreenError(f"{uri}: {spec['file']} is not a plain tensor state dict "
                                  f"({type(exc).__name__}); refusing to load it") from None
        model = create_model(spec["architecture"], len(manifest["classes"]), spec["input_mode"], weights=None)
        model.load_state_dict(state, strict=True)
        models.append(model.to(device).eval())
    _logger.info("loaded bundle %s (%d members, predictor %s)", manifest["version"], len(models), manifest.get("predictor"))
    return Bundle(manifest, models, device)

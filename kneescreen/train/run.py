"""`run_train`: split -> out-of-fold predictions -> deployed predictor -> bundle -> test evaluation.

    split.csv --decode (Ray Data tasks, shared decoder)--> uint8 inputs per input key, in the object
      store (train.data.TrainingData; the driver keeps keys, labels, folds, ages)
      -> the member sets (train.recipe: --members, or the frozen default plus fine-tuned
         candidates from --finetune-min-films development films on); each member once, on
         every non-test image, patient-level folds (train.oof):
           frozen members: features once, shrinkage head per fold; fine-tuned members: one
           TorchTrainer run per fold; the age/sex model per fold
      -> pooled out-of-fold predictions (model.ensemble, model.selection): temperatures, fusion
         weights, cross-fitted fused model, the deployed predictor (never worse than age + sex
         by the manifest's rule), thresholds; per member set, the set chosen by the same rule
         (model.member_sets)
      -> final members (frozen heads on all non-test images; fine-tuned on train with the
         validation split for early stopping) -> bundle -> held-out test evaluation
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import ray

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import dump_yaml, to_flat_dict
from kneescreen.data.split.run import SplitConfig, run_split
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.model.bundle import save_bundle
from kneescreen.model.ensemble import CovariateFit, Targets, fit_ensemble, member_manifest
from kneescreen.model.manifest import BundleManifest
from kneescreen.model.member_sets import choose_member_set
from kneescreen.train.config import TrainConfig
from kneescreen.train.data import TrainingData, load_split_data
from kneescreen.train.evaluate import evaluate_bundle
from kneescreen.train.oof import FeatureCache, covariate_out_of_fold, member_out_of_fold
from kneescreen.train.recipe import input_keys, plan

_logger = logging.getLogger(__name__)


def training_fingerprint(rows: list[dict]) -> str:
    """16 hex digits over (pixel hash, label, split) of every row: same data, same print."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["pixel_hash"] or ""):
        h.update(f"{r['pixel_hash']}:{r['label']}:{r['split']}\n".encode())
    return h.hexdigest()[:16]


def _load_split_data(cfg: TrainConfig, store: Store) -> tuple[str, TrainingData]:
    """(training fingerprint, decoded rows); the split is read as Arrow in a Ray task, never as
    row dicts on the driver (`train.data.load_split_data`)."""
    split_dir = cfg.split_dir or join(cfg.out, "split")
    if not store.exists(join(split_dir, "split.csv")):
        run_split(cfg.data, split_dir, SplitConfig(seed=cfg.seed), store=store)
    data, info = load_split_data(split_dir, input_keys(cfg), store)
    return info["fingerprint"], data


def check_cluster(cfg: TrainConfig) -> None:
    """What only the connected cluster can tell, checked before any data is read.

    Raises:
        KneescreenError: ``--use-gpu`` on a cluster without a GPU.
    """
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise KneescreenError("--use-gpu, but the Ray cluster has no GPU: leave --use-gpu out to train on CPUs, "
                              "or connect to a cluster with GPUs (RAY_ADDRESS)")


def fit_bundle(data: TrainingData, dev_mask: np.ndarray, cfg: TrainConfig, store: Store,
               cache: FeatureCache | None = None) -> tuple[BundleManifest, list, dict]:
    """Members, out-of-fold selection and the manifest from the ``dev_mask`` rows of ``data``.

    The member sets come from the recipe (`train.recipe.plan`: ``--members``, or the frozen
    default plus fine-tuned candidates from ``--finetune-min-films`` development films on);
    `model.member_sets` chooses among them out of fold and records why in
    ``selection["member_sets"]``.

    Used by `run_train` (every non-test image) and by cross-validation (all but the outer fold;
    ``cache`` holds frozen features of all of ``data``, computed once for every outer fold).

    Returns:
        (manifest without files/version, member state dicts, per-member training notes)
    """
    dev = data.where(dev_mask)
    folds = dev["fold"] % cfg.oof_folds
    # Fine-tuned members' deployable run: early stopping on one inner fold, training on the rest.
    last = folds.max()
    final = (dev.where(folds != last), dev.where(folds == last))
    recipe = plan(cfg, len(folds))
    _logger.info("member sets %s: %s", ", ".join(recipe.sets), recipe.reason)
    # Every member once (out of fold, then its deployable run), whichever sets hold it.
    trained = {spec: member_out_of_fold(spec, dev, folds, cfg, store, final, cache) for spec in recipe.members}
    cov = covariate_out_of_fold(dev, folds)
    cov_fit = CovariateFit(cov[2], cov[3], cov[4], cov[0], cov[1]) if cov else None
    targets = Targets(npv=cfg.rule_out_npv, ppv=cfg.rule_in_ppv, t_score_coverage=cfg.t_score_coverage)
    fitted = {name: fit_ensemble([member_manifest(s.architecture, s.input_mode, s.size(), s.weights, s.head, s.view)
                                  for s in specs], [trained[s][0] for s in specs], dev["label"], folds, cov_fit,
                                 cfg.fusion, cfg.target_sensitivity, cfg.selection_confidence, targets,
                                 dev["t_score"], dev["age"], dev["sex"], with_oof=True)
              for name, specs in recipe.sets.items()}
    chosen, record = choose_member_set(fitted, dev["label"], cfg.selection_confidence)
    manifest = fitted[chosen][0]
    manifest = dataclasses.replace(manifest, selection={**manifest.selection, "member_sets": {
        **record, "reason": recipe.reason, "n_development_films": int(len(folds))}})
    _logger.info("member set %s; deployed predictor: %s (out-of-fold balanced accuracy %.2f over %d images)",
                 chosen, manifest.selection["deployed"],
                 manifest.selection["candidates"][manifest.selection["deployed"]]["balanced_accuracy"], len(folds))
    # Notes of every member trained, chosen or not: a fine-tuned candidate's history is its cost.
    return manifest, [trained[s][1] for s in recipe.sets[chosen]], {s.name: trained[s][2] for s in recipe.members}


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}


def _history(notes: dict) -> dict:
    """Per member: the fine-tuning run's epoch metrics, or a frozen head's fit notes (L2, features)."""
    return {name: [_scalars(h) for h in note["history"]] if "history" in note else [_scalars(note)]
            for name, note in notes.items()}


def run_train(cfg: TrainConfig, store: Store | None = None) -> dict:
    """Split (or reuse a split), fit members and the deployed predictor, write and evaluate the bundle.

    Returns:
        Summary: bundle path and version, the selection record, the test-split evaluation.

    Raises:
        KneescreenError: invalid settings (before any work) or unreadable inputs.
    """
    cfg.validate()
    store = store or Store.resolve(cfg.endpoint_url)
    cfg.check_io(store)
    ensure_ray()
    check_cluster(cfg)
    fingerprint, data = _load_split_data(cfg, store)
    dev_mask = data["split"] != "test"
    _logger.info("fitting on %d images (%d folds), testing on %d", int(dev_mask.sum()), cfg.oof_folds,
                 int((~dev_mask).sum()))
    manifest, states, notes = fit_bundle(data, dev_mask, cfg, store)
    manifest = dataclasses.replace(
        manifest, train_config=to_flat_dict(cfg), history=_history(notes),
        training_data={"source": cfg.data, "fingerprint": fingerprint,
                       "n": {s: int((data["split"] == s).sum()) for s in ("train", "val", "test")}})
    version = save_bundle(cfg.out, manifest, states, store)
    store.write_bytes(join(cfg.out, "train_config.yaml"), dump_yaml(cfg).encode())
    _logger.info("bundle %s written to %s", version, cfg.out)
    report = evaluate_bundle(cfg.out, data.where(~dev_mask), store=store)
    store.write_bytes(join(cfg.out, "evaluation", "test.json"), json.dumps(report, indent=2, default=float).encode())
    return {"bundle": cfg.out, "version": version, "selection": manifest.selection, "test": report}

"""`run_train`: split -> fine-tune every member on Ray Train -> fit the ensemble -> bundle.

    split.csv --decode (Ray Data tasks, shared decoder)--> uint8 letterboxed images per size
      -> per member: TorchTrainer(DDP; gloo on CPU, NCCL + bf16 autocast + channels_last on GPU)
         train shard per worker, full validation set on every worker (identical early stopping)
         checkpoint every epoch to <out>/checkpoints/<name>-<member>: a rerun resumes
      -> driver: temperature per member, fusion weights, covariate model, stacker, thresholds
         (kneescreen.model.ensemble, fit on validation) -> bundle -> test-split evaluation

Members train one after another; each TorchTrainer uses the whole ScalingConfig.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import ray
import torch
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import dump_yaml, to_flat_dict
from kneescreen.data.datasets import SplitConfig, load_split, run_split
from kneescreen.io.store import Store, join
from kneescreen.labels import CLASSES
from kneescreen.model.bundle import save_bundle
from kneescreen.model.ensemble import fit_ensemble, member_manifest
from kneescreen.model.registry import normalisation
from kneescreen.train.config import MemberSpec, TrainConfig
from kneescreen.train.data import load_arrays, subset
from kneescreen.train.evaluate import evaluate_bundle
from kneescreen.train.loop import train_loop

_logger = logging.getLogger(__name__)


def train_member(member: MemberSpec, train: dict, val: dict, cfg: TrainConfig, run_name: str, store: Store):
    """Fine-tune one member with TorchTrainer. Returns (best state dict, metrics history)."""
    size = member.size()
    key = f"img_{size}"
    train_ds = ray.data.from_items([{key: im, "label": int(y)} for im, y in zip(train["images"][size], train["label"])])
    val_ds = ray.data.from_items([{key: im, "label": int(y)} for im, y in zip(val["images"][size], val["label"])])
    mean, std = normalisation(member.architecture, member.input_mode)
    fs, storage_path = store.filesystem(cfg.checkpoints())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "architecture": member.architecture, "input_mode": member.input_mode, "weights": member.weights,
            "store": store, "size": size, "mean": mean, "std": std, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "patience": cfg.patience, "seed": cfg.seed,
            "threads": cfg.cpus_per_worker, "member": member.name,
            "class_counts": np.bincount(train["label"], minlength=len(CLASSES)).tolist(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{member.name}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return saved["best_state"], history


def training_fingerprint(rows: list[dict]) -> str:
    """16 hex digits over (pixel hash, label, split) of every row: same data, same print."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["pixel_hash"] or ""):
        h.update(f"{r['pixel_hash']}:{r['label']}:{r['split']}\n".encode())
    return h.hexdigest()[:16]


def _load_split_arrays(cfg: TrainConfig, store: Store) -> tuple[list[dict], dict]:
    split_dir = cfg.split_dir or join(cfg.out, "split")
    if not store.exists(join(split_dir, "split.csv")):
        run_split(cfg.data, split_dir, SplitConfig(seed=cfg.seed), store=store)
    rows = load_split(split_dir, store)
    sizes = sorted({m.size() for m in cfg.member_specs()})
    return rows, load_arrays(rows, sizes, store)


def run_train(cfg: TrainConfig, store: Store | None = None) -> dict:
    """Split (or reuse a split), train every member, fit the ensemble, write and evaluate the bundle.

    Returns:
        Summary: bundle path and version, test-split evaluation report.

    Raises:
        KneescreenError: invalid settings (before any work) or unreadable inputs.
    """
    cfg.validate()
    store = store or Store.resolve(cfg.endpoint_url)
    ensure_ray()
    rows, arrays = _load_split_arrays(cfg, store)
    train, val, test = (subset(arrays, arrays["split"] == s) for s in ("train", "val", "test"))
    _logger.info("training on %d images, validating on %d, testing on %d", len(train["label"]), len(val["label"]),
                 len(test["label"]))
    specs = cfg.member_specs()
    states, histories = [], {}
    for member in specs:
        _logger.info("member %s: fine-tuning on %d worker(s)%s", member.name, cfg.num_workers,
                     " with GPU" if cfg.use_gpu else "")
        state, history = train_member(member, train, val, cfg, f"{cfg.name}-{member.name}", store)
        states.append(state)
        histories[member.name] = [{k: v for k, v in h.items() if isinstance(v, (int, float, str))} for h in history]
    members = [member_manifest(m.architecture, m.input_mode, m.size(), m.weights) for m in specs]
    manifest = dataclasses.replace(
        fit_ensemble(members, states, val, train, cfg.fusion, cfg.target_sensitivity),
        training_data={"source": cfg.data, "fingerprint": training_fingerprint(rows),
                       "n": {s: int((arrays["split"] == s).sum()) for s in ("train", "val", "test")}},
        train_config=to_flat_dict(cfg), history=histories)
    version = save_bundle(cfg.out, manifest, states, store)
    store.write_bytes(join(cfg.out, "train_config.yaml"), dump_yaml(cfg).encode())
    _logger.info("bundle %s written to %s", version, cfg.out)
    report = evaluate_bundle(cfg.out, test, store=store)
    store.write_bytes(join(cfg.out, "evaluation", "test.json"), json.dumps(report, indent=2, default=float).encode())
    return {"bundle": cfg.out, "version": version, "test": report}

"""One member's fine-tuning on Ray Train: one `TorchTrainer` run for all of its fits.

A member is trained several times: the deployable model, then once per out-of-fold split. Each
is a `Fit` (name, training rows, early-stopping rows) and all of them run in order inside one
Ray Train run (the loop in `train.loop`), so the controller, the worker group, its process group
and the dataset plumbing start once per member instead of once per fit.

Each fit's training and validation rows are picked from the decoded blocks and materialized in
the object store before the run, so epochs re-read blocks instead of re-picking rows; each
worker's shard streams from there (`get_dataset_shard`), never through the driver. Finished fits write their best weights
beside the run's checkpoints (`train.loop.fit_uri`); the driver reads them when the run ends.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES
from kneescreen.model.registry import normalisation
from kneescreen.train.config import MemberSpec, TrainConfig
from kneescreen.train.data import TrainingData
from kneescreen.train.loop import fit_uri, train_loop
from kneescreen.train.progress import FINAL, EpochProgress


@dataclass(frozen=True)
class Fit:
    """One model a member's run trains: ``name`` (``final`` for the deployable model, ``oof<k>``
    for an out-of-fold one; it names the progress line, the history and the weights file), the
    rows it trains on and the rows whose macro-F1 stops it early. Both select rows of the same
    decoded data as every other fit of the run."""

    name: str
    train: TrainingData
    val: TrainingData


def _rows_digest(fit: Fit) -> str:
    """A short digest of the keys a fit trains and stops on (a checkpoint names what it was for)."""
    h = hashlib.sha256()
    for part in (fit.train, fit.val):
        h.update("\n".join(map(str, part["key"])).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _datasets(fits: list[Fit], key: str) -> dict[str, ray.data.Dataset]:
    """``train_<i>`` / ``val_<i>`` per fit, each materialized in the object store before the run.

    Materialized, not picked lazily each epoch: during the run the workers hold their CPUs (on a
    small cluster all of them), so per-epoch pick tasks would wait or crawl. The cost is object
    store memory: every fit's rows at once, about k times the development images' input column
    for k out-of-fold folds (Ray spills to disk past the store's size)."""
    out = {}
    for i, fit in enumerate(fits):
        for name, part in (("train", fit.train), ("val", fit.val)):
            ds = part.dataset([key, "label"])
            # Same rows, same order, every run: the local shuffle's seed then gives reproducible epochs.
            ds.context.execution_options.preserve_order = True
            out[f"{name}_{i}"] = ds.materialize()
    return out


def _trainer(member: MemberSpec, fits: list[Fit], cfg: TrainConfig, run_name: str, store: Store,
             callbacks: list) -> TorchTrainer:
    key = member.input_key
    mean, std = normalisation(member.architecture, member.input_mode)
    fs, storage_path = store.filesystem(cfg.checkpoints())
    datasets = _datasets(fits, key)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "architecture": member.architecture, "input_mode": member.input_mode, "weights": member.weights,
            "store": store, "input_key": key, "mean": mean, "std": std, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "patience": cfg.patience, "seed": cfg.seed,
            "threads": cfg.cpus_per_worker, "member": member.name, "run_dir": join(cfg.checkpoints(), run_name),
            "fits": [{"name": f.name, "rows": _rows_digest(f),
                      "class_counts": np.bincount(f.train["label"], minlength=len(CLASSES)).tolist()} for f in fits],
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train_")]),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


def train_fits(member: MemberSpec, fits: list[Fit], cfg: TrainConfig, run_name: str, store: Store
               ) -> list[tuple[dict, list[dict]]]:
    """Fine-tune ``fits`` of one member in one Ray Train run named ``run_name``; every reported
    epoch is logged as it arrives (`train.progress`). Returns (best state dict, that fit's epoch
    metrics) per fit, in order: every epoch of the fit, those of an interrupted attempt that
    this run resumed included."""
    if len({f.name for f in fits}) != len(fits):
        raise ValueError(f"{member.name}: fit names repeat: {[f.name for f in fits]}")
    with EpochProgress(member.name, cfg.epochs) as progress:
        result = _trainer(member, fits, cfg, run_name, store, [progress.callback]).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{member.name}: training produced no checkpoint")
    # Each fit's file holds its weights and whole history (`train.loop`), epochs of an attempt this
    # run resumed included; `result.metrics_dataframe` would hold only the kept checkpoints' reports.
    run_dir = join(cfg.checkpoints(), run_name)
    out = []
    for fit in fits:
        saved = torch.load(io.BytesIO(store.read_bytes(fit_uri(run_dir, fit.name))), map_location="cpu",
                           weights_only=True)
        out.append((saved["best_state"], saved.get("history", [])))  # [] in files from before 59fcdae
    return out


def train_member(member: MemberSpec, train: TrainingData, val: TrainingData, cfg: TrainConfig, run_name: str,
                 store: Store):
    """One fit (benchmarks): (best state dict, metrics history)."""
    return train_fits(member, [Fit(FINAL, train, val)], cfg, run_name, store)[0]

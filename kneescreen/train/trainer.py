"""One member's fine-tuning run on Ray Train (`TorchTrainer`, the loop in `train.loop`).

The train and validation rows are picked from the decoded blocks in the object store
(`TrainingData.dataset`) and materialized there once per run, so epochs re-read blocks instead of
re-picking rows; each worker's shard streams from there (`get_dataset_shard`), never through the
driver.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES
from kneescreen.model.registry import normalisation
from kneescreen.train.config import MemberSpec, TrainConfig
from kneescreen.train.data import TrainingData
from kneescreen.train.loop import train_loop
from kneescreen.train.progress import EpochProgress


def _run_dataset(rows: TrainingData, key: str) -> ray.data.Dataset:
    ds = rows.dataset([key, "label"])
    # Same rows, same order, every run: the local shuffle's seed then gives reproducible epochs.
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def _trainer(member: MemberSpec, train: TrainingData, val: TrainingData, cfg: TrainConfig, run_name: str,
             store: Store, callbacks: list) -> TorchTrainer:
    key = member.input_key
    mean, std = normalisation(member.architecture, member.input_mode)
    fs, storage_path = store.filesystem(cfg.checkpoints())
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "architecture": member.architecture, "input_mode": member.input_mode, "weights": member.weights,
            "store": store, "input_key": key, "mean": mean, "std": std, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "patience": cfg.patience, "seed": cfg.seed,
            "threads": cfg.cpus_per_worker, "member": member.name,
            "class_counts": np.bincount(train["label"], minlength=len(CLASSES)).tolist(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": _run_dataset(train, key), "val": _run_dataset(val, key)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


def train_member(member: MemberSpec, train: TrainingData, val: TrainingData, cfg: TrainConfig, run_name: str,
                 store: Store):
    """Fine-tune one member with TorchTrainer; every reported epoch is logged as it arrives
    (`train.progress`). Returns (best state dict, metrics history)."""
    with EpochProgress(member.name, cfg.epochs) as progress:
        result = _trainer(member, train, val, cfg, run_name, store, [progress.callback]).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{member.name}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return saved["best_state"], history

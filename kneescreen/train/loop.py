"""The per-worker Ray Train loop for one ensemble member: its fits, one after another.

A member's run trains a sequence of fits (`train.trainer.Fit`: the deployable model, then one per
out-of-fold split), each from a fresh model on its own rows, so the worker group, its process
group and the dataset plumbing start once per member, not once per fit. Within a fit every worker
trains on its shard of the fit's training rows and scores all of its validation rows; the
all-reduced macro-F1 decides early stopping, so all ranks stop on the same epoch. Rank 0 writes a
checkpoint every epoch (the fit it is in, model, optimiser, schedule, early-stopping state, the
fit's epoch metrics so far) and, when a fit ends, that fit's best weights and whole history to
``<run>/fits/<fit>.pt``; a rerun with the same run
name resumes from the latest checkpoint (Train V2): finished fits are not trained again.
Progress is the reported metrics (``fit``, ``start_epoch``, ``early_stop`` included), nothing
printed: `train.progress` carries them to the driver's log.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from kneescreen.data.preprocess import augment_instances
from kneescreen.labels import CLASSES
from kneescreen.metrics import macro_f1
from kneescreen.model.forward import instance_logits
from kneescreen.model.registry import create_model

_STATE_KEYS = ("epoch", "best_f1", "best_state", "bad_epochs", "history")


def fit_uri(run_dir: str, fit: str) -> str:
    """Where a finished fit's best weights are written (``run_dir``: the run's storage URI)."""
    return f"{run_dir.rstrip('/')}/fits/{fit}.pt"


def _fit_ids(config: dict) -> list[str]:
    return [f"{f['name']}:{f['rows']}" for f in config["fits"]]


def resumable(saved: dict, config: dict) -> dict:
    """``saved`` (a checkpoint's state) if this run may resume it, with the fit it was in.

    A checkpoint written for other fits (other names, or other rows: another split, data or
    outer fold under the same run name) is refused, never resumed: its models would have seen
    rows they must not. One from before fits shared a run is the deployable fit's (same run name).

    Raises:
        ValueError: the checkpoint is another run's; the message says what to do.
    """
    ids = _fit_ids(config)
    if "fits" not in saved:
        saved = {**saved, "fits": ids, "fit": 0}
    if list(saved["fits"]) != ids:
        raise ValueError(f"{config['member']}: the checkpoint under {config['run_dir']} was written for other "
                         f"fits ({', '.join(saved['fits'])}) than this run's ({', '.join(ids)}): rerun with "
                         "another --name, or remove that folder to start again")
    return saved


def _restore(config: dict) -> dict | None:
    """The latest checkpoint of this run (`resumable`), or None."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return None
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    return resumable(saved, config)


def _setup(config: dict, fit: dict, device: torch.device, saved: dict | None):
    """Model (DDP-wrapped), optimiser, schedule, class-weighted loss and early-stopping state of one
    fit: fresh, or as ``saved`` (a checkpoint of this fit) left them."""
    model = create_model(config["architecture"], len(CLASSES), config["input_mode"], config["weights"],
                         store=config["store"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    counts = np.asarray(fit["class_counts"], float)
    class_w = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    state = {"epoch": 0, "best_f1": -1.0, "best_state": None, "bad_epochs": 0, "history": []}
    if saved:
        (model.module if hasattr(model, "module") else model).load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        # Checkpoints from before the history was carried start it at the resumed epoch.
        state = {k: saved.get(k, state[k]) for k in _STATE_KEYS}
    return model, opt, sched, torch.nn.CrossEntropyLoss(weight=class_w), state


def _train_epoch(model, opt, loss_fn, shard, config: dict, epoch: int, gen: torch.Generator, device) -> tuple:
    """One pass over this worker's shard. Returns (images seen, summed loss, seconds)."""
    model.train()
    use_gpu = device.type == "cuda"
    img_key = config["input_key"]
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    for batch in shard.iter_torch_batches(batch_size=config["batch_size"], dtypes=None, device="cpu",
                                          local_shuffle_buffer_size=256, local_shuffle_seed=config["seed"] + epoch):
        x = augment_instances(batch[img_key], gen).to(device)
        y = batch["label"].long().to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
            loss = loss_fn(instance_logits(model, x, config["input_mode"], config["mean"], config["std"],
                                           channels_last=use_gpu), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
    return seen, loss_sum, time.perf_counter() - t0


@torch.no_grad()
def _validate(model, shard, config: dict, device) -> float:
    """Macro-F1 of this worker's model on the full validation set."""
    model.eval()
    img_key = config["input_key"]
    use_gpu = device.type == "cuda"
    ys, preds = [], []
    for batch in shard.iter_torch_batches(batch_size=64, dtypes=None, device="cpu"):
        x = batch[img_key].to(device)
        # Same as training: bf16 autocast and channels-last inputs (the model is channels-last).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
            preds.append(instance_logits(model, x, config["input_mode"], config["mean"], config["std"],
                                         channels_last=use_gpu).float().argmax(1).cpu().numpy())
        ys.append(batch["label"].numpy())
    return macro_f1(np.concatenate(ys), np.concatenate(preds), len(CLASSES))


def _all_reduce(f1: float, loss_sum: float, seen: int, train_s: float, world: int) -> tuple:
    """Mean F1 and seconds, summed loss and images, over the workers."""
    stats = torch.tensor([f1, loss_sum, seen, train_s], dtype=torch.float64)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
        stats[0] /= world
        stats[3] /= world
    return tuple(float(v) for v in stats)


def _report(model, opt, sched, state: dict, metrics: dict, position: dict, rank: int) -> None:
    """Rank 0 checkpoints (the fit it is in, model, optimiser, schedule, early-stopping state);
    all ranks report."""
    unwrapped = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": unwrapped.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        **position, **state}, os.path.join(d, "state.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _train_fit(config: dict, index: int, saved: dict | None, rank: int, world: int, device) -> None:
    """Train fit ``index`` to its end (epoch budget or early stop), from ``saved`` if given; rank 0
    then writes its best weights where the driver reads them (`fit_uri`)."""
    fit = config["fits"][index]
    # Every fit starts as a run of its own would: same seeds, fresh model and optimiser.
    torch.manual_seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    model, opt, sched, loss_fn, state = _setup(config, fit, device, saved)
    unwrapped = model.module if hasattr(model, "module") else model
    train_shard = ray.train.get_dataset_shard(f"train_{index}")
    val_shard = ray.train.get_dataset_shard(f"val_{index}")
    start_epoch = state["epoch"]  # > 0: resumed from a checkpoint
    position = {"fits": _fit_ids(config), "fit": index}
    while state["epoch"] < config["epochs"] and state["bad_epochs"] < config["patience"]:
        epoch = state["epoch"]
        seen, loss_sum, train_s = _train_epoch(model, opt, loss_fn, train_shard, config, epoch, gen, device)
        sched.step()
        f1 = _validate(model, val_shard, config, device)
        f1, loss_total, seen_total, train_s = _all_reduce(f1, loss_sum, seen, train_s, world)
        if f1 > state["best_f1"]:
            state["best_f1"], state["bad_epochs"] = f1, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        metrics = {"fit": fit["name"], "fit_number": index + 1, "fits": len(config["fits"]), "epoch": epoch + 1,
                   "train_loss": loss_total / max(seen_total, 1),
                   "val_macro_f1": f1, "best_val_macro_f1": state["best_f1"],
                   "train_images_per_s": seen_total / max(train_s, 1e-9), "lr": sched.get_last_lr()[0],
                   "start_epoch": start_epoch, "bad_epochs": state["bad_epochs"],
                   "early_stop": state["bad_epochs"] >= config["patience"]}
        state["history"].append(metrics)  # checkpointed: a resumed fit's history keeps its earlier epochs
        _report(model, opt, sched, state, metrics, position, rank)
    if rank == 0:
        buf = io.BytesIO()
        torch.save({"best_state": state["best_state"], "epochs": state["epoch"], "best_f1": state["best_f1"],
                    "history": state["history"]}, buf)
        config["store"].write_bytes(fit_uri(config["run_dir"], fit["name"]), buf.getvalue())


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``): the member's fits in order, resuming the
    one the latest checkpoint was in."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    saved = _restore(config)
    start = saved["fit"] if saved else 0
    for index in range(start, len(config["fits"])):
        _train_fit(config, index, saved if index == start else None, rank, world, device)

"""Distributed fine-tuning of the ensemble on Ray Train, then calibration and the bundle.

    split.csv --decode (Ray Data tasks)--> uint8 letterboxed images per member size
      -> per member: TorchTrainer(DDP; gloo on CPU, NCCL + bf16 autocast + channels_last on GPU)
         train shard per worker, full validation set on every worker (identical early stopping)
         checkpoint every epoch to RunConfig(storage_path, name): a rerun resumes
      -> driver: temperature per member, fusion weights, covariate model, stacker, thresholds
         (all fit on validation) -> bundle

Members train one after another; each TorchTrainer uses the whole ScalingConfig.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kneescreen.labels import CLASSES

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSpec:
    architecture: str = "efficientnet_lite0"
    input_mode: str = "gray"
    weights: str | None = "imagenet"
    image_size: int | None = None  # default: the architecture's input size

    def size(self) -> int:
        from kneescreen.models import get_spec

        return self.image_size or get_spec(self.architecture).input_size

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.input_mode}"


@dataclass(frozen=True)
class TrainConfig:
    """Training defaults; the CLI flags and ``--config`` YAML map onto these fields."""

    # The default model: EfficientNet-Lite0 (offline ImageNet weights), gray input, 160 px: the
    # best image member found that trains on a 2-core CPU in minutes (docs/results.md).
    members: tuple[MemberSpec, ...] = (MemberSpec("efficientnet_lite0", "gray", "imagenet", 160),)
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    placement_strategy: str = "PACK"  # PACK fills a node first; SPREAD puts workers on different nodes
    seed: int = 0
    fusion: str = "soft"
    target_sensitivity: float = 0.9
    storage_path: str = "runs"
    name: str = "kneescreen-train"
    max_failures: int = 1


# ---------------------------------------------------------------------------------------------
# data


def _decode_batch(batch: dict, sizes: list[int]) -> dict:
    """Ray Data batch fn: uri -> uint8 letterboxed image per size (error rows dropped later)."""
    from kneescreen import storage
    from kneescreen.errors import DecodeError
    from kneescreen.preprocess import letterbox
    from kneescreen.reader import read_radiograph

    out: dict[str, list] = {f"img_{s}": [] for s in sizes}
    out["ok"] = []
    for uri in batch["uri"]:
        try:
            image = read_radiograph(storage.read_bytes(uri)).image
            for s in sizes:
                out[f"img_{s}"].append(letterbox(image, s))
            out["ok"].append(True)
        except (DecodeError, OSError) as exc:
            _logger.warning("training image %s could not be decoded: %s", uri, exc)
            for s in sizes:
                out[f"img_{s}"].append(np.zeros((s, s), np.uint8))
            out["ok"].append(False)
    result = {k: v for k, v in batch.items()}
    result.update({k: np.stack(v) if k != "ok" else np.asarray(v) for k, v in out.items()})
    return result


def load_arrays(rows: list[dict], sizes: list[int]) -> dict:
    """Decode split rows with Ray Data tasks; returns numpy arrays on the driver."""
    import ray

    items = [{"uri": r["uri"], "label": CLASSES.index(r["label"]), "key": r["key"],
              "age": np.nan if r.get("age") is None else float(r["age"]), "sex": r.get("sex") or "",
              "split": r["split"], "fold": int(r["fold"])} for r in rows]
    ds = ray.data.from_items(items).map_batches(_decode_batch, fn_kwargs={"sizes": sizes}, batch_size=8)
    got = ds.take_all()
    got = [g for g in got if g["ok"]]
    got.sort(key=lambda g: g["key"])
    arrays = {k: np.asarray([g[k] for g in got]) for k in ("label", "age", "split", "fold", "key")}
    arrays["sex"] = [g["sex"] or None for g in got]
    arrays["age"] = [None if np.isnan(a) else float(a) for a in arrays["age"]]
    arrays["images"] = {s: np.stack([g[f"img_{s}"] for g in got]) for s in sizes}
    return arrays


def subset(arrays: dict, mask: np.ndarray) -> dict:
    idx = np.nonzero(mask)[0]
    return {
        "label": arrays["label"][idx], "key": arrays["key"][idx],
        "age": [arrays["age"][i] for i in idx], "sex": [arrays["sex"][i] for i in idx],
        "images": {s: v[idx] for s, v in arrays["images"].items()},
    }


# ---------------------------------------------------------------------------------------------
# the per-worker training loop


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from kneescreen.metrics import confusion_matrix
    from kneescreen.models import create_model
    from kneescreen.preprocess import augment, to_input

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    torch.set_num_threads(config["threads"])
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    model = create_model(config["architecture"], len(CLASSES), config["input_mode"], config["weights"])
    if use_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    counts = np.asarray(config["class_counts"], float)
    class_w = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_w)
    state = {"epoch": 0, "best_f1": -1.0, "best_state": None, "bad_epochs": 0}
    unwrapped = model.module if hasattr(model, "module") else model
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        unwrapped.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = {k: saved[k] for k in ("epoch", "best_f1", "best_state", "bad_epochs")}
        if rank == 0:
            print(f"[{config['member']}] resumed from checkpoint after epoch {state['epoch']}", flush=True)
    img_key = f"img_{config['size']}"
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    mean, std = config["mean"], config["std"]
    for epoch in range(state["epoch"], config["epochs"]):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for batch in train_shard.iter_torch_batches(batch_size=config["batch_size"], dtypes=None, device="cpu",
                                                    local_shuffle_buffer_size=256, local_shuffle_seed=config["seed"] + epoch):
            x = to_input(augment(batch[img_key], gen), config["input_mode"], mean, std).to(device)
            if use_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].long().to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        train_s = time.perf_counter() - t0
        sched.step()
        # Validation: every worker scores the full validation set; the mean across workers is
        # what decides, so all ranks stop on the same epoch.
        model.eval()
        ys, preds = [], []
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=64, dtypes=None, device="cpu"):
                x = to_input(batch[img_key], config["input_mode"], mean, std).to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_gpu):
                    preds.append(model(x).float().argmax(1).cpu().numpy())
                ys.append(batch["label"].numpy())
        cm = confusion_matrix(np.concatenate(ys), np.concatenate(preds), len(CLASSES))
        tp = np.diag(cm)
        denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
        f1 = float(np.mean(np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)))
        stats = torch.tensor([f1, loss_sum, seen, train_s], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.all_reduce(stats)
            stats[0] /= world
            stats[3] /= world
        f1, loss_total, seen_total, train_s = float(stats[0]), float(stats[1]), float(stats[2]), float(stats[3])
        if f1 > state["best_f1"]:
            state["best_f1"], state["bad_epochs"] = f1, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        metrics = {"epoch": epoch + 1, "train_loss": loss_total / max(seen_total, 1), "val_macro_f1": f1,
                   "best_val_macro_f1": state["best_f1"], "train_images_per_s": seen_total / max(train_s, 1e-9),
                   "lr": sched.get_last_lr()[0]}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": unwrapped.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            **state}, os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                print(f"[{config['member']}] epoch {epoch + 1}/{config['epochs']} loss {metrics['train_loss']:.3f} "
                      f"val macro-F1 {f1:.3f} (best {state['best_f1']:.3f}) "
                      f"{metrics['train_images_per_s']:.1f} img/s", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint)
        if state["bad_epochs"] >= config["patience"]:
            if rank == 0:
                print(f"[{config['member']}] early stop: no val macro-F1 gain in {config['patience']} epochs", flush=True)
            break


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit` (or pointed at a cluster): join it as it is
        return
    if not ray.is_initialized():
        # Logical CPUs: Ray Train workers and Ray Data tasks both ask for CPUs; on a 2-core
        # machine 2 training workers would otherwise leave Data nothing and stall it.
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True, ignore_reinit_error=True)


def train_member(member: MemberSpec, train: dict, val: dict, cfg: TrainConfig, run_name: str):
    """Fine-tune one member with TorchTrainer. Returns (best state dict, metrics history)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kneescreen.models import normalisation

    size = member.size()
    key = f"img_{size}"
    train_ds = ray.data.from_items([{key: im, "label": int(y)} for im, y in zip(train["images"][size], train["label"])])
    val_ds = ray.data.from_items([{key: im, "label": int(y)} for im, y in zip(val["images"][size], val["label"])])
    mean, std = normalisation(member.architecture, member.input_mode)
    storage_path = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "architecture": member.architecture, "input_mode": member.input_mode, "weights": member.weights,
            "size": size, "mean": mean, "std": std, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
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
        run_config=RunConfig(name=run_name, storage_path=storage_path,
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


# ---------------------------------------------------------------------------------------------
# calibration, fusion, covariates, thresholds -> manifest


def _member_manifest(member: MemberSpec) -> dict:
    from kneescreen.models import normalisation

    mean, std = normalisation(member.architecture, member.input_mode)
    return {"architecture": member.architecture, "input_mode": member.input_mode, "image_size": member.size(),
            "mean": list(mean), "std": list(std), "weights_init": member.weights, "temperature": 1.0}


def fit_ensemble(members: list[MemberSpec], states: list[dict], val: dict, train: dict, cfg: TrainConfig) -> dict:
    """Fit temperatures, fusion weights, covariate model, stacker and thresholds on validation.

    Returns:
        The manifest body (without files/version), ready for `save_bundle`.
    """
    from kneescreen.bundle import Bundle
    from kneescreen.covariates import LogisticModel, ProductStacker, covariate_features
    from kneescreen.fusion import apply_temperature, choose_threshold, fit_temperature, fit_weights, fuse
    from kneescreen.models import create_model

    manifest = {"classes": list(CLASSES), "members": [_member_manifest(m) for m in members],
                "fusion": {"method": cfg.fusion, "weights": None}, "predictor": "image"}
    models = []
    for m, st in zip(members, states):
        model = create_model(m.architecture, len(CLASSES), m.input_mode, weights=None)
        model.load_state_dict(st)
        models.append(model.eval())
    y = val["label"]
    logits = Bundle(dict(manifest, version="unsaved", thresholds={}), models).member_logits(val["images"])
    probs = []
    for spec, lg in zip(manifest["members"], logits):
        spec["temperature"] = fit_temperature(lg, y)
        probs.append(apply_temperature(lg, spec["temperature"]))
    if cfg.fusion == "weighted":
        manifest["fusion"]["weights"] = fit_weights(probs, y)
    image_probs, _ = fuse(cfg.fusion, probs, manifest["fusion"]["weights"])
    # Covariates: fit on training rows (age/sex are not images: no leakage through augmentation).
    ages = [a for a in train["age"] if a is not None]
    age_mean = float(np.mean(ages)) if ages else 65.0
    age_sd = float(np.std(ages)) if len(ages) > 1 and np.std(ages) > 0 else 12.0
    x_tr, imp_tr = covariate_features(train["age"], train["sex"], age_mean, age_sd)
    final_probs = image_probs
    if (~imp_tr).sum() >= 10:
        counts = np.bincount(train["label"], minlength=len(CLASSES)).astype(float)
        cw = counts.sum() / (len(CLASSES) * np.maximum(counts, 1))
        cov = LogisticModel(l2=1e-2).fit(x_tr, train["label"], len(CLASSES), class_weight=cw)
        x_val, imp_val = covariate_features(val["age"], val["sex"], age_mean, age_sd)
        p_cov_val = cov.predict_proba(x_val)
        stacker = ProductStacker().fit(p_cov_val, image_probs, y)
        manifest["covariates"] = {"model": cov.to_dict(), "age_mean": age_mean, "age_sd": age_sd,
                                  "features": ["age_z", "female", "age_missing", "sex_missing"]}
        manifest["stacker"] = {"model": stacker.to_dict(), "inputs": ["covariate_model_probs", "image_ensemble_probs"],
                               "fit_on": "validation"}
        manifest["predictor"] = "fused"
        # Thresholds are set on the stacker's own validation output (in-sample for the stacker:
        # honest evaluation of the fused model happens on the test split / CV folds).
        fused = stacker.predict_proba(p_cov_val, image_probs)
        final_probs = np.where(imp_val[:, None], image_probs, fused)
    manifest["inputs"] = ["image"] + (["age", "sex"] if manifest["predictor"] == "fused" else [])

    def threshold(score, positive) -> dict:
        if not positive.any() or positive.all():
            _logger.warning("validation split has %s: threshold left at 0.5; use a larger validation split",
                            "no positive cases" if not positive.any() else "no negative cases")
            return {"threshold": 0.5, "note": "validation split lacks positives or negatives"}
        return choose_threshold(score, positive, cfg.target_sensitivity)

    low = final_probs[:, 1] + final_probs[:, 2]
    manifest["thresholds"] = {"low_bmd": threshold(low, y >= 1), "osteoporosis": threshold(final_probs[:, 2], y == 2)}
    # Each predictor gets its own low-BMD threshold on validation, so evaluations compare them at
    # the same target sensitivity (the deployed predictor's is `thresholds` above).
    per = {f"member:{m.name}": p for m, p in zip(members, probs)}
    per[f"image_ensemble:{cfg.fusion}"] = image_probs
    if manifest["predictor"] == "fused":
        per["covariates_only"] = p_cov_val
        per["fused"] = final_probs
    manifest["predictor_thresholds"] = {name: threshold(p[:, 1] + p[:, 2], y >= 1)["threshold"] for name, p in per.items()}
    return manifest


def training_fingerprint(rows: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["pixel_hash"] or ""):
        h.update(f"{r['pixel_hash']}:{r['label']}:{r['split']}\n".encode())
    return h.hexdigest()[:16]


def run_train(source: str, bundle_out: str, cfg: TrainConfig = TrainConfig(), split_dir: str | None = None,
              endpoint: str | None = None) -> dict:
    """Split (or reuse a split), train every member, fit the ensemble and write the bundle.

    Returns:
        Summary: bundle path and version, per-member history, validation thresholds, test metrics.
    """
    from kneescreen import storage
    from kneescreen.bundle import save_bundle
    from kneescreen.datasets import SplitConfig, load_split, run_split
    from kneescreen.evaluate import evaluate_bundle

    ensure_ray()
    split_dir = split_dir or storage.join(bundle_out, "split")
    if not storage.exists(storage.join(split_dir, "split.csv"), endpoint):
        run_split(source, split_dir, SplitConfig(seed=cfg.seed), endpoint=endpoint)
    rows = load_split(split_dir, endpoint)
    sizes = sorted({m.size() for m in cfg.members})
    arrays = load_arrays(rows, sizes)
    train, val, test = (subset(arrays, arrays["split"] == s) for s in ("train", "val", "test"))
    _logger.info("training on %d images, validating on %d, testing on %d", len(train["label"]), len(val["label"]),
                 len(test["label"]))
    states, histories = [], {}
    for member in cfg.members:
        _logger.info("member %s: fine-tuning on %d worker(s)%s", member.name, cfg.num_workers, " with GPU" if cfg.use_gpu else "")
        state, history = train_member(member, train, val, cfg, f"{cfg.name}-{member.name}")
        states.append(state)
        histories[member.name] = history
    manifest = fit_ensemble(list(cfg.members), states, val, train, cfg)
    manifest["training_data"] = {"source": source, "fingerprint": training_fingerprint(rows),
                                 "n": {s: int((arrays["split"] == s).sum()) for s in ("train", "val", "test")}}
    manifest["train_config"] = json.loads(json.dumps(asdict(cfg), default=str))
    manifest["history"] = {k: [{kk: vv for kk, vv in h.items() if isinstance(vv, (int, float, str))} for h in v]
                           for k, v in histories.items()}
    version = save_bundle(bundle_out, manifest, states, endpoint)
    _logger.info("bundle %s written to %s", version, bundle_out)
    report = evaluate_bundle(bundle_out, test, endpoint=endpoint)
    storage.write_bytes(storage.join(bundle_out, "evaluation", "test.json"), json.dumps(report, indent=2, default=float).encode(), endpoint)
    return {"bundle": bundle_out, "version": version, "test": report}

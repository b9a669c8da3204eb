"""Frozen-feature members: an ImageNet backbone, unchanged, with a shrinkage linear head.

The head is an L2-regularised multinomial logistic regression on standardised penultimate-layer
features, its strength chosen by inner cross-validated log-loss. It trains in seconds on a CPU, so
the out-of-fold predictions that choose the deployed predictor (`kneescreen.model.selection`)
cost k small fits instead of k fine-tuning runs. The fitted head is baked into the network's
final linear layer, so a frozen member is an ordinary state dict: bundles, screening actors and
GPUs treat it like any fine-tuned member.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kneescreen.data.preprocess import to_input
from kneescreen.model.covariates import LogisticModel
from kneescreen.model.registry import classifier_head

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # on standardised features, per-sample loss scale


@torch.inference_mode()
def extract_features(model: nn.Module, images: np.ndarray, input_mode: str, mean, std,
                     batch_size: int = 32) -> np.ndarray:
    """Penultimate-layer features (the head's input) for (n, s, s) uint8 images, or the mean over
    instances for multi-instance (n, k, s, s) inputs (mean pooling: a linear head on the mean
    feature gives the mean of the instances' logits, exactly what `Bundle` computes)."""
    if images.ndim == 4:
        n, k = images.shape[:2]
        flat = extract_features(model, images.reshape(n * k, *images.shape[2:]), input_mode, mean, std, batch_size)
        return flat.reshape(n, k, -1).mean(1)
    name, head = classifier_head(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().float().cpu()))
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            model(to_input(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])), input_mode, mean, std))
    finally:
        hook.remove()
    dim = head.in_features
    return torch.cat(captured).numpy() if captured else np.zeros((0, dim), np.float32)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0)
    return mu, np.where(sd > 1e-6, sd, 1.0)


def _fit(x: np.ndarray, y: np.ndarray, k: int, l2: float, cw: np.ndarray) -> LogisticModel:
    # Gradient descent is stable below 1/L; the softmax loss's curvature is at most
    # 0.5 * sigma_max(X)^2 / n, which for 1,000+ correlated features is far above 1.
    lr = 1.0 / (0.5 * np.linalg.norm(x, 2) ** 2 / max(len(x), 1) + l2)
    return LogisticModel(l2=l2).fit(x, y, k, steps=800, lr=lr, class_weight=cw)


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())


def fit_head(x: np.ndarray, y: np.ndarray, k: int, folds: np.ndarray | None = None,
             l2_grid=L2_GRID) -> tuple[LogisticModel, np.ndarray, np.ndarray, float]:
    """Shrinkage logistic head on features ``x``.

    Args:
        x: (n, d) features; y: class indices; k: number of classes.
        folds: inner fold id per row for choosing L2 (default: 3 interleaved folds).

    Returns:
        (model on standardised features, feature mean, feature sd, chosen L2)
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, int)
    folds = np.arange(len(y)) % 3 if folds is None else np.asarray(folds)
    counts = np.bincount(y, minlength=k).astype(float)
    cw = counts.sum() / (k * np.maximum(counts, 1))
    best = (np.inf, l2_grid[0])
    for l2 in l2_grid:
        losses = []
        for f in np.unique(folds):
            tr, te = folds != f, folds == f
            if len(np.unique(y[tr])) < 2 or not te.any():
                continue
            mu, sd = _standardise(x[tr])
            m = _fit((x[tr] - mu) / sd, y[tr], k, l2, cw)
            losses.append(_log_loss(m.predict_proba((x[te] - mu) / sd), y[te]))
        if losses and np.mean(losses) < best[0]:
            best = (float(np.mean(losses)), l2)
    mu, sd = _standardise(x)
    model = _fit((x - mu) / sd, y, k, best[1], cw)
    return model, mu, sd, best[1]


def bake_head(model: nn.Module, head: LogisticModel, mu: np.ndarray, sd: np.ndarray) -> nn.Module:
    """Write the logistic head into the network's final linear layer (exactly the same logits)."""
    _, linear = classifier_head(model)
    coef = head.coef / sd[:, None]  # (d, k): the standardisation folded into the weights
    bias = head.bias - mu @ coef
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef.T, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
    return model

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


L2_ROWS = 4_000  # above this many rows, L2 is chosen on a stratified subsample of this size


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    return mu, torch.where(sd > 1e-6, sd, torch.ones_like(sd))


def _fit(x: torch.Tensor, y: torch.Tensor, k: int, l2: float, cw: torch.Tensor,
         init: torch.Tensor | None = None, max_iter: int = 200, tol: float = 1e-5) -> torch.Tensor:
    """Minimise weighted mean cross-entropy + 0.5 * l2 * |coef|^2 (bias unpenalised; the loss the
    previous gradient-descent fit minimised) by L-BFGS with a strong Wolfe line search: tens of
    iterations where gradient descent needed hundreds of steps. The gradient is written out (two
    matmuls an evaluation, no autograd graph). Returns theta, (d + 1, k): coef rows, then bias."""
    onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
    w = cw[y]
    w = (w / w.sum())[:, None]  # = class weight / mean weight / n
    xt = x.T.contiguous()
    if init is None:
        init = torch.zeros(x.shape[1] + 1, k, dtype=x.dtype, device=x.device)
        init[-1] = torch.log(torch.bincount(y, minlength=k).to(x.dtype) + 1.0)
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        coef = theta[:-1]
        z = x @ coef + theta[-1]
        logp = torch.log_softmax(z, 1)
        g = (logp.exp() - onehot) * w
        theta.grad = torch.cat([xt @ g + l2 * coef, g.sum(0, keepdim=True)])
        return -(w * logp * onehot).sum() + 0.5 * l2 * (coef * coef).sum()

    opt.step(closure)
    return theta.detach()


def _model(theta: torch.Tensor, l2: float) -> LogisticModel:
    t = theta.double().cpu().numpy()
    return LogisticModel(coef=t[:-1], bias=t[-1], l2=l2)


def _l2_rows(y: np.ndarray, limit: int) -> np.ndarray:
    """Rows for choosing L2: all of them, or a class-stratified deterministic subsample."""
    if len(y) <= limit:
        return np.arange(len(y))
    rng = np.random.default_rng(0)
    take = [rng.permutation(np.flatnonzero(y == c))[: max(1, round(limit * np.mean(y == c)))] for c in np.unique(y)]
    return np.sort(np.concatenate(take))


def _choose_l2(x: torch.Tensor, y: torch.Tensor, folds: np.ndarray, k: int, cw: torch.Tensor, l2_grid) -> float:
    """The grid value with the lowest inner cross-validated log-loss; each fold walks the grid from
    the strongest shrinkage down, warm-starting from the previous solution."""
    losses = {l2: [] for l2 in l2_grid}
    yn = y.cpu().numpy()
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        if len(np.unique(yn[tr])) < 2 or not te.any():
            continue
        tr_t, te_t = torch.as_tensor(tr, device=x.device), torch.as_tensor(te, device=x.device)
        mu, sd = _standardise(x[tr_t])
        xtr, xte = (x[tr_t] - mu) / sd, (x[te_t] - mu) / sd
        theta = None
        for l2 in sorted(l2_grid, reverse=True):
            theta = _fit(xtr, y[tr_t], k, l2, cw, init=theta, tol=1e-4)
            logp = torch.log_softmax(xte @ theta[:-1] + theta[-1], 1)
            losses[l2].append(float(-logp[torch.arange(len(xte), device=x.device), y[te_t]].double().mean()))
    means = {l2: np.mean(v) for l2, v in losses.items() if v}
    return min(l2_grid, key=lambda l2: (means.get(l2, np.inf), l2_grid.index(l2)))


def fit_head(x: np.ndarray, y: np.ndarray, k: int, folds: np.ndarray | None = None,
             l2_grid=L2_GRID, device: str | None = None,
             l2_rows: int = L2_ROWS) -> tuple[LogisticModel, np.ndarray, np.ndarray, float]:
    """Shrinkage logistic head on features ``x`` (float32 L-BFGS, on the GPU when there is one).

    Args:
        x: (n, d) features; y: class indices; k: number of classes.
        folds: inner fold id per row for choosing L2 (default: 3 interleaved folds).
        device: torch device (default: cuda when available, else cpu).
        l2_rows: choose L2 on a stratified subsample of this many rows when n is larger.

    Returns:
        (model on standardised features, feature mean, feature sd, chosen L2)
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    y = np.asarray(y, int)
    folds = np.arange(len(y)) % 3 if folds is None else np.asarray(folds)
    xt = torch.as_tensor(np.asarray(x, np.float32), device=device)
    yt = torch.as_tensor(y, device=device)
    counts = np.bincount(y, minlength=k).astype(float)
    cw = torch.as_tensor(counts.sum() / (k * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    l2_grid = tuple(l2_grid)
    sub = torch.as_tensor(_l2_rows(y, l2_rows), device=device)
    best = _choose_l2(xt[sub], yt[sub], folds[sub.cpu().numpy()], k, cw, l2_grid)
    mu, sd = _standardise(xt)
    theta = _fit((xt - mu) / sd, yt, k, best, cw)
    return _model(theta, best), mu.double().cpu().numpy(), sd.double().cpu().numpy(), best


def heads_out_of_fold(feats: np.ndarray, y: np.ndarray, k: int, folds: np.ndarray, device: str | None = None):
    """Every head fit of a frozen member: per outer fold f a head fit on the other folds (L2 chosen
    by inner CV over those folds) scores fold f, then the final head on all rows.
    Returns (out-of-fold logits, (head, mu, sd, l2) of the final head)."""
    logits = np.zeros((len(y), k))
    for f in np.unique(folds):
        tr = folds != f
        head, mu, sd, _ = fit_head(feats[tr], y[tr], k, folds=folds[tr], device=device)
        logits[~tr] = ((feats[~tr] - mu) / sd) @ head.coef + head.bias
    return logits, fit_head(feats, y, k, folds=folds, device=device)


def bake_head(model: nn.Module, head: LogisticModel, mu: np.ndarray, sd: np.ndarray) -> nn.Module:
    """Write the logistic head into the network's final linear layer (exactly the same logits)."""
    _, linear = classifier_head(model)
    coef = head.coef / sd[:, None]  # (d, k): the standardisation folded into the weights
    bias = head.bias - mu @ coef
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef.T, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
    return model

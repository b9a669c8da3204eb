"""Running a member on a batch of member inputs (`kneescreen.data.preprocess.VIEWS`).

Multi-instance views (``roi``: 2 instances, ``tiles``: 8) are scored by running the member on
every instance and averaging the logits: mean-pooling multiple-instance learning, so every
instance gets the bag's gradient when fine-tuning, and for a linear head it equals the head
applied to the mean feature (`kneescreen.model.frozen.extract_features` pools the same way).
"""

from __future__ import annotations

import torch

from kneescreen.data.preprocess import to_input


def instance_logits(model, arr: torch.Tensor, input_mode: str, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Logits of a (B, s, s) or multi-instance (B, K, s, s) uint8 batch; instances mean-pooled
    (multiple-instance learning with mean pooling: every instance gets the bag's gradient)."""
    b = arr.shape[0]
    x = to_input(arr.reshape(-1, *arr.shape[-2:]), input_mode, mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = model(x)
    return out if arr.ndim == 3 else out.reshape(b, arr.shape[1], -1).mean(1)

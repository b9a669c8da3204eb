"""Age and sex: the clinical baseline and the stacked (image + covariates) model.

Both are L2-regularised multinomial logistic regressions, small enough to store as JSON in the
bundle manifest. A missing age or sex never crashes: the feature is imputed (training mean age,
sex unknown) and a ``*_missing`` indicator is set, and callers flag the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sex_code(sex) -> str | None:
    if sex is None:
        return None
    s = str(sex).strip().lower()
    if s in ("f", "female", "w", "woman"):
        return "F"
    if s in ("m", "male", "man"):
        return "M"
    return None


def covariate_features(ages, sexes, age_mean: float = 65.0, age_sd: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix [age_z, female, age_missing, sex_missing] and a per-row 'imputed' flag."""
    rows, imputed = [], []
    for age, sex in zip(ages, sexes):
        a = None if age is None or (isinstance(age, float) and np.isnan(age)) else float(age)
        s = _sex_code(sex)
        rows.append([
            0.0 if a is None else (a - age_mean) / age_sd,
            1.0 if s == "F" else 0.0 if s == "M" else 0.5,
            float(a is None), float(s is None),
        ])
        imputed.append(a is None or s is None)
    return np.asarray(rows, float), np.asarray(imputed, bool)


@dataclass
class LogisticModel:
    """Multinomial logistic regression, fit by full-batch gradient descent (tiny data)."""

    coef: np.ndarray | None = None  # (d, k)
    bias: np.ndarray | None = None  # (k,)
    l2: float = 1e-2

    def fit(self, x: np.ndarray, y: np.ndarray, k: int, steps: int = 2000, lr: float = 0.5,
            class_weight: np.ndarray | None = None) -> "LogisticModel":
        x, y = np.asarray(x, float), np.asarray(y, int)
        n, d = x.shape
        w = np.ones(n) if class_weight is None else np.asarray(class_weight, float)[y]
        w = w / w.mean()
        onehot = np.eye(k)[y]
        coef, bias = np.zeros((d, k)), np.log(np.bincount(y, minlength=k) + 1.0)
        for _ in range(steps):
            p = self._softmax(x @ coef + bias)
            g = (p - onehot) * w[:, None] / n
            coef -= lr * (x.T @ g + self.l2 * coef)
            bias -= lr * g.sum(0)
        self.coef, self.bias = coef, bias
        return self

    @staticmethod
    def _softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("model is not fitted")
        return self._softmax(np.asarray(x, float) @ self.coef + self.bias)

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "bias": self.bias.tolist(), "l2": self.l2}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticModel":
        return cls(np.asarray(d["coef"], float), np.asarray(d["bias"], float), d.get("l2", 1e-2))


def stack_features(image_probs: np.ndarray, cov_x: np.ndarray) -> np.ndarray:
    """Inputs of the fused model: log image probabilities beside the covariate features."""
    return np.concatenate([np.log(np.clip(image_probs, 1e-6, 1.0)), cov_x], axis=1)

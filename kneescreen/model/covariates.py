"""Age and sex: the clinical baseline and the stacked (image + covariates) model.

Both are L2-regularised multinomial logistic regressions, small enough to store as JSON in the
bundle manifest. A missing age or sex never crashes: the feature is imputed (training mean age,
sex unknown) and a ``*_missing`` indicator is set, and callers flag the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneescreen.labels import to_floats
from kneescreen.model.fusion import softmax


def _sex_code(sex) -> str | None:
    if sex is None:
        return None
    s = str(sex).strip().lower()
    if s in ("f", "female", "w", "woman"):
        return "F"
    if s in ("m", "male", "man"):
        return "M"
    return None


def sex_codes(sexes) -> np.ndarray:
    """`_sex_code` of every value ("F", "M" or None) as an object array: one call per distinct value.

    Values are told apart by ``str`` (None becomes "None", NaN "nan"), which `_sex_code` maps to None
    as it does None itself."""
    text = np.asarray(sexes, dtype=object).reshape(-1).astype(str)
    distinct, inverse = np.unique(text, return_inverse=True)
    return np.array([_sex_code(v) for v in distinct], dtype=object)[inverse]


def covariate_features(ages, sexes, age_mean: float = 65.0, age_sd: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix [age_z, female, age_missing, sex_missing] and a per-row 'imputed' flag.

    Args:
        ages: years per row (None / NaN missing); sexes: per row (None or unrecognised missing).
            Lists or arrays (training metadata columns).
    """
    a = to_floats(ages)
    s = sex_codes(sexes)
    age_missing, female, male = np.isnan(a), s == "F", s == "M"
    sex_missing = ~(female | male)
    x = np.column_stack([np.where(age_missing, 0.0, (a - age_mean) / age_sd),
                         np.where(female, 1.0, np.where(male, 0.0, 0.5)),
                         age_missing.astype(float), sex_missing.astype(float)])
    return x, age_missing | sex_missing


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
            p = softmax(x @ coef + bias)
            g = (p - onehot) * w[:, None] / n
            coef -= lr * (x.T @ g + self.l2 * coef)
            bias -= lr * g.sum(0)
        self.coef, self.bias = coef, bias
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("model is not fitted")
        return softmax(np.asarray(x, float) @ self.coef + self.bias)

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "bias": self.bias.tolist(), "l2": self.l2}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticModel":
        return cls(np.asarray(d["coef"], float), np.asarray(d["bias"], float), d.get("l2", 1e-2))


@dataclass
class ProductStacker:
    """Fused model: log p = log p_covariates + beta * log p_image + bias, renormalised.

    Two kinds of parameter only (beta >= 0 and a per-class bias), fit on the validation split.
    A free logistic regression over both inputs overfits the ~20 validation images of a small
    collection (measured: docs/results.md); with this form an image model that carries no
    signal drives beta to 0 and the fused model falls back to the covariate model.
    """

    beta: float = 0.0
    bias: np.ndarray | None = None

    @staticmethod
    def _logits(p_cov: np.ndarray, p_img: np.ndarray, beta: float, bias: np.ndarray) -> np.ndarray:
        return np.log(np.clip(p_cov, 1e-6, 1)) + beta * np.log(np.clip(p_img, 1e-6, 1)) + bias

    def fit(self, p_cov: np.ndarray, p_img: np.ndarray, y: np.ndarray, l2: float = 0.1) -> "ProductStacker":
        y = np.asarray(y, int)
        k = p_cov.shape[1]
        onehot = np.eye(k)[y]
        best = (np.inf, 0.0, np.zeros(k))
        # The log-probabilities once, not per step: `_logits` computes these same numbers.
        log_cov, log_img = np.log(np.clip(p_cov, 1e-6, 1)), np.log(np.clip(p_img, 1e-6, 1))
        for beta in np.linspace(0.0, 2.0, 41):
            bias = np.zeros(k)
            base = log_cov + beta * log_img
            for _ in range(300):
                p = softmax(base + bias)
                bias -= 0.5 * ((p - onehot).mean(0) + l2 * bias)
            p = softmax(base + bias)
            nll = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean() + 0.5 * l2 * (bias**2).sum())
            if nll < best[0] - 1e-9:
                best = (nll, float(beta), bias.copy())
        self.beta, self.bias = best[1], best[2]
        return self

    def predict_proba(self, p_cov: np.ndarray, p_img: np.ndarray) -> np.ndarray:
        return softmax(self._logits(p_cov, p_img, self.beta, self.bias))

    def to_dict(self) -> dict:
        return {"kind": "product", "beta": self.beta, "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ProductStacker":
        return cls(float(d["beta"]), np.asarray(d["bias"], float))

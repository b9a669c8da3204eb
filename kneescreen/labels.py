"""Class names and the WHO T-score thresholds behind them."""

from __future__ import annotations

import math

import numpy as np

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
# WHO: normal T >= -1; osteopenia -2.5 < T < -1; osteoporosis T <= -2.5.
OSTEOPENIA_BELOW = -1.0
OSTEOPOROSIS_AT_OR_BELOW = -2.5


def t_score_to_class(t: float) -> str:
    """WHO class for a T-score."""
    if t is None or math.isnan(float(t)):
        raise ValueError("T-score is missing")
    if t <= OSTEOPOROSIS_AT_OR_BELOW:
        return "osteoporosis"
    if t < OSTEOPENIA_BELOW:
        return "osteopenia"
    return "normal"


def normalise_label(value: str) -> str:
    """Accept common spellings ('Osteoporosis', 'OSTEOPENIA ', 'normal') and return a class name.

    Raises:
        ValueError: for anything that is not one of `CLASSES`.
    """
    v = str(value).strip().lower()
    if v not in CLASS_INDEX:
        raise ValueError(f"unknown label {value!r}; expected one of {list(CLASSES)}")
    return v


def to_float(value) -> float | None:
    """A number from a labels or side table (text, a Parquet value or None); None when it is
    missing or not a number (NaN included)."""
    try:
        v = float(value)
        return None if math.isnan(v) else v
    except (TypeError, ValueError):
        return None


def to_floats(values) -> np.ndarray:
    """`to_float` of every value as one float array, NaN where it gives None (columns of a split or
    of training metadata: a float array passes through, a list with None or text is parsed)."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return values.astype(float, copy=False)
    try:
        out = np.asarray(values, dtype=float)
    except (TypeError, ValueError):  # text that is not a number, "" included: per value, as to_float
        out = np.array([np.nan if (v := to_float(x)) is None else v for x in values], dtype=float)
    return out.reshape(-1)


# Age bands for subgroup statistics and the image-vs-age check (evaluation and screening).
AGE_BANDS = ((0, 50), (50, 60), (60, 70), (70, 80), (80, 200))


def age_band(age) -> str | None:
    """``"50-59"`` style band for an age in years; None when the age is missing."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    for lo, hi in AGE_BANDS:
        if lo <= age < hi:
            return f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+"
    return None


def age_bands(ages) -> np.ndarray:
    """`age_band` of every age (None or NaN: None) as an object array, without a call per row."""
    a = to_floats(ages)
    out = np.full(len(a), None, dtype=object)
    for lo, hi in AGE_BANDS:
        out[(a >= lo) & (a < hi)] = f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+"
    return out

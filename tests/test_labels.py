"""WHO classes from T-scores, label spellings and age bands, at their exact boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kneescreen.labels import CLASS_INDEX, CLASSES, age_band, normalise_label, t_score_to_class


@pytest.mark.parametrize("t,expected", [
    (2.0, "normal"),
    (0.0, "normal"),
    (-1.0, "normal"),  # T >= -1 is normal
    (-1.01, "osteopenia"),
    (-1.5, "osteopenia"),
    (-2.49, "osteopenia"),
    (-2.5, "osteoporosis"),  # T <= -2.5 is osteoporosis
    (-2.51, "osteoporosis"),
    (-4.0, "osteoporosis"),
    (-1, "normal"),  # integers too
    (-3, "osteoporosis"),
    (np.float64(-2.5), "osteoporosis"),
    (np.float32(-1.0), "normal"),
])
def test_who_thresholds(t, expected):
    assert t_score_to_class(t) == expected


@pytest.mark.parametrize("t", [None, float("nan"), math.nan])
def test_missing_t_score_raises(t):
    with pytest.raises(ValueError, match="missing"):
        t_score_to_class(t)


def test_classes_are_ordered_by_severity():
    assert CLASSES == ("normal", "osteopenia", "osteoporosis")
    assert [CLASS_INDEX[c] for c in CLASSES] == [0, 1, 2]
    # Severity order: a lower T-score never gives a milder class.
    ts = np.linspace(2, -5, 701)
    idx = [CLASS_INDEX[t_score_to_class(float(t))] for t in ts]
    assert idx == sorted(idx)


@pytest.mark.parametrize("value,expected", [
    ("normal", "normal"),
    ("Normal", "normal"),
    ("Osteoporosis", "osteoporosis"),
    ("OSTEOPENIA ", "osteopenia"),
    ("  osteopenia\n", "osteopenia"),
    ("oSTEOPOROSIS", "osteoporosis"),
])
def test_normalise_label_spellings(value, expected):
    assert normalise_label(value) == expected


@pytest.mark.parametrize("value", ["osteopaenia", "osteo", "", "none", "low bmd", "1", None, 2])
def test_normalise_label_rejects_other_values(value):
    with pytest.raises(ValueError) as exc:
        normalise_label(value)
    msg = str(exc.value)
    assert repr(value) in msg  # the bad value is named
    assert all(c in msg for c in CLASSES)  # and so are the valid ones


@pytest.mark.parametrize("age,band", [
    (0, "0-49"),
    (18.0, "0-49"),
    (49.9, "0-49"),
    (49.999, "0-49"),
    (50, "50-59"),
    (50.0, "50-59"),
    (59.99, "50-59"),
    (60, "60-69"),
    (69.5, "60-69"),
    (70, "70-79"),
    (79.99, "70-79"),
    (80, "80+"),
    (80.0, "80+"),
    (104, "80+"),
    (np.float64(65.0), "60-69"),
    (None, None),
    (float("nan"), None),
])
def test_age_band(age, band):
    assert age_band(age) == band


@pytest.mark.parametrize("age", [-1, 250])
def test_age_band_out_of_range_is_none(age):
    assert age_band(age) is None


def test_float32_nan_t_score_raises():
    """A NaN from a float32 column is missing, not 'normal' (every comparison with NaN is False)."""
    with pytest.raises(ValueError, match="missing"):
        t_score_to_class(np.float32("nan"))

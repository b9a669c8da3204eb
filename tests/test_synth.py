"""Synthetic archive: deterministic, decodable, labelled consistently, tunable signal."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pathlib

import numpy as np
import pytest

from kneescreen.data.synth import SynthConfig, draw_subjects, write_archive
from kneescreen.fileio.probe import run_inspect
from kneescreen.labels import t_score_to_class


def _digest(root: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_archive_decodes_and_labels_match(small_archive):
    root, summary = small_archive
    assert summary["images"] == 24 and summary["planted_bad"] == 7
    out = io.StringIO()
    run_inspect([str(root / "images")], out=out)
    rows = {r["path"].split("/images/", 1)[1]: r for r in map(json.loads, out.getvalue().splitlines())}
    labels = list(csv.DictReader(open(root / "labels.csv")))
    planted = {r["key"]: r["expected"] for r in csv.DictReader(open(root / "planted.csv"))}
    assert set(rows) == {r["key"] for r in labels} | set(planted)
    for r in labels:
        assert rows[r["key"]]["status"] == "ok", rows[r["key"]]
        assert r["label"] == t_score_to_class(float(r["t_score"]))
    for key, expected in planted.items():
        if expected == "not_knee":  # decodes fine; the screening stage skips it by body part
            assert rows[key]["status"] == "ok" and rows[key]["body_part"] == "CHEST"
        else:
            assert rows[key]["error_code"] == expected, (key, rows[key])
    dicom = [r for r in rows.values() if r["format"] == "dicom"]
    assert {r["photometric"] for r in dicom} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({r["transfer_syntax"] for r in dicom}) >= 3
    # No raw identifier travels into the labels file.
    text = (root / "labels.csv").read_text()
    assert "MRN" not in text and "SYNTH^" not in text


def test_deterministic(tmp_path):
    cfg = SynthConfig(n=6, seed=5, size=96, workers=1)
    write_archive(str(tmp_path / "a"), cfg)
    write_archive(str(tmp_path / "b"), cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def _age_t_corr(c: float) -> float:
    subs = draw_subjects(SynthConfig(n=2000, seed=1, images_per_patient=1, covariate_signal=c))
    return float(np.corrcoef([s.age for s in subs], [s.t_score for s in subs])[0, 1])


def test_covariate_signal_is_tunable():
    assert _age_t_corr(1.0) < -0.35  # older -> lower T-score
    assert abs(_age_t_corr(0.0)) < 0.08


def test_image_signal_is_tunable():
    def corr(s):
        subs = draw_subjects(SynthConfig(n=1000, seed=2, images_per_patient=1, image_signal=s))
        return float(np.corrcoef([x.t_image for x in subs], [x.t_score for x in subs])[0, 1])

    assert corr(1.0) > 0.99 and abs(corr(0.0)) < 0.1


@pytest.mark.slow
def test_bone_texture_follows_t_score():
    """Mean bone-region intensity rises with T-score: the signal a CNN can learn."""
    from kneescreen.data.synth import render_knee

    subs = draw_subjects(SynthConfig(n=80, seed=4, images_per_patient=1))
    vals = [float(render_knee(s, 128)[40:90, 50:78].mean()) for s in subs]
    assert np.corrcoef(vals, [s.t_score for s in subs])[0, 1] > 0.3


@pytest.mark.s3
def test_write_archive_to_s3(s3_bucket):
    from kneescreen.fileio.store import Store

    summary = write_archive(f"s3://{s3_bucket}/synth", SynthConfig(n=4, seed=1, size=64, workers=1))
    keys = [o.key for o in Store.resolve().list_objects(f"s3://{s3_bucket}/synth")]
    assert "labels.csv" in keys and sum(k.startswith("images/") for k in keys) == summary["images"] == 4


def test_default_rendering_is_pinned():
    """The default (coarse) archive's pixels, pinned when `signal_scale` was added: the option
    must never change what the default writes. (Re-pin only on purpose, e.g. a numpy FFT change.)"""
    from kneescreen.data.synth import render_knee

    h = hashlib.sha256()
    for sub in draw_subjects(SynthConfig(n=2, seed=9)):
        h.update(render_knee(sub, 64).tobytes())
    assert h.hexdigest() == "f2b5c688f2a0e45153c9bac7aa6691be5337fd494922e357468bcf74fea7d838"


def test_signal_scale_option(tmp_path):
    """`--signal-scale fine` is a flag with checked choices; fine archives carry the physical pixel
    spacing (the synthetic condyles 90 mm wide), the default keeps its nominal one."""
    import argparse

    import pydicom

    from kneescreen._private.commands import SynthCommand
    from kneescreen.config import add_arguments, build
    from kneescreen.data.synth import FOV_MM
    from kneescreen.errors import KneescreenError

    parser = argparse.ArgumentParser()
    add_arguments(parser, SynthCommand)
    cmd = build(SynthCommand, parser.parse_args(["--out", "x", "--signal-scale", "fine"]))
    assert cmd.synth.signal_scale == "fine" and SynthConfig().signal_scale == "coarse"
    with pytest.raises(KneescreenError):
        build(SynthConfig, values={"signal_scale": "medium"})
    for scale, spacing in (("fine", FOV_MM / 64), ("coarse", 0.15 * 384 / 64)):
        write_archive(str(tmp_path / scale), SynthConfig(n=2, seed=1, size=64, workers=1, signal_scale=scale))
        ds = pydicom.dcmread(next((tmp_path / scale / "images").rglob("*.dcm")))
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(spacing, rel=1e-6)

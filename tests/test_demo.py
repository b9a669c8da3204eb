"""`kneescreen demo` end to end (small settings): synth -> train -> screen -> rescan."""

from __future__ import annotations

import pytest

from kneescreen.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_runs_and_prints_summary(ray_local, tmp_path, capsys):
    out = tmp_path / "demo"
    # Train on the labels linked from the synthetic registry with a tiny image size: minutes -> seconds.
    rc = main(["demo", "--out", str(out), "--n", "100", "--epochs", "1",
               "--image-size", "64"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "kneescreen demo summary" in text and "screened 0" in text and "synthetic truth recovered" in text
    assert "(efficientnet_lite0-gray-frozen, 64px)" in text  # the recipe's member set (100 films: frozen only)
    assert (out / "link" / "link_audit.json").exists()
    assert (out / "bundle" / "manifest.json").exists()
    assert (out / "report" / "report.html").exists() and "report.html" in text
    assert len(list((out / "screening" / "runs").glob("*.json"))) == 2

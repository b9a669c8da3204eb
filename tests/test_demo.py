"""`kneescreen demo` end to end on a small archive."""

from __future__ import annotations

import json

from kneescreen.cli import main


def test_demo_runs_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    # Point the dev set at a missing folder so the split runs on the synthetic archive (fast).
    assert main(["demo", "--out", str(out), "--n", "16", "--dev-set", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "kneescreen demo summary" in text and "cross-split leaks 0" in text
    rows = [json.loads(x) for x in (out / "inspect.jsonl").read_text().splitlines()]
    assert len(rows) == 16 + 7
    assert json.loads((out / "split" / "audit.json").read_text())["summary"]["leaks"] == 0

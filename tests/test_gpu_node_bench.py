"""bench/gpu_node.py runs end to end as one command (tiny here; GPU stages skipped with a note on
CPU machines, measured on GPU nodes)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_gpu_node_bench_runs_tiny(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_node
    finally:
        sys.path.remove(str(BENCH))
    import torch

    out = tmp_path / "result.json"
    argv = ["--n", "6", "--side", "256", "--batch", "4", "--procs", "1", "--work", str(tmp_path / "w"), "--out", str(out)]
    assert gpu_node.main(argv) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert res["archive"]["kinds"] == {"uncompressed": 2, "jpeg2000-lossless": 2, "jpeg-lossless": 2}
    for stage in ("storage read", "model only", "cpu-decode pipeline"):
        assert res["stages"][stage]["images_per_s"] > 0, stage
        assert stage in printed
    device = res["stages"]["device-preprocess pipeline"]
    assert device.get("images_per_s", 0) > 0 or "not in this checkout" in device["skipped"]
    if not torch.cuda.is_available():
        for stage in ("gpu decode only", "gpu-decode pipeline"):
            assert res["stages"][stage] == {"skipped": "no CUDA device: GPU decode not measured"}
        assert "GPU decode not measured" in printed
    assert set(res["decode_per_core"]) == {"uncompressed", "jpeg2000-lossless", "jpeg-lossless"}
    assert "verdict:" in printed
    # A second run reuses the archive it built (the files are not written again).
    files = sorted((tmp_path / "w" / "archive").glob("*.dcm"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert gpu_node.main(argv) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes

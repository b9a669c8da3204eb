"""Screening settings: pool sizing and argument checks that fail before any work starts."""

from __future__ import annotations

import json

import pytest

from kneescreen.errors import KneescreenError
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.pipeline import resolve_actors, run_screen


def _cfg(**kw) -> ScreenConfig:
    return ScreenConfig(input="/nonexistent/in", output="/nonexistent/out", bundle="/nonexistent/bundle", **kw)


def test_explicit_actor_count_wins():
    assert resolve_actors(_cfg(actors=3), {"CPU": 64, "GPU": 8}) == 3


def test_gpu_runs_default_to_one_actor_per_gpu():
    assert resolve_actors(_cfg(use_gpu=True), {"CPU": 32, "GPU": 4}) == 4
    assert resolve_actors(_cfg(use_gpu=True), {"CPU": 32}) == 1  # no GPU yet (autoscaling): one


def test_cpu_runs_leave_half_the_cpus_to_decoding():
    assert resolve_actors(_cfg(), {"CPU": 4}) == 2
    assert resolve_actors(_cfg(), {"CPU": 16}) == 8
    assert resolve_actors(_cfg(actor_cpus=2), {"CPU": 16}) == 4
    assert resolve_actors(_cfg(), {"CPU": 1}) == 1


@pytest.mark.parametrize("field", ["actors", "batch_size", "decode_batch_size", "actor_cpus"])
def test_non_positive_sizes_are_rejected_before_any_work(field, monkeypatch):
    monkeypatch.setenv("KNEESCREEN_PSEUDONYM_KEY", "test-key-0123456789abcdef")
    with pytest.raises(KneescreenError, match="must be at least 1"):
        run_screen(_cfg(**{field: 0}))


def test_cli_exposes_pool_and_block_sizes(capsys):
    from kneescreen.cli import main

    assert main(["screen", "--input", "in", "--output", "out", "--bundle", "b", "--decode-batch-size", "16",
                 "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["decode_batch_size"] == 16 and cfg["actors"] is None


def test_stage_blocks_have_one_schema_whatever_their_values():
    """A block with no errors and a block with only errors must concatenate into one batch."""
    import numpy as np

    from kneescreen.screen.stages import typed_table

    def block(code, age):
        return typed_table({"key": np.array(["a", "b"], dtype=object), "status": np.array(["ok", "ok"], dtype=object),
                            "error_code": np.array([code, code], dtype=object), "age": [age, age],
                            "img_8": np.zeros((2, 8, 8), np.uint8)})

    clean, broken = block(None, float("nan")), block("truncated", 61.0)
    assert clean.schema == broken.schema
    assert clean.column("error_code").null_count == 2 and clean.column("age").null_count == 2

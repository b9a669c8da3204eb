"""The quiet console: stage lines and one progress line on the console, Ray's chatter in the log
file; --verbose shows everything. No Ray cluster needed (the demo's line count is checked by hand:
docs/operations.md)."""

from __future__ import annotations

import io
import logging
import pathlib
import re
import types

import pytest

from kneescreen._private import console


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Err:
    """What the console wrote to stderr (the handler looks sys.stderr up at each write)."""

    def __init__(self, capsys):
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def quiet(tmp_path, capsys):
    """Quiet console, stderr captured; logging restored afterwards."""
    path = console.setup("screen", str(tmp_path / "out"), verbose=False)
    yield Err(capsys), path
    console._reset()
    console._state["quiet"] = False


def _log_text(path: str) -> str:
    for h in logging.getLogger().handlers:
        h.flush()
    return pathlib.Path(path).read_text(encoding="utf-8")


def test_stage_lines_on_console_chatter_in_the_log_file(quiet):
    err, path = quiet
    logging.getLogger("kneescreen.screen.pipeline").info("run r1: listed 5 objects")
    logging.getLogger("kneescreen.fileio.reader").info("per-file detail")
    logging.getLogger("kneescreen.data.decode").warning("left out 2 images")
    logging.getLogger("ray.data._internal.progress.logging_progress").info("======= Running Dataset: d_0 =======")
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").warning(
        "Failed to query Ray Train Controller actor state.")
    logging.getLogger("ray.data").error("a real failure")
    shown = err.getvalue()
    assert "listed 5 objects" in shown and "WARNING: left out 2 images" in shown and "a real failure" in shown
    assert "per-file detail" not in shown and "Running Dataset" not in shown and "Failed to query" not in shown
    assert len(shown.splitlines()) == 3
    logged = _log_text(path)
    for text in ("listed 5 objects", "per-file detail", "Running Dataset", "Failed to query", "a real failure"):
        assert text in logged, text


def test_log_file_is_in_the_output_folder(tmp_path):
    local = console.log_path_for("demo", str(tmp_path / "demo-out"))
    assert local.startswith(str(tmp_path / "demo-out" / "logs" / "demo-")) and local.endswith(".log")
    remote = console.log_path_for("jobs/screen.py", "s3://bucket/out")
    assert "s3:" not in remote and "kneescreen-logs" in remote and "jobs-screen.py-" in remote


def test_rays_own_console_handlers_come_back_with_verbose(quiet, tmp_path):
    ray_data = logging.getLogger("ray.data")
    console.attach_ray()  # what ensure_ray does once Ray is up (setup itself never imports Ray)
    assert not any(type(h).__name__ == "PlainRayHandler" for h in ray_data.handlers)
    assert ray_data.propagate
    import ray.data

    assert ray.data.DataContext.get_current().enable_progress_bars is False
    console.setup("screen", str(tmp_path / "v"), verbose=True)
    assert any(type(h).__name__ == "PlainRayHandler" for h in ray_data.handlers)
    assert ray_data.propagate is False
    root = logging.getLogger()
    assert sum(getattr(h, console._MARK, False) for h in root.handlers) == 2  # no duplicates on re-setup


def test_verbose_console_shows_everything(tmp_path, capsys):
    try:
        path = console.setup("screen", str(tmp_path), verbose=True)
        logging.getLogger("kneescreen.fileio.reader").debug("per-file detail")
        ray_handlers = logging.getLogger("ray").handlers
    finally:
        console._reset()
    assert "DEBUG kneescreen.fileio.reader: per-file detail" in capsys.readouterr().err
    assert "per-file detail" in pathlib.Path(path).read_text(encoding="utf-8")  # the file gets a copy
    assert any(type(h).__name__ == "PlainRayHandler" for h in ray_handlers)  # Ray prints as Ray does


class _Op:
    """The two things the callback reads from a Ray Data physical operator."""

    def __init__(self, name: str, rows: int):
        self.name, self.metrics = name, types.SimpleNamespace(rows_task_outputs_generated=rows)


def _executor(rows: int, name: str = "MapBatches(EnsemblePredictor)->MapBatches(to_prediction_table)"):
    ops = [_Op(n, r) for n, r in (("Input", 0), ("MapBatches(decode_stage)", rows + 3), (name, rows), ("Write", 1))]
    return types.SimpleNamespace(_topology={op: None for op in ops})


def test_screening_progress_line_on_a_terminal(quiet, monkeypatch):
    _, _ = quiet
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setattr(console, "TTY_PROGRESS_S", 0.0)
    logging.getLogger("kneescreen.screen.pipeline").info(
        "run r1: screening 100 objects", extra={"progress_total": 100, "progress_unit": "images",
                                                "progress_label": "screening", "progress_op": "EnsemblePredictor"})
    callback = console._DataProgress()
    callback.on_execution_step(_executor(40))  # the inference operator's rows, not decode's 43
    shown = tty.getvalue()
    assert "run r1: screening 100 objects\n" in shown
    last = shown.rsplit("\r\x1b[K", 1)[-1]
    assert last.startswith("  screening: 40/100 images") and "images/s" in last and "ETA " in last
    logging.getLogger("kneescreen.data.decode").warning("left out 1 image")  # clears, prints, redraws
    assert "\r\x1b[K" + "WARNING: left out 1 image\n" in re.sub(r"\d\d:\d\d:\d\d ", "", tty.getvalue())
    assert tty.getvalue().rsplit("\n", 1)[-1].startswith("\r\x1b[K  screening: 40/100 images")
    callback.after_execution_succeeds(None)
    assert tty.getvalue().endswith("\r\x1b[K") and console.PROGRESS.label is None


def test_no_progress_spam_off_a_terminal(quiet):
    err, _ = quiet
    logging.getLogger("kneescreen.screen.pipeline").info(
        "screening", extra={"progress_total": 10, "progress_op": "EnsemblePredictor"})
    callback = console._DataProgress()
    for rows in range(11):
        callback.on_execution_step(_executor(rows))
    callback.after_execution_succeeds(None)
    assert err.getvalue().count("\n") == 1  # the stage line only: a job log gets a line a minute at most


def _epoch(member: str, done: int, total: int, rate: float) -> None:
    """The record `kneescreen.train.progress` logs for one reported epoch."""
    logging.getLogger("kneescreen.train.progress").info(
        "%s: epoch %d/%d", member, done, total,
        extra={"progress_done": done, "progress_total": total, "progress_unit": "epochs",
               "progress_label": f"training {member}", "progress_note": f"{rate:,.1f} images/s"})


def test_training_epochs_from_progress_records(quiet, monkeypatch):
    _, path = quiet
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    _epoch("efficientnet_lite0-gray", 1, 8, 11.0)
    _epoch("efficientnet_lite0-gray", 2, 8, 12.5)
    shown = tty.getvalue()
    # Every epoch redraws the line (not only after TTY_PROGRESS_S); the record's text is for the file.
    assert "training efficientnet_lite0-gray: 1/8 epochs  11.0 images/s" in shown
    assert shown.rsplit("\r\x1b[K", 1)[-1].startswith("  training efficientnet_lite0-gray: 2/8 epochs  12.5 images/s")
    assert "epoch 2/8" not in shown and "efficientnet_lite0-gray: epoch 2/8" in _log_text(path)
    logging.getLogger("kneescreen.train.run").info("bundle written")  # the next stage ends the epoch line
    assert console.PROGRESS.label is None and tty.getvalue().endswith("bundle written\n")


def test_worker_output_goes_to_the_file_and_is_not_parsed(quiet, monkeypatch):
    _, path = quiet
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    lines = ["[efficientnet_lite0-gray] epoch 2/8 loss 1.023 12.5 img/s", "Failed to query Ray Train Controller actor state."]
    console._worker_lines({"pid": 42, "actor_name": "RayTrainWorker", "is_err": True, "lines": lines})
    assert tty.getvalue() == "" and console.PROGRESS.label is None  # printed text is never progress
    assert "Failed to query" in _log_text(path) and "epoch 2/8" in _log_text(path)


def test_verbose_console_prints_epoch_records_as_lines(tmp_path, capsys):
    try:
        console.setup("train", str(tmp_path), verbose=True)
        _epoch("test_cnn-gray", 3, 4, 9.0)
    finally:
        console._reset()
    assert "kneescreen.train.progress: test_cnn-gray: epoch 3/4" in capsys.readouterr().err
    assert console.PROGRESS.label is None

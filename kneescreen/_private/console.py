"""The console of the CLI and the Ray jobs: one line per stage, one live progress line, the rest
to a log file.

Ray is generous with output: Ray Data dumps its execution status every 10 s when stdout is not a
terminal, prints its plan and a summary per dataset, and the Ray Train controller's helper actors
warn every few seconds when the state API is unavailable (it is, with the dashboard off). None of
it helps someone running `kneescreen demo`; all of it helps someone debugging. So, unless
``--verbose``:

- the console shows kneescreen's stage lines (INFO from `STAGE_LOGGERS`), kneescreen's warnings,
  and errors from anyone;
- everything else that goes through Python logging (``ray``, ``ray.data``, ``ray.train``, Python
  warnings) and every line Ray forwards from its workers goes to the log file only;
- Ray Data's own progress reporting is off (``DataContext.enable_progress_bars``); instead a record
  with ``extra={"progress_total": n, ...}`` starts one progress line (done / total, rate, ETA)
  fed by a Ray Data execution callback. A record with ``extra={"progress_done": k,
  "progress_total": n, "progress_label": ..., "progress_unit": ..., "progress_note": ...}`` steps
  a line the library drives itself (training: one record per reported epoch,
  `kneescreen.train.progress`); its text goes to the log file. Progress is read from the
  records' fields, never parsed back out of printed text. On a terminal the line redraws in
  place; elsewhere (job logs) it is printed at most once a minute.

Nothing here imports Ray until a command starts it: `setup` only configures Python logging, and
`attach_ray` (called by `kneescreen._private.cluster.ensure_ray`) quiets Ray once it is up, so
commands that never use Ray (``kneescreen inspect``) start without loading it.

With ``--verbose`` the console shows everything at DEBUG, as Ray prints it, and the file still
gets a copy. Ray 2.60 knobs used: ``DataContext.enable_progress_bars`` and
``custom_execution_callback_classes``, the ``ray``/``ray.data`` loggers' handlers, and the driver's
worker-output dispatcher (``ray._private.ray_logging``; the fallback if that moves is Ray's own
printing).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import tempfile
import threading
import time

# Whose INFO lines are stage lines on the console; other kneescreen INFO (per-file detail, fold
# and fingerprinting chatter) goes to the log file. Warnings from any kneescreen module are shown.
STAGE_LOGGERS = ("kneescreen.cli", "kneescreen.demo", "kneescreen.screen.pipeline", "kneescreen.train.run")
# Loggers that Ray gives their own console handler (and propagate=False); quiet mode sends their
# records to the root logger's handlers instead, keeping Ray's own file handlers.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
NON_TTY_PROGRESS_S = 60.0  # job logs: a progress line at most this often
TTY_PROGRESS_S = 0.25
_MARK = "_kneescreen_console"  # set on the handlers this module installs, so setup can be re-run

_state = {"quiet": False, "ray_quiet": False, "log_path": None, "removed": [], "printers": []}
_lock = threading.RLock()
# Worker output goes to the file under Ray's logger tree (never a kneescreen stage line).
_worker_log = logging.getLogger("ray.worker_output")


def _stream():
    return sys.stderr  # looked up at each write: pytest's capsys and redirections swap it


class Progress:
    """One progress line: done / total, rate and ETA; redrawn in place on a terminal."""

    def __init__(self):
        self.label = self.kind = self.note = self.drawn = None
        self.shown = False  # a partial line is on the terminal now

    def start(self, label: str, total: int, unit: str, kind: str = "data", done: int = 0) -> None:
        with _lock:
            self.finish()
            self.label, self.kind, self.total, self.unit = label, kind, max(0, int(total)), unit
            self.done = self.d0 = int(done)  # rate and ETA count from here
            self.t0 = self.last = time.monotonic()
            self.note = None

    def update(self, done: int, total: int | None = None, note: str | None = None) -> None:
        with _lock:
            if self.label is None:
                return
            self.done, self.note = int(done), note or self.note
            self.total = int(total) if total is not None else self.total
            now, tty = time.monotonic(), _stream().isatty()
            # On a terminal, a step the library reports (an epoch) always redraws: they are rare.
            if now - self.last >= (TTY_PROGRESS_S if tty else NON_TTY_PROGRESS_S) or \
                    (tty and (self.done >= self.total or self.kind == "steps")):
                self.last = now
                self.draw(tty)

    def text(self) -> str:
        parts = [f"  {self.label}: {self.done:,}/{self.total:,} {self.unit}"]
        elapsed, gained = time.monotonic() - self.t0, self.done - self.d0
        rate = gained / elapsed if elapsed > 0 and gained > 0 else None
        if self.note:
            parts.append(self.note)
        elif rate:
            parts.append(f"{rate:,.1f} {self.unit}/s")
        if rate:
            eta = max(0, self.total - self.done) / rate
            parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        return "  ".join(parts)

    def draw(self, tty: bool) -> None:
        text = self.text()
        if tty and self.shown and text == self.drawn:
            return  # the scheduler steps far more often than the numbers change
        out = _stream()
        if tty:
            out.write("\r\x1b[K" + text)
            self.shown = True
        else:
            out.write(text + "\n")
        self.drawn = text
        out.flush()

    def clear(self) -> None:
        """Take the partial line off the terminal (before a log line is written)."""
        if self.shown:
            _stream().write("\r\x1b[K")
            self.shown = False

    def finish(self) -> None:
        with _lock:
            self.clear()
            self.label = self.kind = None


PROGRESS = Progress()


class _ConsoleHandler(logging.Handler):
    """Writes to the current stderr, around the progress line; starts progress on request."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            done, total = getattr(record, "progress_done", None), getattr(record, "progress_total", None)
            with _lock:
                if _state["quiet"] and done is not None:
                    _step(record)  # the record's text is for the log file; the line shows its numbers
                    return
                PROGRESS.clear()
                _stream().write(self.format(record) + "\n")
                if done is None and total is not None:
                    _DataProgress.arm(getattr(record, "progress_label", "progress"), total,
                                      getattr(record, "progress_unit", "items"), getattr(record, "progress_op", None))
                elif PROGRESS.kind == "steps":
                    PROGRESS.finish()  # training progress belongs to the stage line before this one
                elif PROGRESS.label is not None and _stream().isatty():
                    PROGRESS.draw(True)
                _stream().flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _step(record: logging.LogRecord) -> None:
    """A library-driven progress record (``progress_done``): start or move its line."""
    label = getattr(record, "progress_label", "progress")
    total = int(getattr(record, "progress_total", 0))
    done = int(record.progress_done)
    if PROGRESS.label != label or done <= PROGRESS.done:  # a new run (the next fold) under the same label
        PROGRESS.start(label, total, getattr(record, "progress_unit", "steps"), kind="steps", done=done)
    PROGRESS.update(done, total, note=getattr(record, "progress_note", None))


def _console_filter(record: logging.LogRecord) -> bool:
    """Quiet mode: stage lines, progress records, kneescreen warnings, anyone's errors."""
    if record.levelno >= logging.ERROR or getattr(record, "progress_done", None) is not None:
        return True
    if not record.name.startswith("kneescreen"):
        return False
    return record.levelno >= logging.WARNING or record.name.startswith(STAGE_LOGGERS)


class _QuietFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


def log_path_for(command: str, output: str | None) -> str:
    """``<output>/logs/<command>-<UTC time>.log`` for a local output, else under the temp dir
    (S3 outputs: the driver's log stays on the driver, next to Ray's own logs)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(output, "logs") if output and "://" not in output else \
        os.path.join(tempfile.gettempdir(), "kneescreen-logs")
    return os.path.join(base, f"{command.replace('/', '-')}-{stamp}.log")


def setup(command: str, output: str | None, verbose: bool) -> str:
    """Configure logging once per command; returns the log file's path.

    Args:
        command: the command's name (for the log file name).
        output: the command's output folder or URI, if it has one.
        verbose: everything to the console at DEBUG (Ray's own output as Ray prints it).
    """
    with _lock:
        _reset()
        root = logging.getLogger()
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        path = log_path_for(command, output)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        console = _ConsoleHandler()
        if verbose:
            console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        else:
            console.setFormatter(_QuietFormatter())
            console.addFilter(_console_filter)
        for h in (file_handler, console):
            setattr(h, _MARK, True)
            root.addHandler(h)
        # openjpeg logs every encoded tile at INFO; pydicom logs a traceback for each decoder
        # failure, which is already an error row with a code and message.
        logging.getLogger("openjpeg").setLevel(logging.WARNING)
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        _state.update(quiet=not verbose, log_path=path)
        if not verbose:
            logging.captureWarnings(True)
            if "ray" in sys.modules:
                attach_ray()  # Ray is already loaded in this process (tests, notebooks)
        return path


def _reset() -> None:
    """Undo an earlier `setup` in this process (tests run several commands in one process)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(h)
        h.close()
    for logger, handler, propagate in _state["removed"]:
        logger.addHandler(handler)
        logger.propagate = propagate
    _state["removed"] = []
    for dispatcher, (name, handler) in _state["printers"]:
        dispatcher.remove_handler("kneescreen_worker_lines")
        dispatcher.add_handler(name, handler)
    _state["printers"] = []
    _state["ray_quiet"] = False
    logging.captureWarnings(False)
    PROGRESS.finish()


def _quiet_ray() -> None:
    """Ray's console handlers off (records reach the root's file handler), Ray Data's progress
    reporting replaced by ours."""
    import ray.data

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
                _state["removed"].append((logger, h, logger.propagate))
        logger.propagate = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    callback = _data_progress_class()
    if callback not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(callback)


def attach_ray() -> None:
    """Quiet Ray for this command: its loggers to the log file, our data progress line, and what
    Ray forwards from its workers (stdout/stderr lines) to the log file. Call once Ray is
    imported (`ensure_ray` does, after ``ray.init``); a no-op unless quiet."""
    if not _state["quiet"]:
        return
    if not _state["ray_quiet"]:
        _quiet_ray()
        _state["ray_quiet"] = True
    try:
        import ray
        from ray._private.ray_logging import (
            global_worker_stdstream_dispatcher as dispatcher,
        )
    except ImportError:  # moved in a later Ray: its own printing stays
        return
    if not ray.is_initialized():
        return
    with dispatcher._lock:
        _state["printers"] += [(dispatcher, pair) for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("kneescreen_worker_lines")
    dispatcher.add_handler("kneescreen_worker_lines", _worker_lines)


def _worker_lines(data: dict) -> None:
    """Ray's log batch from one worker process: to the log file."""
    who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
    stream = "stderr" if data.get("is_err") else "stdout"
    for line in data.get("lines", ()):
        _worker_log.info("%s %s: %s", who, stream, line)


class _DataProgress:
    """Ray Data execution callback: the armed operator's output rows drive the progress line.

    Registered in ``DataContext.custom_execution_callback_classes`` (mixed with Ray's base class
    when Ray is up, `_data_progress_class`); Ray instantiates it once per dataset execution, so the
    armed state lives on the class.
    """

    armed: dict | None = None

    @classmethod
    def arm(cls, label: str, total: int, unit: str, op: str | None) -> None:
        cls.armed = {"label": label, "total": int(total), "unit": unit, "op": op}
        PROGRESS.start(label, total, unit, kind="data")

    def before_execution_starts(self, executor) -> None:
        pass

    def on_execution_step(self, executor) -> None:
        armed = _DataProgress.armed
        if armed is None:
            return
        try:
            ops = list(executor._topology)  # Ray 2.60 StreamingExecutor internals: guarded
            named = [op for op in ops if armed["op"] and armed["op"] in op.name]
            op = named[0] if named else next(o for o in reversed(ops) if not o.name.endswith("Write"))
            PROGRESS.update(op.metrics.rows_task_outputs_generated)
        except Exception:  # noqa: BLE001 - progress is a nicety; never fail a run for it
            _DataProgress.armed = None

    def after_execution_succeeds(self, executor) -> None:
        self._done()

    def after_execution_fails(self, executor, error) -> None:
        self._done()

    @staticmethod
    def _done() -> None:
        if _DataProgress.armed is not None:
            _DataProgress.armed = None
            PROGRESS.finish()


_registered: list[type] = []


def _data_progress_class() -> type:
    """`_DataProgress` with Ray 2.60's callback interface as a base (internal path, imported only
    once Ray is in use; without it the plain class still has every hook Ray calls)."""
    if not _registered:
        try:
            from ray.data._internal.execution.execution_callback import ExecutionCallback
        except ImportError:  # pragma: no cover
            _registered.append(_DataProgress)
        else:
            _registered.append(type("DataProgress", (_DataProgress, ExecutionCallback), {}))
    return _registered[0]

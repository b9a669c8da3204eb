"""Training progress as data: each epoch's reported metrics, from Ray Train to the driver's log.

    workers: ray.train.report(metrics)            (train.loop: epoch, loss, val macro-F1, images/s)
      -> Train controller actor: `EpochReports.after_report` (a `ray.train.UserCallback`)
      -> `_Inbox` actor (fire-and-forget puts; the controller never blocks on it)
      -> driver thread (`EpochProgress`, around ``trainer.fit()``): one log record per epoch
         with the numbers as fields (``progress_done``/``progress_total``/...)

The library only logs; the CLI's console (`kneescreen._private.console`) turns the fields into its
progress line and writes the text to the log file. Ray 2.60 runs user callbacks on the Train
controller, not the driver, hence the inbox; the driver polls it because ``fit()`` blocks.
"""

from __future__ import annotations

import logging
import threading

import ray
from ray.train import UserCallback

_logger = logging.getLogger(__name__)
POLL_S = 0.5
FINAL = "final"  # the deployable fit's name (`train.trainer.Fit`): its lines carry the member's name alone


@ray.remote(num_cpus=0)
class _Inbox:
    """Reports waiting for the driver (a list: a handful of epochs per run)."""

    def __init__(self):
        self.items: list[dict] = []

    def put(self, item: dict) -> None:
        self.items.append(item)

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        return items


class EpochReports(UserCallback):
    """On the Train controller: forwards rank 0's metrics of every report to the driver's inbox."""

    def __init__(self, inbox):
        self.inbox = inbox

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics:
            self.inbox.put.remote(dict(metrics[0]))  # all ranks report the same all-reduced numbers


class EpochProgress:
    """Driver side, around one ``fit()``: ``RunConfig(callbacks=[progress.callback])`` inside
    ``with EpochProgress(member, epochs) as progress:``; each report becomes a log record.

    Args:
        member: the member's name (the progress line's label, with the fit's name after it for
            every fit but the deployable one: ``resnet18-gray oof1``).
        epochs: each fit's epoch budget.
    """

    def __init__(self, member: str, epochs: int):
        self.member, self.epochs = member, epochs
        self._stop = threading.Event()

    def __enter__(self) -> EpochProgress:
        self._inbox = _Inbox.remote()
        self.callback = EpochReports(self._inbox)
        self._thread = threading.Thread(target=self._poll, name=f"epochs-{self.member}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._deliver(ray.get(self._inbox.take.remote(), timeout=30))  # reports after the last poll
        except Exception:  # noqa: BLE001 - progress is a nicety; never fail (or mask) a run for it
            _logger.debug("%s: last progress reports lost", self.member, exc_info=True)
        ray.kill(self._inbox)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._deliver(ray.get(self._inbox.take.remote(), timeout=30))
            except Exception:  # noqa: BLE001
                _logger.debug("%s: progress poll failed", self.member, exc_info=True)

    def _deliver(self, reports: list[dict]) -> None:
        for m in reports:
            fit = m.get("fit", FINAL)
            who = self.member if fit == FINAL else f"{self.member} {fit}"
            if m.get("start_epoch") and m["epoch"] == m["start_epoch"] + 1:
                _logger.info("%s: resumed from checkpoint after epoch %d", who, m["start_epoch"])
            rate = m.get("train_images_per_s", 0.0)
            of = f", fit {m['fit_number']} of {m['fits']}" if m.get("fits", 1) > 1 else ""
            _logger.info("%s: epoch %d/%d loss %.3f val macro-F1 %.3f (best %.3f) %.1f images/s", who,
                         m["epoch"], self.epochs, m["train_loss"], m["val_macro_f1"], m["best_val_macro_f1"], rate,
                         extra={"progress_done": m["epoch"], "progress_total": self.epochs, "progress_unit": "epochs",
                                "progress_label": f"training {who}", "progress_note": f"{rate:,.1f} images/s{of}"})
            if m.get("early_stop"):
                _logger.info("%s: early stop after epoch %d: no val macro-F1 gain in %d epochs", who,
                             m["epoch"], m["bad_epochs"])

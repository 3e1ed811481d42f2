"""Training progress counted in iterations: a terminal progress bar, or plain log lines.

An *iteration* is one batch of ``train.total_batch_size`` samples: ``accumulate`` micro-batches and
``module.optimizer_steps_per_iteration`` Lightning ``global_step``\\ s (2 in the alternate mode). Lightning's
own bar counts data batches per data epoch ("Epoch 16/-2 4/6" over the small sample set), which says
nothing about how far a run is. ``train.progress`` chooses what ``sr-train`` shows:

* ``bar``  -- Lightning's progress bar (Rich when installed, else TQDM) over ``k / train.iterations``, with
  the iteration rate, elapsed time, ETA and the current ``train/loss``; validation keeps its own bar;
* ``log``  -- no cursor codes; one line every ``train.log_every`` iterations through the ``logging`` module
  (logger ``sr_lab.progress``: Hydra's console handler and the run's ``train.log``), e.g.
  ``iteration 40/25000 (0.2%) loss 0.1234 | 1.52 it/s | elapsed 0:00:26 | ETA 4:33:10``;
* ``none`` -- neither;
* ``auto`` -- ``bar`` when stdout is a terminal, else ``log`` (redirected to a file, SLURM, CI).

A resumed run counts on from the checkpoint's iteration.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE, RichProgressBar

log = logging.getLogger("sr_lab.progress")

MODES = ("auto", "bar", "log", "none")
DESCRIPTION = "Iterations"


def stream_isatty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (False for a replaced or closed stream)."""
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed / replaced streams
        return False


def resolve_mode(setting: Any, isatty: Callable[[], bool] | None = None, key: str = "train.progress") -> str:
    """A progress setting -> ``bar`` | ``log`` | ``none``: ``auto`` (or ``true``) is ``bar`` when ``isatty()``
    (default: stdout is a terminal), else ``log``; ``false`` / ``null`` is ``none``."""
    if setting is True:
        setting = "auto"
    mode = "none" if setting is None or setting is False else str(setting).strip().lower()
    if mode not in MODES:
        raise ValueError(f"{key}={setting} must be one of {', '.join(MODES)}")
    if mode == "auto":
        tty = isatty() if isatty is not None else stream_isatty(sys.stdout)
        mode = "bar" if tty else "log"
    return mode


def steps_per_iteration(pl_module: Any) -> int:
    return max(1, int(getattr(pl_module, "optimizer_steps_per_iteration", 1) or 1))


def iterations_done(trainer: Any, pl_module: Any) -> int:
    """Iterations completed: ``global_step // optimizer_steps_per_iteration``."""
    return int(trainer.global_step) // steps_per_iteration(pl_module)


def _scalar(value: Any) -> float | None:
    if torch.is_tensor(value):
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(timedelta(seconds=round(max(0.0, seconds))))


class ProgressLog(pl.Callback):
    """One plain log line every ``every`` iterations (and at the last one): iteration k/N, loss, it/s, ETA.

    ``it/s`` is the rate since the previous line; the ETA divides what is left by the rate since training
    (re)started in this process. Rank 0 only. A predict run (``run_mode=predict``) gets the same lines per
    predicted batch.
    """

    def __init__(self, total: int, every: int, loss_key: str = "train/loss", clock: Callable[[], float] = time.monotonic):
        self.total = int(total)
        self.every = max(1, int(every))
        self.loss_key = loss_key
        self._clock = clock
        self._predicted = 0
        self._reset(0)

    def _reset(self, start: int) -> None:
        now = self._clock()
        self._start, self._t0 = start, now
        self._last_k, self._last_t = start, now

    def _line(self, what: str, k: int, total: int, loss: float | None) -> str:
        now = self._clock()
        window = now - self._last_t
        rate = (k - self._last_k) / window if window > 0 else float("nan")
        mean = (k - self._start) / (now - self._t0) if now > self._t0 else float("nan")
        eta = (total - k) / mean if mean and mean > 0 and math.isfinite(mean) else None
        self._last_k, self._last_t = k, now
        pct = f" ({100.0 * k / total:.1f}%)" if total > 0 else ""
        parts = [f"{what} {k}/{total}{pct}" + (f" loss {loss:.4g}" if loss is not None else "")]
        parts.append(f"{rate:.2f} it/s" if math.isfinite(rate) else "- it/s")
        parts.append(f"elapsed {format_seconds(now - self._t0)}")
        parts.append(f"ETA {format_seconds(eta)}")
        return " | ".join(parts)

    # training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(iterations_done(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        k = iterations_done(trainer, pl_module)
        if k <= self._last_k or not trainer.is_global_zero:
            return  # a micro-batch inside an iteration, or a rank that does not print
        if k % self.every == 0 or k >= self.total:
            loss = _scalar(trainer.callback_metrics.get(self.loss_key))
            log.info(self._line("iteration", k, self.total, loss))

    # predict (stages that write outputs, e.g. latent records)
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(0)
        self._predicted = 0

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._predicted = k = self._predicted + 1
        if not trainer.is_global_zero:
            return
        total = int(sum(n for n in trainer.num_predict_batches if math.isfinite(n)))
        if k % self.every == 0 or k >= total:
            log.info(self._line("predict batch", k, total, None))


class IterationRichProgressBar(RichProgressBar):
    """Lightning's Rich bar with one training task over ``k / total`` iterations for the whole run (not
    reset per data epoch); the columns give it/s (iterations), elapsed and remaining time, and the
    progress-bar metrics (``train/loss``). Validation and predict bars are Lightning's."""

    def __init__(self, total: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.total = int(total)

    def _init_progress(self, trainer: pl.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None:  # Rich's default 30 s rate window shows "0.00it/s" for slow iterations
            self.progress.speed_estimate_period = max(self.progress.speed_estimate_period, 300.0)

    def _add_train_task(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert self.progress is not None
        self.train_progress_bar_id = self.progress.add_task(
            DESCRIPTION, total=self.total, completed=min(iterations_done(trainer, pl_module), self.total))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._add_train_task(trainer, pl_module)
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:  # Lightning's hook for a mid-epoch restart
        self._add_train_task(self.trainer, self.trainer.lightning_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_train_task(trainer, pl_module)
        self._update(self.train_progress_bar_id, min(iterations_done(trainer, pl_module), self.total))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class IterationTQDMProgressBar(TQDMProgressBar):
    """The TQDM counterpart of :class:`IterationRichProgressBar` (used when Rich is not installed)."""

    def __init__(self, total: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.total = int(total)
        self._shown = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        start = min(iterations_done(trainer, pl_module), self.total)
        bar.reset(total=self.total)
        bar.initial = start
        bar.n = start
        bar.set_description(DESCRIPTION)
        self._shown = start

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per data epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = min(iterations_done(trainer, pl_module), self.total)
        if n != self._shown and self._should_update(n, self.total):
            self._shown = n
            if not self.train_progress_bar.disable:
                self.train_progress_bar.n = n
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                self.train_progress_bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def iteration_progress_bar(total: int) -> RichProgressBar | TQDMProgressBar:
    """The iteration bar: Rich when installed (Lightning's default bar too), else TQDM."""
    return IterationRichProgressBar(total) if _RICH_AVAILABLE else IterationTQDMProgressBar(total)

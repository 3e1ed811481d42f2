"""Small Lightning callbacks shared by every stage."""
from __future__ import annotations

import logging

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class DataSkipReport(pl.Callback):
    """At the end of every training epoch, report how many images the data module skipped (files
    that failed to decode or were smaller than the crop), and log the count as ``data/skipped``."""

    def __init__(self):
        self.total = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "pop_skip_report"):
            return
        count, paths = dm.pop_skip_report()
        self.total += count
        if count:
            log.warning("epoch %d: skipped %d unreadable image load(s) (%d file(s)): %s", trainer.current_epoch,
                        count, len(paths), ", ".join(map(str, paths[:5])) + (" ..." if len(paths) > 5 else ""))
        pl_module.log("data/skipped", float(self.total), on_epoch=True, on_step=False, rank_zero_only=True)

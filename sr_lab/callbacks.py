"""Small Lightning callbacks shared by every stage."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\r", " ").replace("\n", " ")


class DataSkipReport(pl.Callback):
    """Report the HR files the data module did not use: excluded when the folders were probed
    (unreadable header, smaller than the crop) or failed at load time (truncated, ...). Each file
    counts once, however often it was drawn (the data module's ``skipped_files()``).

    * ``data/skipped`` (number of distinct files) is logged at every training batch with
      ``on_step=True``, so it lands in the same rows, on the same step axis, as the training scalars;
    * at the end of a training epoch, one warning summarises the list, only if it changed since the
      previous summary;
    * at the end of training (or when it fails), ``<output_dir>/skipped_files.txt`` gets the final list,
      one ``path<TAB>reason`` per line (under DDP, the union over ranks); a stale one from an earlier run
      in the folder is removed when nothing was skipped.

    Args:
        output_dir: run folder (``${paths.output_dir}`` in ``conf/callbacks/default.yaml``);
            ``None``: the trainer's ``default_root_dir``.
    """

    FILE_NAME = "skipped_files.txt"

    def __init__(self, output_dir: str | os.PathLike | None = None):
        self.output_dir = output_dir
        self._summarised: set[str] = set()

    @staticmethod
    def _datamodule(trainer: pl.Trainer):
        dm = trainer.datamodule
        return dm if dm is not None and callable(getattr(dm, "skipped_files", None)) else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        dm = self._datamodule(trainer)
        if dm is not None:
            pl_module.log("data/skipped", float(dm.skipped_count()), on_step=True, on_epoch=False,
                          rank_zero_only=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self._datamodule(trainer)
        if dm is None or not trainer.is_global_zero:
            return
        skipped = dm.skipped_files()
        if set(skipped) == self._summarised:
            return
        new = [p for p in skipped if p not in self._summarised]
        self._summarised = set(skipped)
        log.warning("epoch %d: %d HR file(s) not used so far (%d new: %s); the list goes to %s at the end",
                    trainer.current_epoch, len(skipped), len(new),
                    ", ".join(new[:5]) + (" ..." if len(new) > 5 else ""), self._path(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, gather=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, gather=False)  # other ranks may be gone: this rank's list

    def _path(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir if self.output_dir is not None else trainer.default_root_dir) / self.FILE_NAME

    def _write(self, trainer: pl.Trainer, gather: bool) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        skipped = dm.skipped_files()
        if gather and trainer.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                parts: list = [None] * dist.get_world_size()
                dist.all_gather_object(parts, skipped)
                skipped = {}
                for part in parts:
                    for path, reason in (part or {}).items():
                        skipped.setdefault(path, reason)
        if not trainer.is_global_zero:
            return
        path = self._path(trainer)
        if not skipped:
            path.unlink(missing_ok=True)
            return
        from sr_lab.utils.atomic import atomic_write_text

        atomic_write_text(path, "".join(f"{_one_line(p)}\t{_one_line(r)}\n" for p, r in skipped.items()))
        log.info("%d HR file(s) were not used; list: %s", len(skipped), path)


class CompileStage(pl.Callback):
    """``speed.compile``: ``torch.compile`` the stage's UNet and per-step branch networks
    (:func:`sr_lab.models.speed.compile_stage`) once the strategy has moved the model to its device and wrapped
    it (DDP / FSDP): Lightning calls ``on_fit_start`` / ``on_predict_start`` after that. Compiles once."""

    def __init__(self, speed):
        self.speed = speed
        self.compiled: list[str] | None = None

    def _compile(self, pl_module: pl.LightningModule) -> None:
        if self.compiled is None:
            from sr_lab.models.speed import compile_stage

            self.compiled = compile_stage(pl_module, self.speed)
            log.info("speed: compiled %s", ", ".join(self.compiled) or "nothing")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)

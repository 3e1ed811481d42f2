"""Checkpoint I/O: atomic writes and ``weights_only`` loads.

Lightning checkpoints (the step checkpoints and ``last.ckpt``: ``ModelCheckpoint(save_last=True)`` saves
``last.ckpt`` through ``trainer.save_checkpoint`` as well, so through this plugin) are written with
:func:`sr_lab.utils.atomic.atomic_write`: a temporary file in the target folder, flushed to disk, given
the umask's mode and moved into place with ``os.replace`` (atomic on POSIX). An interrupted save never
leaves a truncated file, and a kill during a save leaves the earlier ``last.ckpt`` as it was.
They are read back with ``torch.load(weights_only=True)``, so a checkpoint cannot execute code.
Which tensors a checkpoint holds is decided by the LightningModule (trainable weights only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sr_lab.utils.atomic import atomic_torch_save

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location, weights_only=True)

"""Image grids for validation: saved as PNG next to the run and sent to image-capable loggers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sr_lab.utils.atomic import atomic_save_image

log = logging.getLogger(__name__)


def make_grid_rows(rows: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Rows of (3, H, W) images in [0, 1] (resized to the first image's size) -> HxWx3 uint8 grid."""
    h, w = rows[0][0].shape[-2:]
    out = []
    for row in rows:
        cells = []
        for img in row:
            img = img.detach().float().cpu().clamp(0, 1)
            if img.shape[-2:] != (h, w):
                img = F.interpolate(img[None], size=(h, w), mode="nearest")[0]
            cells.append(F.pad(img, (pad, pad, pad, pad), value=1.0))
        out.append(torch.cat(cells, dim=-1))
    grid = torch.cat(out, dim=-2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def log_image(trainer, key: str, image: np.ndarray, caption: str = "") -> Path | None:
    """Save ``image`` under ``<log_dir>/images/`` and send it to W&B / TensorBoard loggers if present."""
    step = trainer.global_step
    path = None
    if trainer.is_global_zero:
        # not trainer.log_dir: under DDP that is a collective broadcast and would deadlock here
        log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
        root = Path(log_dir or trainer.default_root_dir) / "images"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{key.replace('/', '_')}_step{step:07d}.png"
        atomic_save_image(path, image, format="PNG")
    for logger in trainer.loggers:
        name = type(logger).__name__
        try:
            if name == "WandbLogger":
                logger.log_image(key=key, images=[image], caption=[caption] if caption else None, step=step)
            elif name == "TensorBoardLogger":
                logger.experiment.add_image(key, image, step, dataformats="HWC")
        except Exception as exc:  # a logger failing to take an image must not stop training
            log.warning("could not log image %s to %s: %s", key, name, exc)
    return path

"""Evaluation: metrics (pyiqa + sr_lab's own PSNR/SSIM), CCSR stability (G-STD, L-STD), reports,
sweep collection, and synthetic test sets.

One file per concept: ``metrics.py`` (which metrics, built through pyiqa), ``weights.py`` (their
local weight files, no network), ``score.py`` (pair SR runs with HR and score them),
``stability.py`` (G-STD / L-STD, CCSR Sec. 4.2), ``report.py`` (CSV / JSON / markdown),
``image_table.py`` (LR | SR seeds | HR), ``loggers.py`` (CSV / W&B), ``inference.py`` (the
``infer`` node), ``config.py`` (validation), ``run.py`` (``sr-eval``), ``collect.py``
(``sr-collect``), ``testset.py`` (``sr-make-testset``). Heavy imports (pyiqa, Hydra apps) happen
inside the functions that need them.
"""
from .stability import g_std, l_std, l_std_image, per_image_std, pixel_std_map

__all__ = ["g_std", "l_std", "l_std_image", "per_image_std", "pixel_std_map"]

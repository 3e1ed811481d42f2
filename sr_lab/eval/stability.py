"""CCSR stability metrics G-STD and L-STD (CCSR paper 000, Sec. 4.2, Eq. 4; spec
``degradation_and_metrics.md`` §5, matching the authors' ``cal_iqa/iqa_G-STD.py`` and
``cal_iqa/iqa_L-STD.py``).

* G-STD of a metric p over M images and N runs:
  ``G-STD = (1/M) Σ_j sqrt( (1/N) Σ_i (p_i^j − mean_i p_i^j)² )`` — the mean over images of the
  *population* (ddof = 0) standard deviation over runs (spec §5.1 step 3-4).
* L-STD: per image, stack the N SR results as RGB in [0, 1] with 4 px removed from every border,
  take the per-pixel, per-channel population std over runs, and average it over (c, h, w); L-STD is
  the mean of that over images (spec §5.2; the paper's printed formula lacks the square, the code
  computes this std).

With N = 1 both are 0 (the std of one value is 0).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["per_image_std", "g_std", "g_std_from_scores", "pixel_std_map", "l_std_image", "l_std", "L_STD_CROP"]

L_STD_CROP = 4  # spec §5.2 step 1


def per_image_std(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """[M images × N runs] -> (M,) population std over runs (ddof = 0)."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a [images x runs] array, got shape {a.shape}")
    return a.std(axis=1, ddof=0)


def g_std(values: np.ndarray | Sequence[Sequence[float]]) -> float:
    """G-STD (CCSR Eq. 4): mean over images of the population std over runs of a metric."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    return float(per_image_std(a).mean())


def g_std_from_scores(scores: Mapping[str, Mapping[str, float]]) -> tuple[float, dict[str, float]]:
    """``{image: {run: value}}`` (every image with the same runs) -> (G-STD, per-image std)."""
    keys = sorted(scores)
    if not keys:
        return float("nan"), {}
    runs = sorted(scores[keys[0]])
    arr = np.array([[scores[k][r] for r in runs] for k in keys], dtype=np.float64)
    stds = per_image_std(arr)
    return float(stds.mean()), dict(zip(keys, stds.tolist()))


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    if border <= 0:
        return x
    if x.shape[-1] <= 2 * border or x.shape[-2] <= 2 * border:
        raise ValueError(f"image {tuple(x.shape[-2:])} is too small for a {border}-px border crop")
    return x[..., border:-border, border:-border]


def pixel_std_map(runs: torch.Tensor, crop_border: int = L_STD_CROP) -> torch.Tensor:
    """(N, 3, H, W) runs of one image in [0, 1] -> (3, H-2b, W-2b) population std over runs."""
    if runs.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) runs, got shape {tuple(runs.shape)}")
    x = _crop(runs.double(), crop_border)
    return x.std(dim=0, unbiased=False)


def l_std_image(runs: torch.Tensor, crop_border: int = L_STD_CROP) -> float:
    """L-STD contribution of one image: mean over (c, h, w) of the per-pixel std over runs."""
    return float(pixel_std_map(runs, crop_border).mean())


def l_std(images: Iterable[torch.Tensor], crop_border: int = L_STD_CROP) -> float:
    """L-STD over a set: mean over images of :func:`l_std_image` (each item (N, 3, H, W) in [0, 1])."""
    vals = [l_std_image(r, crop_border) for r in images]
    return float(np.mean(vals)) if vals else float("nan")

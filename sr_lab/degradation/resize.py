"""Resizing operators that reproduce OpenCV's ``cv2.resize`` and MATLAB's ``imresize`` in torch.

Used by the BSRGAN degradation (spec ``degradation_and_metrics.md`` §2: BSRGAN draws its
interpolation from cv2 ``[1, 2, 3]`` = INTER_LINEAR, INTER_CUBIC, INTER_AREA, and uses MATLAB-style
bicubic ``imresize_np`` in its 1/2 pre-downscale). Everything runs on the tensor's device.

* ``linear`` -> ``F.interpolate(mode='bilinear', align_corners=False)``, ``cubic`` ->
  ``F.interpolate(mode='bicubic', align_corners=False)`` (a = -0.75, half-pixel centres, clamped
  borders: the same maths as OpenCV's float path; agreement ~1e-6 is tested against cv2).
* ``area`` -> separable area-overlap weights ``W[i, j] = |[i s, (i+1) s] ∩ [j, j+1]| / s`` with
  ``s = n_in / n_out`` applied as two matrix products. This is OpenCV's INTER_AREA for down- and
  up-scaling alike (tested against cv2). ``F.interpolate(mode='area')`` (adaptive average pooling)
  differs for non-integer factors, so it is not used.
* :func:`imresize_matlab`: MATLAB ``imresize`` bicubic (Keys a = -0.5) with antialiasing for
  downscaling (kernel stretched by 1/scale) and symmetric border handling, as BasicSR/BSRGAN
  ``imresize_np``; output size ``ceil(n * scale)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CV2_INTERPOLATIONS", "area_weights", "resize_area", "resize_cv2", "matlab_cubic",
           "imresize_matlab_weights", "imresize_matlab"]

#: BSRGAN's ``random.choice([1, 2, 3])`` = cv2.INTER_LINEAR, INTER_CUBIC, INTER_AREA (spec §2).
CV2_INTERPOLATIONS = ("linear", "cubic", "area")


def area_weights(n_in: int, n_out: int, device=None, dtype=torch.float64) -> Tensor:
    """(n_out, n_in) row-stochastic area-overlap matrix of OpenCV INTER_AREA along one axis."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"area_weights: sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    s = n_in / n_out
    i = torch.arange(n_out, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(n_in, device=device, dtype=torch.float64)[None, :]
    overlap = (torch.minimum((i + 1) * s, j + 1) - torch.maximum(i * s, j)).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).to(dtype)


def _separable(img: Tensor, wh: Tensor, ww: Tensor) -> Tensor:
    """Apply (out_h, H) and (out_w, W) matrices to the last two dims of ``img`` (B, C, H, W)."""
    return torch.einsum("oh,bchw,pw->bcop", wh.to(img.dtype), img, ww.to(img.dtype))


def resize_area(img: Tensor, size: tuple[int, int]) -> Tensor:
    """OpenCV INTER_AREA resize of ``img`` (B, C, H, W) to ``size`` = (h, w)."""
    h, w = img.shape[-2:]
    return _separable(img, area_weights(h, size[0], img.device), area_weights(w, size[1], img.device))


def resize_cv2(img: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    """``cv2.resize(img, (w, h), interpolation)`` for ``interpolation`` in :data:`CV2_INTERPOLATIONS`.

    ``img`` (B, C, H, W) float; ``size`` = (h, w), each >= 1. No clipping (BSRGAN clips afterwards).
    """
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"resize_cv2: target size must be >= 1, got {size}")
    if interpolation == "linear":
        return F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    if interpolation == "cubic":
        return F.interpolate(img, size=size, mode="bicubic", align_corners=False)
    if interpolation == "area":
        return resize_area(img, size)
    raise ValueError(f"resize_cv2: interpolation must be one of {CV2_INTERPOLATIONS}, got {interpolation!r}")


def matlab_cubic(x: Tensor) -> Tensor:
    """Keys cubic kernel with a = -0.5 (MATLAB ``imresize`` 'bicubic')."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return inner + outer


def _symmetric_index(idx: Tensor, n: int) -> Tensor:
    """Map indices outside [0, n) by symmetric (edge-repeating) reflection, MATLAB 'symmetric'."""
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - 1 - idx)


def imresize_matlab_weights(n_in: int, scale: float, antialiasing: bool = True, device=None) -> Tensor:
    """(ceil(n_in*scale), n_in) weight matrix of MATLAB ``imresize`` bicubic along one axis."""
    n_out = math.ceil(n_in * scale)
    kernel_width = 4.0
    aa = antialiasing and scale < 1
    if aa:
        kernel_width /= scale
    x = torch.arange(1, n_out + 1, device=device, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate of each output centre
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    idx = left[:, None] + torch.arange(taps, device=device, dtype=torch.float64)[None, :]  # 1-based
    dist = u[:, None] - idx
    wts = scale * matlab_cubic(dist * scale) if aa else matlab_cubic(dist)
    wts = wts / wts.sum(dim=1, keepdim=True)
    cols = _symmetric_index(idx.long() - 1, n_in)
    mat = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    mat.scatter_add_(1, cols, wts)
    return mat


def imresize_matlab(img: Tensor, scale: float, antialiasing: bool = True) -> Tensor:
    """MATLAB-style bicubic ``imresize`` of ``img`` (B, C, H, W) by ``scale`` (BSRGAN ``imresize_np``)."""
    h, w = img.shape[-2:]
    wh = imresize_matlab_weights(h, scale, antialiasing, img.device)
    ww = imresize_matlab_weights(w, scale, antialiasing, img.device)
    return _separable(img, wh, ww)

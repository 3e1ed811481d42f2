"""Resizing operators that reproduce OpenCV's ``cv2.resize`` and MATLAB's ``imresize`` in torch.

Used by the BSRGAN degradation (spec ``degradation_and_metrics.md`` §2: BSRGAN draws its
interpolation from cv2 ``[1, 2, 3]`` = INTER_LINEAR, INTER_CUBIC, INTER_AREA, and uses MATLAB-style
bicubic ``imresize_np`` in its 1/2 pre-downscale). Everything runs on the tensor's device.

* ``linear`` -> ``F.interpolate(mode='bilinear', align_corners=False)``, ``cubic`` ->
  ``F.interpolate(mode='bicubic', align_corners=False)`` (a = -0.75, half-pixel centres, clamped
  borders: the same maths as OpenCV's float path; agreement ~1e-6 is tested against cv2).
* ``area`` -> OpenCV INTER_AREA, which has two regimes (``cv::hal::resize`` in OpenCV's
  ``modules/imgproc/src/resize.cpp``), both reproduced here as separable (out, in) matrices applied as
  two matrix products:

  - output no larger than the input on *both* axes (``scale_x >= 1 && scale_y >= 1``): true area
    averaging, :func:`area_weights`, ``W[i, j] = |[i s, (i+1) s] ∩ [j, j+1]| / s``, ``s = n_in / n_out``
    (OpenCV ``resizeArea_`` / ``resizeAreaFast_``). ``F.interpolate(mode='area')`` (adaptive average
    pooling) differs for non-integer factors, so it is not used.
  - any axis enlarged: OpenCV's bilinear "area emulation" on *both* axes (also on an axis that is
    shrunk), :func:`area_linear_weights`: two taps (1 − f, f) on source pixels (sx, sx + 1) with
    ``sx = floor(d · scale)``, ``f = float32((d + 1) − (sx + 1) · inv_scale)``, ``f = 0 if f <= 0 else
    f − floor(f)``, ``inv_scale = n_out / n_in`` and ``scale = 1 / inv_scale`` in float64, clamped at the
    last pixel. For pure enlargement this equals the area-overlap matrix except where an output pixel
    starts exactly on a source-pixel boundary and ``d · scale`` rounds just below that integer: OpenCV
    then takes the *previous* source pixel with weight 1 (e.g. 64 -> 98, output 49 reads source 31,
    not 32); the formula reproduces that. A shrunk axis in this regime gets two taps, not an area
    average.

  Output size equal to the input on both axes is a copy (as OpenCV). Agreement with
  ``cv2.resize(float32, interpolation=cv2.INTER_AREA)`` is tested (~1e-6, float32 rounding).
* :func:`imresize_matlab`: MATLAB ``imresize`` bicubic (Keys a = -0.5) with antialiasing for
  downscaling (kernel stretched by 1/scale) and symmetric border handling, as BasicSR/BSRGAN
  ``imresize_np``; output size ``ceil(n * scale)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CV2_INTERPOLATIONS", "area_weights", "area_linear_weights", "resize_area", "resize_cv2",
           "matlab_cubic", "imresize_matlab_weights", "imresize_matlab"]

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


def area_linear_weights(n_in: int, n_out: int, device=None, dtype=torch.float64) -> Tensor:
    """(n_out, n_in) matrix of OpenCV INTER_AREA's bilinear emulation along one axis, used by OpenCV
    whenever the output is larger than the input on at least one axis (then on both axes).

    Reproduces the coefficient rule of ``cv::hal::resize`` (``area_mode``) bit for bit: float64
    ``inv_scale = n_out / n_in``, ``scale = 1 / inv_scale``, ``sx = floor(d * scale)``,
    ``f = float32((d + 1) - (sx + 1) * inv_scale)``, ``f = 0 if f <= 0 else f - floor(f)``, and
    ``f = 0, sx = n_in - 1`` once ``sx >= n_in - 1``; weights ``1 - f`` (float32) on ``sx`` and ``f`` on
    ``sx + 1``.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"area_linear_weights: sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    inv_scale = n_out / n_in
    scale = 1.0 / inv_scale
    d = torch.arange(n_out, dtype=torch.float64)
    sx = torch.floor(d * scale)
    f = ((d + 1) - (sx + 1) * inv_scale).to(torch.float32)
    f = torch.where(f <= 0, torch.zeros_like(f), f - torch.floor(f))
    last = sx >= n_in - 1
    f = torch.where(last, torch.zeros_like(f), f)
    sx = torch.where(last, torch.full_like(sx, n_in - 1), sx).long()
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    mat.index_put_((rows, sx), (1 - f).double(), accumulate=True)
    mat.index_put_((rows, (sx + 1).clamp(max=n_in - 1)), f.double(), accumulate=True)
    return mat.to(device=device, dtype=dtype)


def _separable(img: Tensor, wh: Tensor, ww: Tensor) -> Tensor:
    """Apply (out_h, H) and (out_w, W) matrices to the last two dims of ``img`` (B, C, H, W)."""
    return torch.einsum("oh,bchw,pw->bcop", wh.to(img.dtype), img, ww.to(img.dtype))


def resize_area(img: Tensor, size: tuple[int, int]) -> Tensor:
    """OpenCV INTER_AREA resize of ``img`` (B, C, H, W) to ``size`` = (h, w): area averaging when
    neither axis grows, OpenCV's bilinear emulation (:func:`area_linear_weights`) on both axes
    otherwise, a copy when the size is unchanged (see the module docstring)."""
    h, w = img.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) == (h, w):
        return img.clone()
    weights = area_weights if oh <= h and ow <= w else area_linear_weights
    return _separable(img, weights(h, oh, img.device), weights(w, ow, img.device))


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

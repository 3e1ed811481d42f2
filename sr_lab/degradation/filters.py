"""2-D filtering with reflect padding and Real-ESRGAN's unsharp-mask (USM) sharpening.

BasicSR ``basicsr/utils/img_process_util.py`` (``filter2D``, ``USMSharp``); spec §1.5.

``filter2d`` is a grouped ``conv2d`` (cross-correlation) after reflect padding of ``k//2``. It equals
``kornia.filters.filter2d(x, kernel, border_type='reflect')`` (tested) but is written out here so
that it also handles padding wider than the image (small intermediate images of the
second-order pipeline), where ``F.pad(mode='reflect')`` and kornia raise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["reflect_pad", "filter2d", "separable_filter2d", "opencv_gaussian_kernel1d", "usm_sharp", "USMSharp"]


def _reflect_index(n: int, pad: int, device) -> Tensor:
    """Indices of a 1-D reflect ("mirror without edge repeat") extension by ``pad`` on both sides."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - idx)


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """Reflect-pad the last two dims of ``x`` (B, C, H, W) by ``pad`` on every side.

    Same as ``F.pad(x, (pad,)*4, mode='reflect')`` (BasicSR filter2D padding; spec §1.5) and,
    unlike it, also valid when ``pad >= H`` or ``pad >= W`` (the reflection is repeated
    periodically, like numpy ``np.pad(mode='reflect')``).
    """
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    if pad < h and pad < w:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = x.index_select(-2, _reflect_index(h, pad, x.device))
    return x.index_select(-1, _reflect_index(w, pad, x.device))


def filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter every channel of ``x`` (B, C, H, W) with a per-sample (B, k, k) or shared (1, k, k) kernel.

    BasicSR ``filter2D`` used by Real-ESRGAN (Wang et al. 2021); spec §1.5: reflect padding of
    ``k//2`` (odd k) then cross-correlation (grouped conv2d). Output has the input's size.
    """
    b, c, h, w = x.shape
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0)
    kb, kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0 or kh != kw:
        raise ValueError(f"kernel: must be square with odd size, got {tuple(kernel.shape)}")
    if kb not in (1, b):
        raise ValueError(f"kernel: batch dim must be 1 or {b}, got {kb}")
    kernel = kernel.to(dtype=x.dtype, device=x.device)
    xp = reflect_pad(x, kh // 2)
    if kb == 1:
        weight = kernel.expand(c, kh, kw).unsqueeze(1)
        return F.conv2d(xp, weight, groups=c)
    weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    out = F.conv2d(xp.reshape(1, b * c, *xp.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def separable_filter2d(x: Tensor, kernel_1d: Tensor) -> Tensor:
    """Filter ``x`` (B, C, H, W) with the separable 2-D kernel ``outer(kernel_1d, kernel_1d)``, reflect padding.

    Mathematically identical to :func:`filter2d` with the outer-product kernel (reflect padding is
    separable too) at O(k) instead of O(k^2) per pixel; used for the 51x51 USM Gaussian (spec §1.5).
    """
    k = kernel_1d.numel()
    if k % 2 == 0:
        raise ValueError(f"kernel_1d: size must be odd, got {k}")
    b, c, h, w = x.shape
    g = kernel_1d.to(dtype=x.dtype, device=x.device)
    # channels-as-groups (depthwise) layout: much faster than a batch of 1-channel convolutions
    xp = reflect_pad(x, k // 2).reshape(1, b * c, h + k - 1, w + k - 1)
    xp = F.conv2d(xp, g.view(1, 1, k, 1).expand(b * c, 1, k, 1), groups=b * c)
    xp = F.conv2d(xp, g.view(1, 1, 1, k).expand(b * c, 1, 1, k), groups=b * c)
    return xp.reshape(b, c, h, w)


def opencv_gaussian_kernel1d(ksize: int, sigma: float = 0.0, device=None) -> Tensor:
    """1-D Gaussian like ``cv2.getGaussianKernel(ksize, sigma)`` (float64 maths, returned as float32).

    For ``sigma <= 0`` OpenCV uses ``sigma = 0.3*((ksize-1)*0.5 - 1) + 0.8`` (8.0 for ksize 51);
    spec §1.5. (OpenCV's fixed small-kernel tables for ksize <= 7 with sigma <= 0 are not reproduced.)
    """
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(ksize, dtype=torch.float64, device=device) - (ksize - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def usm_sharp(img: Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10, kernel_1d: Tensor | None = None) -> Tensor:
    """Unsharp-mask sharpening with a soft threshold mask, as BasicSR ``USMSharp`` (Real-ESRGAN GT sharpening).

    Real-ESRGAN (Wang et al. 2021); spec §1.5. ``img`` (B, C, H, W) in [0, 1]. Kernel size
    ``radius`` (+1 if even: 50 -> 51), sigma by OpenCV's rule (8.0). Steps: ``blur = G * img``;
    ``residual = img - blur``; ``mask = |residual|*255 > threshold`` (per channel);
    ``soft = G * mask``; ``sharp = clip(img + weight*residual, 0, 1)``;
    ``out = soft*sharp + (1-soft)*img``. The Gaussian is applied separably (identical maths).
    """
    if kernel_1d is None:
        ksize = radius + 1 if radius % 2 == 0 else radius
        kernel_1d = opencv_gaussian_kernel1d(ksize, 0.0, device=img.device)
    blur = separable_filter2d(img, kernel_1d)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = separable_filter2d(mask, kernel_1d)
    sharp = torch.clamp(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


class USMSharp(nn.Module):
    """Module form of :func:`usm_sharp` holding the 1-D Gaussian as a (non-persistent) buffer.

    BasicSR ``USMSharp`` (Real-ESRGAN, Wang et al. 2021); spec §1.5.
    """

    def __init__(self, radius: int = 50, weight: float = 0.5, threshold: float = 10):
        super().__init__()
        ksize = radius + 1 if radius % 2 == 0 else radius
        self.ksize = ksize
        self.weight = float(weight)
        self.threshold = float(threshold)
        self.register_buffer("kernel_1d", opencv_gaussian_kernel1d(ksize), persistent=False)

    def forward(self, img: Tensor) -> Tensor:
        """Sharpen ``img`` (B, C, H, W) in [0, 1]; see :func:`usm_sharp`."""
        kernel = self.kernel_1d
        if kernel.device != img.device:  # module not moved: build on the image's device (no host copy)
            kernel = opencv_gaussian_kernel1d(self.ksize, device=img.device)
        return usm_sharp(img, weight=self.weight, threshold=self.threshold, kernel_1d=kernel)

"""PSNR and SSIM on the Y channel of YCbCr, BasicSR convention (degradation_and_metrics.md §4.2).

Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1] (ITU-R BT.601 studio swing, MATLAB's
``rgb2ycbcr``; pyiqa's ``color_space='ycbcr'``), kept on the 0-255 scale without rounding, float64.
``crop_border`` pixels are removed from every side first.
PSNR = 10 log10(255² / MSE). SSIM: 11x11 Gaussian window (σ = 1.5), C1 = (0.01·255)², C2 = (0.03·255)²,
'valid' filtering, mean of the SSIM map (Wang et al. 2004 as implemented by BasicSR's
``calculate_ssim``). Inputs are (B, 3, H, W) tensors in [0, 1]; outputs are per-image (B,) tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_Y = (65.481, 128.553, 24.966)


def rgb_to_y(img01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) Y in [16, 235] (0-255 scale), float64."""
    x = img01.double()
    w = torch.tensor(_Y, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) + 16.0


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border > 0 else x


def psnr_y(sr01: torch.Tensor, hr01: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """Per-image Y-PSNR in dB (inf where the images are identical)."""
    if sr01.shape != hr01.shape:
        raise ValueError(f"shape mismatch: {tuple(sr01.shape)} vs {tuple(hr01.shape)}")
    a, b = _crop(rgb_to_y(sr01), crop_border), _crop(rgb_to_y(hr01), crop_border)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian (outer product of OpenCV's ``getGaussianKernel(size, sigma)``)."""
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_y(sr01: torch.Tensor, hr01: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """Per-image SSIM on Y (BasicSR formulas)."""
    if sr01.shape != hr01.shape:
        raise ValueError(f"shape mismatch: {tuple(sr01.shape)} vs {tuple(hr01.shape)}")
    x, y = _crop(rgb_to_y(sr01), crop_border), _crop(rgb_to_y(hr01), crop_border)
    w = gaussian_window(device=x.device)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x ** 2
    syy = F.conv2d(y * y, w) - mu_y ** 2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def finite_mean(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean with +inf (identical images) capped, for logging."""
    v = torch.nan_to_num(values.double(), posinf=cap)
    return float(v.mean()) if v.numel() else math.nan

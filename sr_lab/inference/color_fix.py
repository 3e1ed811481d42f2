"""Colour correction of an SR output against its LR input (StableSR paper 001, Sec. 3.1).

* ``adain`` — Eq. 2: per colour channel c, y^c = (ŷ^c − μ_ŷ^c) / σ_ŷ^c · σ_x^c + μ_x^c, with mean and
  standard deviation over the spatial positions of each image.
* ``wavelet`` — Eq. 3–5: L^i = C_i(L^{i−1}, k), H^i = L^{i−1} − L^i, L^0 = I, with k the 3×3 kernel of
  Eq. 4 applied with dilation d_i; the output is y = H_ŷ + L_x^l where H_ŷ = Σ_i H_ŷ^i = ŷ − L_ŷ^l: the
  generated image keeps its high frequencies and takes the LR's low frequencies (its colour).
* ``none``.

The LR is first bicubic-resized to the output size (the authors pass the upsampled LR they sampled
from). Facts from the authors' code (IceClear/StableSR ``scripts/wavelet_color_fix.py``), used here:
the dilations are 1, 2, 4, …, 2^{l−1} (the paper's text says 2^i for 1 ≤ i ≤ l), l = 5 levels, the
border is replicate-padded by the dilation, and AdaIN's σ is the unbiased std with ε = 1e-5 added to
the variance. The functions return unclamped values; the pipeline clamps to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("none", "adain", "wavelet")

# StableSR Eq. 4
WAVELET_KERNEL = ((1 / 16, 1 / 8, 1 / 16),
                  (1 / 8, 1 / 4, 1 / 8),
                  (1 / 16, 1 / 8, 1 / 16))


def _match_size(lr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    lr = lr.to(like.dtype)
    if lr.shape[-2:] != like.shape[-2:]:
        lr = F.interpolate(lr, size=like.shape[-2:], mode="bicubic", align_corners=False)
    return lr


def channel_mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased variance + eps), shaped (B, C, 1, 1)."""
    flat = x.flatten(2)
    mean = flat.mean(-1)[..., None, None]
    std = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(sr: torch.Tensor, lr: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """StableSR Eq. 2: match each channel's mean/std of ``sr`` to those of ``lr`` (B, 3, H, W)."""
    lr = _match_size(lr, sr)
    mu_y, sd_y = channel_mean_std(sr, eps)
    mu_x, sd_x = channel_mean_std(lr, eps)
    return (sr - mu_y) / sd_y * sd_x + mu_x


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """C_i of StableSR Eq. 3: depthwise 3×3 convolution with the kernel of Eq. 4, dilated, replicate
    padding (output size = input size)."""
    c = x.shape[1]
    k = torch.tensor(WAVELET_KERNEL, dtype=x.dtype, device=x.device)[None, None].repeat(c, 1, 1, 1)
    x = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(x, k, groups=c, dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """StableSR Eq. 3 over ``levels`` scales: (Σ_i H^i, L^l)."""
    if levels < 1:
        raise ValueError(f"levels={levels} must be >= 1")
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = wavelet_blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(sr: torch.Tensor, lr: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """StableSR Eq. 5: y = H_ŷ^l + L_x^l (high frequencies of ``sr``, low frequencies of ``lr``)."""
    lr = _match_size(lr, sr)
    high_sr, _ = wavelet_decompose(sr, levels)
    _, low_lr = wavelet_decompose(lr, levels)
    return high_sr + low_lr


def color_fix(sr: torch.Tensor, lr: torch.Tensor, method: str = "none", levels: int = 5) -> torch.Tensor:
    """Dispatch on ``method`` (none | adain | wavelet); computed in float32, returned in sr's dtype."""
    if method == "none":
        return sr
    if method not in METHODS:
        raise ValueError(f"color_fix={method!r} must be one of {METHODS}")
    x, y = sr.float(), lr.float()
    out = adain_color_fix(x, y) if method == "adain" else wavelet_color_fix(x, y, levels)
    return out.to(sr.dtype)

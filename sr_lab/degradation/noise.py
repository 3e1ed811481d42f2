"""Additive Gaussian and Poisson noise with per-sample parameters, batched on device.

Real-ESRGAN (Wang et al. 2021) noise model, BasicSR ``basicsr/data/degradations.py``
(``generate_gaussian_noise_pt``, ``generate_poisson_noise_pt``, ``random_add_*_pt``); spec §1.3 step 3.
Parameters (sigma, scale, gray flag) are passed in as (B,) tensors; the random maps come from an
explicit ``torch.Generator``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "gaussian_noise",
    "add_gaussian_noise",
    "count_unique_8bit",
    "poisson_vals",
    "rgb_to_gray",
    "poisson_noise",
    "add_poisson_noise",
]


def _per_sample(v: Tensor | float, b: int, ref: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=ref.dtype, device=ref.device).reshape(-1).expand(b).reshape(b, 1, 1, 1)


def gaussian_noise(
    img: Tensor,
    sigma: Tensor,
    gray: Tensor,
    generator: torch.Generator,
    *,
    gray_shared_across_batch: bool = True,
) -> Tensor:
    """Gaussian noise map for ``img`` (B, C, H, W): ``N(0, 1) * sigma / 255`` per sample.

    Real-ESRGAN (Wang et al. 2021), BasicSR ``generate_gaussian_noise_pt``; spec §1.3 step 3.
    ``sigma`` (B,) in 0-255 units; ``gray`` (B,) 0/1 (or bool): gray samples get one noise map
    replicated on all channels. ``gray_shared_across_batch=True`` reproduces the reference quirk
    that the gray map is drawn once with shape (H, W) and shared by every image of the batch
    (scaled by each sample's sigma); False draws one gray map per sample.
    """
    b, c, h, w = img.shape
    s = _per_sample(sigma, b, img) / 255.0
    g = _per_sample(gray, b, img)
    color = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)
    gray_shape = (1, 1, h, w) if gray_shared_across_batch else (b, 1, h, w)
    gray_map = torch.randn(gray_shape, generator=generator, device=img.device, dtype=img.dtype)
    return (color * (1 - g) + gray_map * g) * s


def add_gaussian_noise(
    img: Tensor,
    sigma: Tensor,
    gray: Tensor,
    generator: torch.Generator,
    *,
    gray_shared_across_batch: bool = True,
    clip: bool = True,
) -> Tensor:
    """``img + gaussian_noise(...)``, clipped to [0, 1] (BasicSR ``random_add_gaussian_noise_pt``, clip=True, rounds=False; spec §1.3)."""
    out = img + gaussian_noise(img, sigma, gray, generator, gray_shared_across_batch=gray_shared_across_batch)
    return torch.clamp(out, 0, 1) if clip else out


def count_unique_8bit(q: Tensor) -> Tensor:
    """Number of distinct values per sample of an integer tensor (B, ...) with values in [0, 255].

    Vectorised replacement of the reference's per-sample ``len(torch.unique(img[i]))`` loop
    (spec §3, Poisson row): a 256-bin histogram per sample, built as one bincount with per-sample
    offsets ``256 * i`` (via ``scatter_add_``, which, unlike ``torch.bincount``, needs no device->host
    sync to size its output), then the number of non-empty bins.
    """
    b = q.shape[0]
    idx = q.reshape(b, -1).long() + 256 * torch.arange(b, device=q.device).view(b, 1)
    idx = idx.reshape(-1)
    hist = torch.zeros(b * 256, dtype=torch.int32, device=q.device)
    hist.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    return (hist.view(b, 256) > 0).sum(dim=1)


def poisson_vals(n_unique: Tensor) -> Tensor:
    """``2 ** ceil(log2(n))`` per sample, computed exactly in integers (BasicSR Poisson ``vals``; spec §1.3)."""
    powers = 2 ** torch.arange(9, device=n_unique.device)  # n <= 256 -> exponent <= 8
    exponent = (n_unique.view(-1, 1) > powers).sum(dim=1)
    return 2.0 ** exponent.float()


def rgb_to_gray(img: Tensor) -> Tensor:
    """Luminance ``0.2989 R + 0.587 G + 0.114 B`` (torchvision ``rgb_to_grayscale``, used by BasicSR's gray Poisson noise; spec §1.3), (B, 1, H, W)."""
    r, g, b = img.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _quantise_8bit(img: Tensor) -> Tensor:
    return torch.clamp(torch.round(img * 255.0), 0, 255)


def _poisson_residual(img: Tensor, generator: torch.Generator) -> Tensor:
    """``Poisson(q * vals) / vals - q`` with ``q`` the 8-bit quantised image and per-sample vals."""
    q255 = _quantise_8bit(img)
    vals = poisson_vals(count_unique_8bit(q255.to(torch.uint8))).to(img.dtype).view(-1, 1, 1, 1)
    q = q255 / 255.0
    return torch.poisson(q * vals, generator=generator) / vals - q


def poisson_noise(img: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Poisson noise map for ``img`` (B, 3, H, W) in [0, 1], scaled per sample.

    Real-ESRGAN (Wang et al. 2021), BasicSR ``generate_poisson_noise_pt``; spec §1.3 step 3:
    image quantised to 8 bit; ``vals = 2^ceil(log2(#unique values))`` per sample (over all
    channels); noise = ``Poisson(q*vals)/vals - q``. Gray samples (``gray`` (B,) 0/1) use the same
    recipe on the luminance image (quantised separately) and add that map to all channels. The
    noise is multiplied by ``scale`` (B,). Both colour and gray maps are always drawn (no sync).
    """
    b = img.shape[0]
    noise = _poisson_residual(img, generator)
    noise_gray = _poisson_residual(rgb_to_gray(img), generator)
    g = _per_sample(gray, b, img)
    return (noise * (1 - g) + noise_gray * g) * _per_sample(scale, b, img)


def add_poisson_noise(img: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator, *, clip: bool = True) -> Tensor:
    """``img + poisson_noise(...)``, clipped to [0, 1] (BasicSR ``random_add_poisson_noise_pt``, clip=True, rounds=False; spec §1.3)."""
    out = img + poisson_noise(img, scale, gray, generator)
    return torch.clamp(out, 0, 1) if clip else out

"""Forward-process algebra of DDPM over a given ``alphas_cumprod`` (ᾱ) table.

CCSR paper (000) Eq. 1: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, and its inversions used by every
eps-prediction sampler and loss in sr_lab. All functions are pure; ``t`` is a LongTensor (B,) of
training-timestep indices into ``alphas_cumprod``.
"""
from __future__ import annotations

import torch


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
    out = values.to(like.device)[t.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of the CCSR paper: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
    a = gather(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) (CCSR Sec. 3.2, the x̂_{0←T} formula)."""
    a = gather(alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                x0: torch.Tensor) -> torch.Tensor:
    """ε = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)."""
    a = gather(alphas_cumprod, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (on the generator's device).

    ``generator`` may also be a sequence of k generators, k dividing the batch: generator i draws the
    rows [i B/k, (i+1) B/k) (inference runs several seeds in one batch this way; each seed's noise
    stream is then the same batched or alone)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if not gens or x.shape[0] % len(gens):
            raise ValueError(f"{len(gens)} generators cannot split a batch of {x.shape[0]}")
        n = x.shape[0] // len(gens)
        return torch.cat([randn_like(x[i * n:(i + 1) * n], g) for i, g in enumerate(gens)])
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)

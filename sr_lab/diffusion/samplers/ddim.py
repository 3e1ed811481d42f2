"""DDIM sampling (Song et al., "Denoising Diffusion Implicit Models", Eq. 12) on a respaced timestep
subset; offered by StableSR as the fast alternative to 200-step DDPM (StableSR paper 001, Sec. 5.2:
"DDIM enables StableSR to generate results with faithful details in 20 steps").

For consecutive kept timesteps s < t and the model's ε̂ at x_t:

    x̂0  = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)
    σ   = η sqrt((1 - ᾱ_s) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_s)
    x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ²) ε̂ + σ z,   z ~ N(0, I)

η = 0 is the deterministic DDIM, η = 1 has the DDPM posterior variance. Timesteps are the same
IDDPM respacing as the DDPM sampler (:func:`space_timesteps`: first 0, last T-1); after the step at the
lowest kept timestep the sampler returns that step's x̂0 (ᾱ_s = 1), as the DDPM sampler does.
(LDM's DDIM instead uses ``range(0, T, T // steps) + 1`` and stops at ᾱ_1; the difference is one
respacing convention, not the update.)
"""
from __future__ import annotations

from typing import Callable

import torch

from sr_lab.diffusion.samplers.ddpm_spaced import Model
from sr_lab.diffusion.schedule import randn_like, x0_from_eps
from sr_lab.diffusion.timesteps import space_timesteps


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float,
              eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM update x_t -> x_s (DDIM Eq. 12); ``noise`` is used only when σ > 0."""
    sigma = eta * ((1.0 - abar_s) / (1.0 - abar_t)) ** 0.5 * (1.0 - abar_t / abar_s) ** 0.5
    direction = max(1.0 - abar_s - sigma ** 2, 0.0) ** 0.5
    out = abar_s ** 0.5 * x0 + direction * eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator=None, steps: int = 50, eta: float = 0.0,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM with ``steps`` kept timesteps from ``noise`` at T-1 down to 0; returns x̂0 (latent)."""
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    abar = alphas_cumprod.double().cpu()
    ts = space_timesteps(alphas_cumprod.shape[0], steps)[::-1]
    x, x0 = noise, noise
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, tt, cond)
        x0 = x0_from_eps(alphas_cumprod, x, tt, eps)
        if callback is not None:
            callback(t, x0)
        if i + 1 == len(ts):
            break
        abar_t, abar_s = float(abar[t]), float(abar[ts[i + 1]])
        z = randn_like(x, generator) if eta > 0 else None
        x = ddim_step(x, eps, x0, abar_t, abar_s, eta, z)
    return x0

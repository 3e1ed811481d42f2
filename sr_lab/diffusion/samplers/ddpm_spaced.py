"""Ancestral DDPM sampling on a respaced timestep subset (IDDPM respacing; StableSR samples with
DDPM respaced to 200 steps, CCSR's spaced sampler is the same machinery).

For consecutive kept timesteps s < t the step uses β' = 1 - ᾱ_t / ᾱ_s and the posterior
q(x_s | x_t, x̂0) of the CCSR paper's Preliminaries (mean coefficients sqrt(ᾱ_s) β'/(1-ᾱ_t) and
sqrt(1-β')(1-ᾱ_s)/(1-ᾱ_t), "fixed_small" variance (1-ᾱ_s)/(1-ᾱ_t) β').
"""
from __future__ import annotations

from typing import Callable

import torch

from sr_lab.diffusion.schedule import randn_like, x0_from_eps
from sr_lab.diffusion.timesteps import space_timesteps

Model = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def posterior_step(x_t: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float,
                   noise: torch.Tensor | None) -> torch.Tensor:
    """One draw from q(x_s | x_t, x0) between kept timesteps s < t (noise None -> the mean)."""
    beta = 1.0 - abar_t / abar_s
    c0 = abar_s ** 0.5 * beta / (1.0 - abar_t)
    ct = (1.0 - beta) ** 0.5 * (1.0 - abar_s) / (1.0 - abar_t)
    mean = c0 * x0 + ct * x_t
    if noise is None:
        return mean
    var = (1.0 - abar_s) / (1.0 - abar_t) * beta
    return mean + var ** 0.5 * noise


def run_chain(model: Model, x: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor,
              timesteps: list[int], generator: torch.Generator | None,
              callback: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ancestral steps at ``timesteps`` (descending). Each step predicts x̂0 and moves to the next
    kept timestep (or to ᾱ = 1, i.e. x̂0, after the last one). Returns (x after the last step,
    x̂0 predicted at the last step)."""
    abar = alphas_cumprod.double().cpu()
    x0 = x
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, tt, cond)
        x0 = x0_from_eps(alphas_cumprod, x, tt, eps)
        abar_s = float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        if abar_s >= 1.0:
            x = x0
        else:
            x = posterior_step(x, x0, float(abar[t]), abar_s, randn_like(x, generator))
        if callback is not None:
            callback(t, x0)
    return x, x0


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator: torch.Generator | None = None, steps: int = 200,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDPM respaced to ``steps`` kept timesteps, from ``noise`` at T-1 down to 0; returns x̂0."""
    ts = space_timesteps(alphas_cumprod.shape[0], steps)[::-1]
    _, x0 = run_chain(model, noise, cond, alphas_cumprod, ts, generator, callback)
    return x0

"""DDIM sampling (Song et al., "Denoising Diffusion Implicit Models", Eq. 12) on a respaced timestep
subset; offered by StableSR as the fast alternative to 200-step DDPM (StableSR paper 001, Sec. 5.2:
"DDIM enables StableSR to generate results with faithful details in 20 steps").

Timesteps are the same IDDPM respacing as the DDPM sampler (:func:`space_timesteps`: first 0, last
T−1, evaluated descending); the step rule is :func:`sr_lab.diffusion.samplers.steps.ddim` (η = 0
deterministic, η = 1 the DDPM posterior variance). After the lowest listed timestep the sampler returns
that step's x̂0 (ᾱ = 1), as the DDPM sampler does. (LDM's DDIM instead uses
``range(0, T, T // steps) + 1`` and stops at ᾱ_1; the difference is one respacing convention, not the
update.)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from sr_lab.diffusion.samplers.ddpm_spaced import timesteps as spaced_timesteps
from sr_lab.diffusion.samplers.loop import Model, run_steps
from sr_lab.diffusion.samplers.registry import declares_timesteps
from sr_lab.diffusion.samplers.steps import ddim_rule, ddim_step  # noqa: F401 (re-export)


def timesteps(num_timesteps: int, steps: int = 50, timesteps: Sequence[int] | None = None) -> list[int]:
    """The timesteps the sampler evaluates, descending (an explicit list wins): the DDPM sampler's."""
    return spaced_timesteps(num_timesteps, steps, timesteps)


_timesteps = timesteps


@declares_timesteps(timesteps)
@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator=None, steps: int = 50, eta: float = 0.0, timesteps: Sequence[int] | None = None,
           hook=None, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM over ``timesteps(T, steps)`` from ``noise``; returns x̂0 (latent)."""
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    ts = _timesteps(alphas_cumprod.shape[0], steps, timesteps)
    return run_steps(model, noise, cond, alphas_cumprod, ts, ddim_rule(eta), generator=generator, hook=hook,
                     callback=callback)

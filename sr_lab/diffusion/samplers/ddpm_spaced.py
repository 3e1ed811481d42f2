"""Ancestral DDPM on a respaced timestep subset (IDDPM respacing). StableSR samples with DDPM respaced
to 200 steps (StableSR paper 001, Sec. 4.1); CCSR's spaced sampler is the same machinery.

``timesteps(T, steps)`` = :func:`space_timesteps` descending (T−1 first); the step rule is
:func:`sr_lab.diffusion.samplers.steps.ddpm_posterior`. ``steps = 1`` evaluates the model once at T−1
and returns x̂0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from sr_lab.diffusion.samplers.loop import Model, check_timesteps, run_steps
from sr_lab.diffusion.samplers.steps import ddpm_posterior, posterior_step  # noqa: F401 (re-export)
from sr_lab.diffusion.samplers.registry import declares_timesteps
from sr_lab.diffusion.timesteps import space_timesteps


def timesteps(num_timesteps: int, steps: int = 200, timesteps: Sequence[int] | None = None) -> list[int]:
    """The timesteps the sampler evaluates, descending (an explicit list wins)."""
    if timesteps is not None:
        return check_timesteps(timesteps, num_timesteps)
    return space_timesteps(num_timesteps, steps)[::-1]


_timesteps = timesteps


@declares_timesteps(timesteps)
@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator: torch.Generator | None = None, steps: int = 200, timesteps: Sequence[int] | None = None,
           hook=None, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDPM over ``timesteps(T, steps)`` from ``noise`` at the first listed timestep; returns x̂0."""
    ts = _timesteps(alphas_cumprod.shape[0], steps, timesteps)
    return run_steps(model, noise, cond, alphas_cumprod, ts, ddpm_posterior, generator=generator, hook=hook,
                     callback=callback)

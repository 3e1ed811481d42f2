"""Few-step re-noise sampling: at each listed timestep predict x̂0, then q-sample it to the next listed
timestep with fresh noise (:func:`sr_lab.diffusion.samplers.steps.renoise`).

AddSR's student sampler (AddSR paper 002, Sec. 3.2 and Sec. 4.1): 4 steps at {999, 749, 499, 249};
the first k of them for 1–3 steps (one step: the model once at T−1, return x̂0). The same rule is
LCM-style few-step sampling. ``timesteps(T, steps)`` = T−1 − round(i·T/steps), i < steps (T = 1000,
4 steps: 999, 749, 499, 249); ``first`` keeps only the first k of them (AddSR's 1–3-step inference
on its 4-step schedule); an explicit ``timesteps`` list wins.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from sr_lab.diffusion.samplers.loop import Model, check_timesteps, run_steps
from sr_lab.diffusion.samplers.registry import declares_timesteps
from sr_lab.diffusion.samplers.steps import renoise


def timesteps(num_timesteps: int, steps: int = 4, first: int | None = None,
              timesteps: Sequence[int] | None = None) -> list[int]:
    if timesteps is not None:
        ts = check_timesteps(timesteps, num_timesteps)
    else:
        if not 1 <= int(steps) <= num_timesteps:
            raise ValueError(f"sampler.steps={steps} must be in [1, {num_timesteps}]")
        ts = [num_timesteps - 1 - round(i * num_timesteps / int(steps)) for i in range(int(steps))]
    if first is not None:
        if not 1 <= int(first) <= len(ts):
            raise ValueError(f"sampler.first={first} must be in [1, {len(ts)}]")
        ts = ts[:int(first)]
    return ts


_timesteps = timesteps


@declares_timesteps(timesteps)
@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator=None, steps: int = 4, first: int | None = None, timesteps: Sequence[int] | None = None,
           hook=None, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Re-noise sampler over ``timesteps(T, steps, first)``; returns x̂0 of the last listed step."""
    ts = _timesteps(alphas_cumprod.shape[0], steps, first, timesteps)
    return run_steps(model, noise, cond, alphas_cumprod, ts, renoise, generator=generator, hook=hook,
                     callback=callback)

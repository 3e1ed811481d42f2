"""CCSR non-uniform truncated sampling (CCSR paper 000, Sec. 3.2 and Fig. 3; methods.md), as a
timestep list + the shared step rules:

1. from x_T ~ N(0, I) (or a noised latent) evaluate the model at T−1 and take x̂_{0←T}
   (rule :func:`~sr_lab.diffusion.samplers.steps.renoise`: re-noise x̂_{0←T} to t_max with fresh noise);
2. run the spaced ancestral DDPM steps (rule :func:`~sr_lab.diffusion.samplers.steps.ddpm_posterior`)
   from t_max down to t_min;
3. return x̂_{0←t_min}, the x̂0 predicted at the last listed timestep (the chain is truncated).

Knobs: ``grid`` (45) is the size of the IDDPM-respaced grid over [0, T) the steps are taken from — not
the number of executed steps (the old key ``steps`` is accepted as a deprecated alias). With n = grid
kept timesteps, the re-noise target is kept[round((n−1)·t_max)] and the authors' loop evaluates the
kept indices round(n·t_max)−1 down to round(n·t_min) (T = 1000, n = 45, t_max = 2/3, t_min = 1/3:
T−1 = 999, then 15 steps 658 … 341; 16 model calls).

``chain`` — where the two index rules disagree (round((n−1)·t_max) ≠ round(n·t_max) − 1, e.g. grids
n ≡ 2 (mod 3) at t_max = 2/3 such as n = 50, and t_max = 1/2 with n = 45):

* ``"continuous"`` (default): the DDPM chain starts *at* the re-noise target, so every step's x_t is
  at the timestep the model is told. n = 50: re-noise to 673, evaluate [673, 652, …, 347] (17 steps
  after T−1). Table 5's variants A1–A4 and CCSR then run 8, 8, 21, 21, 15 steps at n = 45.
* ``"authors"``: bit-level reproduction of csslc/CCSR v1 (``sample_ccsr`` slicing of the spaced
  timesteps): the latent is re-noised to the target but the loop starts at the next kept index, so
  n = 50 re-noises to 673 and evaluates [652, …, 347] (16 steps after T−1) with an x_t noised to 673.

An explicit ``timesteps`` list ``[T−1, t_max, …, t_min]`` replaces the derived one (first transition
re-noise, then DDPM).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from sr_lab.diffusion.samplers.loop import Model, check_timesteps, run_steps
from sr_lab.diffusion.samplers.registry import declares_timesteps
from sr_lab.diffusion.samplers.steps import ddpm_posterior, renoise
from sr_lab.diffusion.timesteps import space_timesteps

log = logging.getLogger(__name__)
CHAINS = ("continuous", "authors")
_WARNED_STEPS: set[int] = set()


def _grid(grid: int, steps: int | None) -> int:
    if steps is not None:
        if grid not in (None, 45) and int(grid) != int(steps):
            raise ValueError(f"sampler.steps={steps} (deprecated alias of sampler.grid) contradicts sampler.grid={grid}")
        if int(steps) not in _WARNED_STEPS:  # once per value and process, not at every sampling call
            _WARNED_STEPS.add(int(steps))
            log.warning("ccsr_truncated: sampler.steps is the grid size, not executed steps; it is renamed "
                        "sampler.grid (sampler.steps=%s read as sampler.grid=%s)", steps, steps)
        return int(steps)
    return int(grid)


def plan(num_timesteps: int, grid: int = 45, t_max: float = 0.6667, t_min: float = 0.3333,
         chain: str = "continuous") -> tuple[list[int], int]:
    """(timesteps evaluated, descending and starting with T−1; the re-noise target t_max)."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if chain not in CHAINS:
        raise ValueError(f"sampler.chain={chain!r} must be one of {list(CHAINS)}")
    kept = space_timesteps(num_timesteps, grid)
    n = len(kept)
    top = int(round((n - 1) * t_max))      # index of x_{t_max} in the kept list
    n_use = int(round(n * t_max))          # the authors slice the last round(n*t_max) kept steps
    n_cut = int(round(n * t_min))          # ... and drop the lowest round(n*t_min) of them
    idx = list(range(n_use - 1, n_cut - 1, -1))
    if chain == "continuous" and idx and idx[0] != top:
        idx = list(range(top, n_cut - 1, -1))
    if not idx:
        raise ValueError(f"sampler.t_max/t_min={t_max}/{t_min} leave no sampling step out of sampler.grid={grid}")
    return [kept[-1]] + [kept[i] for i in idx], kept[top]


def truncated_timesteps(num_timesteps: int, grid: int, t_max: float, t_min: float,
                        chain: str = "continuous") -> tuple[int, int, list[int]]:
    """(anchor T−1, re-noise timestep t_max, DDPM timesteps descending) — the list without the anchor."""
    ts, target = plan(num_timesteps, grid, t_max, t_min, chain)
    return ts[0], target, ts[1:]


def timesteps(num_timesteps: int, grid: int = 45, t_max: float = 0.6667, t_min: float = 0.3333,
              chain: str = "continuous", steps: int | None = None,
              timesteps: Sequence[int] | None = None) -> list[int]:
    """Every timestep the model is evaluated at (T−1 first); its length is the number of model calls."""
    if timesteps is not None:
        ts = check_timesteps(timesteps, num_timesteps)
        if len(ts) < 2:
            raise ValueError(f"sampler.timesteps={ts}: the truncated sampler needs T-1 and at least one step")
        return ts
    return plan(num_timesteps, _grid(grid, steps), t_max, t_min, chain)[0]


def executed_steps(num_timesteps: int, **knobs) -> int:
    """CCSR Table 5 "S": the DDPM steps after the one-step prediction at T (model calls − 1)."""
    return len(timesteps(num_timesteps, **knobs)) - 1


@declares_timesteps(timesteps, executed_steps=executed_steps)
@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator: torch.Generator | None = None, grid: int = 45, t_max: float = 0.6667,
           t_min: float = 0.3333, chain: str = "continuous", steps: int | None = None,
           timesteps: Sequence[int] | None = None, hook=None, callback=None) -> torch.Tensor:
    """CCSR truncated sampler; returns x̂_{0←t_min} (latent)."""
    T = alphas_cumprod.shape[0]
    if timesteps is not None:
        ts = _timesteps(T, timesteps=timesteps)
        target = ts[1]
    else:
        ts, target = plan(T, _grid(grid, steps), t_max, t_min, chain)
    rules = [renoise] + [ddpm_posterior] * (len(ts) - 1)
    targets = [target, *ts[2:], None]
    return run_steps(model, noise, cond, alphas_cumprod, ts, rules, generator=generator, targets=targets,
                     hook=hook, callback=callback)


_timesteps = timesteps

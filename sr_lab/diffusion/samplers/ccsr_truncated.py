"""CCSR non-uniform truncated sampling (CCSR paper 000, Sec. 3.2 and Fig. 3; methods.md).

1. From x_T ~ N(0, I) at the last training timestep, predict x̂_{0←T} in one step.
2. Re-noise it to t_max with fresh noise (Eq. 1).
3. Run the respaced ancestral DDPM steps from t_max down to t_min.
4. Return x̂_{0←t_min}, the x0 predicted at the last executed step (the diffusion chain is truncated).

Timesteps follow the authors' spaced sampler: ``steps`` (45) kept timesteps over [0, T); with
n = steps, the re-noise index is round((n - 1) * t_max) and the executed indices run from there
down to round(n * t_min) (for T = 1000, n = 45, t_max = 2/3, t_min = 1/3: T-1 = 999, then 15 steps
from index 29 (t = 658) to index 15 (t = 341)).
"""
from __future__ import annotations

import torch

from sr_lab.diffusion.samplers.ddpm_spaced import Model, run_chain
from sr_lab.diffusion.schedule import q_sample, randn_like, x0_from_eps
from sr_lab.diffusion.timesteps import space_timesteps


def truncated_timesteps(num_timesteps: int, steps: int, t_max: float, t_min: float) -> tuple[int, int, list[int]]:
    """(anchor T-1, re-noise timestep t_max, executed timesteps descending) for the CCSR sampler."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    kept = space_timesteps(num_timesteps, steps)
    n = len(kept)
    top = int(round((n - 1) * t_max))      # index of x_{t_max} in the kept list
    n_use = int(round(n * t_max))          # the authors slice the last round(n*t_max) kept steps
    n_cut = int(round(n * t_min))          # ... and drop the lowest round(n*t_min) of them
    idx = list(range(n_use - 1, n_cut - 1, -1))
    if not idx:
        raise ValueError(f"t_max={t_max}, t_min={t_min} leave no sampling step out of {steps}")
    if idx[0] != top:  # only differs for degenerate rounding; keep the chain continuous
        idx = list(range(top, n_cut - 1, -1))
    return kept[-1], kept[idx[0]], [kept[i] for i in idx]


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor, *,
           generator: torch.Generator | None = None, steps: int = 45, t_max: float = 0.6667,
           t_min: float = 0.3333, callback=None) -> torch.Tensor:
    """CCSR truncated sampler; returns x̂_{0←t_min} (latent)."""
    t_T, t_start, ts = truncated_timesteps(alphas_cumprod.shape[0], steps, t_max, t_min)
    b = noise.shape[0]
    tT = torch.full((b,), t_T, device=noise.device, dtype=torch.long)
    x0 = x0_from_eps(alphas_cumprod, noise, tT, model(noise, tT, cond))
    if callback is not None:
        callback(t_T, x0)
    ts_start = torch.full((b,), t_start, device=noise.device, dtype=torch.long)
    x = q_sample(alphas_cumprod, x0, ts_start, randn_like(noise, generator))
    _, x0 = run_chain(model, x, cond, alphas_cumprod, ts, generator, callback)
    return x0

"""Diffusion training losses (config group ``loss``).

A loss is a small callable object whose :meth:`parts` are the terms that one optimizer each steps
on in "alternate" mode (or that are summed under one optimizer in "combined" mode). Each part is
``part(model, x0, cond, alphas_cumprod, generator) -> {name: scalar}``; ``model(x, t, cond) -> ε̂``.
Squared errors are averaged over all elements (the authors' per-sample mean over (C, H, W), then
batch mean).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sr_lab.diffusion.schedule import q_sample, randn_like, x0_from_eps
from sr_lab.diffusion.timesteps import CCSRNonUniformTimesteps, UniformTimesteps

Part = Callable[..., dict[str, torch.Tensor]]


def eps_loss(model, x0, cond, alphas_cumprod, t, noise) -> torch.Tensor:
    """l_diff = ||ε - ε_θ(sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, t)||² (CCSR paper Eq. 2)."""
    x_t = q_sample(alphas_cumprod, x0, t, noise)
    return F.mse_loss(model(x_t, t, cond).float(), noise.float())


class EpsMSE:
    """Plain eps-prediction loss at t drawn from the timestep schedule (StableSR stage 1; one part).

    ``required_schedule``: the schedule class a loss needs (``schedule._target_`` must name it or a
    subclass; None: any), checked before any model is built, with ``required_schedule_message``.
    """

    required_schedule: type | None = None
    required_schedule_message: str | None = None

    def __init__(self, schedule: UniformTimesteps):
        self.schedule = schedule

    def eps_part(self, model, x0, cond, alphas_cumprod, generator) -> dict[str, torch.Tensor]:
        t = self.schedule.sample(x0.shape[0], generator, x0.device)
        return {"eps": eps_loss(model, x0, cond, alphas_cumprod, t, randn_like(x0, generator))}

    def parts(self) -> list[Part]:
        return [self.eps_part]


class CCSRNUTL(EpsMSE):
    """CCSR non-uniform timestep learning (paper 000, Sec. 3.2, Eq. 3).

    Part 1: the ordinary eps loss for t ~ U[0, t_max).
    Part 2 (t = T): x_T = q(x0, T-1, ε1); x̂_{0←T} from ε_θ(x_T, T-1); l_T = ||x0 - x̂_{0←T}||².
    Re-noise with fresh ε2: x̂_tmax = sqrt(ᾱ_tmax) x̂_{0←T} + sqrt(1-ᾱ_tmax) ε2 (gradient flows through
    x̂_{0←T}, as in the authors' code); ε̂ = ε_θ(x̂_tmax, t_max); l_tmax = ||x0 - x̂_{0←tmax}||²;
    plus the eps loss at t_max, ||ε2 - ε̂||². Eq. 3: l^T_diff = l_diff + l_T + l_tmax.
    The authors step the two parts with two AdamW optimizers in turn (PL1 ``optimizer_idx``).
    """

    required_schedule = CCSRNonUniformTimesteps
    required_schedule_message = "loss=ccsr_nutl needs schedule=ccsr_nonuniform (it trains at t_max)"

    def __init__(self, schedule: CCSRNonUniformTimesteps):
        if not isinstance(schedule, CCSRNonUniformTimesteps):
            raise ValueError("loss=ccsr_nutl needs schedule=ccsr_nonuniform (it uses t_max)")
        super().__init__(schedule)

    def anchor_part(self, model, x0, cond, alphas_cumprod, generator) -> dict[str, torch.Tensor]:
        b = x0.shape[0]
        t_T = torch.full((b,), self.schedule.anchor_T, device=x0.device, dtype=torch.long)
        t_mx = torch.full((b,), self.schedule.t_max_step, device=x0.device, dtype=torch.long)
        x_T = q_sample(alphas_cumprod, x0, t_T, randn_like(x0, generator))
        x0_T = x0_from_eps(alphas_cumprod, x_T, t_T, model(x_T, t_T, cond).float())
        noise2 = randn_like(x0, generator)
        x_mx = q_sample(alphas_cumprod, x0_T, t_mx, noise2)
        eps_mx = model(x_mx, t_mx, cond).float()
        x0_mx = x0_from_eps(alphas_cumprod, x_mx, t_mx, eps_mx)
        return {"x0_T": F.mse_loss(x0_T, x0.float()), "x0_tmax": F.mse_loss(x0_mx, x0.float()),
                "eps_tmax": F.mse_loss(eps_mx, noise2.float())}

    def parts(self) -> list[Part]:
        return [self.eps_part, self.anchor_part]

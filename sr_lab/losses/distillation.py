"""AddSR's timestep-adaptive adversarial diffusion distillation (TA-ADD; AddSR paper 002, Sec. 3.3, Eq. 1,
3, 4, App. C) as small callables.

* :func:`student_step_index` — P(s): maps a student timestep to its inference-step index (999 → 1,
  749 → 2, … for the list {999, 749, 499, 249}).
* :class:`ExponentialWeight` — Eq. 3: d(s, t) = √ᾱ_t · μ · ν^(P(s)−1) (μ = 0.5, ν = 2.1). The paper
  prints the first factor as (Π_{i=0}^t (1 − β_t))^{1/2}, with the product's index typo (β_t for β_i);
  the product Π_{i≤t}(1 − β_i) is ᾱ_t, and the authors' code reads √ᾱ_t.
* :class:`LinearWeight` — Eq. 4: d(s, t) = √ᾱ_t · (γ · P(s) + κ) (App. C; sr_lab's defaults γ = κ = 0.5,
  inside Table 9's grid; the paper keeps Eq. 3).
* :func:`distillation_loss` — L_ta-dis = mean over samples and teacher draws of d(s, t) · ‖x̂0 − sg(x̂ψ)‖²
  (the squared error averaged over the image elements, as the authors' MSE).

The adversarial part of Eq. 1 (hinge loss with weight λ = 0.02) uses the discriminator's loss helpers.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["student_step_index", "ExponentialWeight", "LinearWeight", "distillation_loss"]


def student_step_index(s: torch.Tensor | int, student_timesteps: Sequence[int]) -> torch.Tensor:
    """P(s) ∈ {1, …, N}: the 1-based position of ``s`` in the (descending) student timestep list."""
    table = {int(t): i + 1 for i, t in enumerate(student_timesteps)}
    values = s.tolist() if torch.is_tensor(s) else [int(s)]
    values = values if isinstance(values, list) else [values]
    unknown = [v for v in values if v not in table]
    if unknown:
        raise ValueError(f"student timestep(s) {unknown} not in the student list {list(student_timesteps)}")
    out = torch.tensor([table[v] for v in values], dtype=torch.float64)
    return out.to(s.device) if torch.is_tensor(s) else out


class ExponentialWeight:
    """AddSR Eq. 3: d(s, t) = √ᾱ_t · μ · ν^(P(s)−1)."""

    def __init__(self, mu: float = 0.5, nu: float = 2.1):
        if mu <= 0 or nu <= 0:
            raise ValueError(f"mu={mu} and nu={nu} must be > 0")
        self.mu, self.nu = float(mu), float(nu)

    def __call__(self, abar_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
        return abar_t.double().sqrt() * self.mu * self.nu ** (p_s.double() - 1)


class LinearWeight:
    """AddSR Eq. 4: d(s, t) = √ᾱ_t · (γ · P(s) + κ)."""

    def __init__(self, gamma: float = 0.5, kappa: float = 0.5):
        self.gamma, self.kappa = float(gamma), float(kappa)

    def __call__(self, abar_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
        return abar_t.double().sqrt() * (self.gamma * p_s.double() + self.kappa)


def distillation_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_b d_b · mean(‖x̂0_b − sg(x̂ψ_b)‖²) with the teacher's prediction detached (stop-gradient).
    ``x0_*``: (B·k, ...) (k teacher draws per sample, repeated), ``weight``: (B·k,)."""
    per_sample = (x0_student.float() - x0_teacher.detach().float()).square().flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()

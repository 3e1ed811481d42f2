"""Timestep sets: respacing for samplers and the training-timestep distributions (config group
``schedule``).

* :func:`space_timesteps` — evenly strided subset of [0, T) (IDDPM respacing, as used by the CCSR
  and StableSR samplers: stride (T-1)/(n-1) accumulated in floating point, rounded).
* :class:`UniformTimesteps` — t ~ U{0, ..., T-1} (CCSR Eq. 2; StableSR stage 1).
* :class:`CCSRNonUniformTimesteps` — CCSR Sec. 3.2 non-uniform timestep learning: the eps loss uses
  t ~ U{0, ..., t_max - 1} and the x0 losses use the anchors T-1 and t_max (t_max = round(T * 2/3)).
"""
from __future__ import annotations

import torch


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps of [0, num_timesteps) spread evenly, ascending, first 0 and last T-1.

    ``count = 1`` is the single timestep T-1 (a one-step sampler starts from noise at T-1 and returns
    x̂0; IDDPM's respacing would give t = 0, i.e. a "denoising" step applied to pure noise)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} steps out of {num_timesteps}")
    if count == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(round(cur))
        cur += stride
    return sorted(set(steps))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value} must be a fraction of T in [0, 1]")


class UniformTimesteps:
    """t ~ U{0, ..., T-1}, one draw per sample."""

    def __init__(self, num_timesteps: int = 1000):
        self.num_timesteps = int(num_timesteps)

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        dev = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=dev).to(device)


class CCSRNonUniformTimesteps(UniformTimesteps):
    """CCSR non-uniform timestep learning (paper 000, Sec. 3.2).

    ``t_max``/``t_min`` are fractions of T (defaults 2/3 and 1/3 as in the paper and the authors'
    0.6667/0.3333). The eps loss samples t ∈ [0, t_max_step); ``anchor_T`` = T - 1 and
    ``t_max_step`` = round(T * t_max) are the timesteps of the x0 losses l_T and l_tmax (Eq. 3).
    ``t_min`` is used only by the truncated sampler; it is kept here so one config states both.
    """

    def __init__(self, num_timesteps: int = 1000, t_max: float = 0.6667, t_min: float = 0.3333):
        super().__init__(num_timesteps)
        _check_fraction("t_max", t_max)
        _check_fraction("t_min", t_min)
        if not t_min < t_max:
            raise ValueError(f"t_min={t_min} must be smaller than t_max={t_max}")
        self.t_max, self.t_min = float(t_max), float(t_min)
        self.t_max_step = int(round(self.num_timesteps * self.t_max))
        if self.t_max_step < 1:
            raise ValueError(f"t_max={t_max} gives t_max_step=0 for T={num_timesteps}")
        self.anchor_T = self.num_timesteps - 1

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        dev = generator.device if generator is not None else device
        return torch.randint(0, self.t_max_step, (n,), generator=generator, device=dev).to(device)

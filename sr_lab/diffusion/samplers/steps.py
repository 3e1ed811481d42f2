"""Step rules shared by every sampler: how the latent moves from one listed timestep to the next.

A rule is ``rule(x_t, eps, x0, abar_t, abar_s, generator) -> x_s``: given the model's ε̂ at x_t and the
x̂0 derived from it (CCSR paper 000, Sec. 3.2: x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t), move to the next
listed timestep s < t. ``abar_t`` / ``abar_s`` are Python floats (ᾱ of the two timesteps, prepared
once per sampler call); ``abar_s = 1`` (after the last listed timestep) is handled by the loop, which
then returns x̂0 without calling a rule. Noise comes only from ``generator`` (or a list of per-row
generators, see :func:`sr_lab.diffusion.schedule.randn_like`).

* :func:`ddpm_posterior` — ancestral DDPM between kept timesteps (IDDPM respacing): a draw from
  q(x_s | x_t, x̂0) with β' = 1 − ᾱ_t/ᾱ_s, mean coefficients √ᾱ_s β'/(1−ᾱ_t) and √(1−β')(1−ᾱ_s)/(1−ᾱ_t),
  "fixed_small" variance (1−ᾱ_s)/(1−ᾱ_t) β' (CCSR paper, Preliminaries; StableSR's DDPM-200).
* :func:`ddim` — DDIM Eq. 12 (Song et al. 2021) with η: σ = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_s),
  x_s = √ᾱ_s x̂0 + √(1−ᾱ_s−σ²) ε̂ + σ z.
* :func:`renoise` — forget x_t: q-sample x̂0 to s with fresh noise, x_s = √ᾱ_s x̂0 + √(1−ᾱ_s) z
  (CCSR's jump from T to t_max, Sec. 3.2 / Fig. 3; AddSR's sampler between its 4 student steps,
  AddSR paper 002 Sec. 3.2; LCM-style few-step sampling).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from sr_lab.diffusion.schedule import randn_like

Rule = Callable[..., torch.Tensor]

__all__ = ["Rule", "posterior_step", "ddim_step", "ddpm_posterior", "ddim", "renoise", "RULES"]


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


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float,
              eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM update x_t -> x_s (DDIM Eq. 12); ``noise`` is used only when σ > 0."""
    sigma = eta * ((1.0 - abar_s) / (1.0 - abar_t)) ** 0.5 * (1.0 - abar_t / abar_s) ** 0.5
    direction = max(1.0 - abar_s - sigma ** 2, 0.0) ** 0.5
    out = abar_s ** 0.5 * x0 + direction * eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out


def ddpm_posterior(x_t, eps, x0, abar_t: float, abar_s: float, generator) -> torch.Tensor:
    """Ancestral DDPM step (module doc); draws one noise tensor."""
    return posterior_step(x_t, x0, abar_t, abar_s, randn_like(x_t, generator))


def ddim(x_t, eps, x0, abar_t: float, abar_s: float, generator, *, eta: float = 0.0) -> torch.Tensor:
    """DDIM step (module doc); draws noise only when η > 0. Bind η with ``functools.partial``."""
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    z = randn_like(x_t, generator) if eta > 0 else None
    return ddim_step(x_t, eps, x0, abar_t, abar_s, eta, z)


def renoise(x_t, eps, x0, abar_t: float, abar_s: float, generator) -> torch.Tensor:
    """x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s) z with fresh z (CCSR Eq. 1 applied to x̂0); x_t is not used."""
    z = randn_like(x0, generator)
    # ᾱ_s rounded to the latent's dtype first, as :func:`sr_lab.diffusion.schedule.q_sample` does; the
    # coefficients are 0-dim CPU tensors, which a device kernel takes by value (no per-step host->device copy)
    a = torch.full((), abar_s, dtype=torch.float64).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * z


RULES: dict[str, Rule] = {"ddpm": ddpm_posterior, "ddim": ddim, "renoise": renoise}


def ddim_rule(eta: float) -> Rule:
    return partial(ddim, eta=float(eta))

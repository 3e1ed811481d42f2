"""Step hooks ``hook(i, n, t, x_next, x0_hat, cond) -> (x_next, cond)`` (see
:mod:`sr_lab.diffusion.samplers.loop`), configured as a nested ``_target_`` (or a list of them) under
``sampler.hook``.

* :class:`PSRHook` — AddSR's prediction-based self-refinement (paper 002, Sec. 3.2, Eq. 2): after step i
  the condition of step i+1 is rebuilt from this step's x̂0 through ``cond["refine"]`` (the stage's
  runner, :meth:`sr_lab.models.runner.ControlledUNet.refine`), blended with the LR by ``w``
  (``w = 0``: every step conditioned on the LR; the authors' inference script blends 0.5).
* :class:`LSAHook` — ClearSR's latent space adjustment (paper 003, Sec. 3.3, Eq. 3/4) on the latent
  each step produces: early steps ELA(x) = (1 − α)·x + α·x_lr (pull towards the LR latent: fidelity),
  late steps LLA(x) = (1 + β)·x − β·x_lr (push away from it: detail). The paper chooses the phase
  boundaries from a NIQE curve and prints no numbers; Sec. 3.3 says the image is mostly determined "at
  around the 40th step" of 50 and details come in "the last few steps". sr_lab's defaults: early = the
  first 30 % of the executed steps (15 of 50), late = from 80 % on (steps 40-49) (``early_end`` /
  ``late_start`` fractions; keys, so sweeps can move them).
"""
from __future__ import annotations

import math

import torch

from sr_lab.models.branches.base import REFINE_SPACES

__all__ = ["PSRHook", "LSAHook"]


class PSRHook:
    """Condition step i+1 on x̂0 of step i (AddSR Eq. 2); ``space`` latent (default) or pixel."""

    def __init__(self, w: float = 0.5, space: str = "latent"):
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"psr w={w} must be in [0, 1]")
        if space not in REFINE_SPACES:
            raise ValueError(f"psr space={space!r} must be one of {REFINE_SPACES}")
        self.w, self.space = float(w), space

    def __call__(self, i: int, n: int, t: int, x_next: torch.Tensor, x0_hat: torch.Tensor, cond: dict):
        if i + 1 >= n:
            return x_next, cond
        refine = cond.get("refine")
        if refine is None:
            raise KeyError("PSRHook needs cond['refine'] (built by the stage's condition; see "
                           "sr_lab.models.stage_inputs.build_condition)")
        return x_next, refine(cond, x0_hat, self.w, self.space)


class LSAHook:
    """ClearSR LSA (Eq. 3 early, Eq. 4 late) on ``x_next`` with ``x_lr = cond[key]``."""

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, early_end: float = 0.3,
                 late_start: float = 0.8, key: str = "lr_latent"):
        for name, v in (("early_end", early_end), ("late_start", late_start)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"lsa {name}={v} must be a fraction of the executed steps in [0, 1]")
        if float(early_end) > float(late_start):
            raise ValueError(f"lsa early_end={early_end} must not exceed late_start={late_start}")
        if not 0.0 <= float(alpha) <= 1.0 or float(beta) < 0:
            raise ValueError(f"lsa alpha={alpha} must be in [0, 1] and beta={beta} >= 0")
        self.alpha, self.beta = float(alpha), float(beta)
        self.early_end, self.late_start, self.key = float(early_end), float(late_start), str(key)

    def phase(self, i: int, n: int) -> str:
        """``early`` for step i < ⌈early_end·n⌉, ``late`` for i ≥ ⌈late_start·n⌉, else ``middle``."""
        if i < math.ceil(self.early_end * n - 1e-9):
            return "early"
        if i >= math.ceil(self.late_start * n - 1e-9):
            return "late"
        return "middle"

    def __call__(self, i: int, n: int, t: int, x_next: torch.Tensor, x0_hat: torch.Tensor, cond: dict):
        phase = self.phase(i, n)
        if phase == "middle":
            return x_next, cond
        x_lr = cond[self.key].to(x_next.dtype)
        if phase == "early":
            return (1 - self.alpha) * x_next + self.alpha * x_lr, cond
        return (1 + self.beta) * x_next - self.beta * x_lr, cond

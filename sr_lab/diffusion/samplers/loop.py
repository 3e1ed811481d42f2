"""The one sampling loop: a list of timesteps, a step rule per transition, and a step hook.

Every sampler of sr_lab is ``timesteps(T, **knobs) -> list[int]`` (the exact timesteps at which the
model is evaluated, descending; the number of model calls is its length) plus a rule per step
(:mod:`sr_lab.diffusion.samplers.steps`), run by :func:`run_steps`:

    for i, t in enumerate(timesteps):
        ε̂ = model(x, t, cond);  x̂0 = (x − √(1−ᾱ_t) ε̂) / √ᾱ_t
        x = rule_i(x, ε̂, x̂0, ᾱ_t, ᾱ_target_i)      (x = x̂0 after the last step: ᾱ = 1)
        x, cond = hook(i, n, t, x, x̂0, cond)
    return x

The **step hook** ``hook(i, n, t, x_next, x0_hat, cond) -> (x_next, cond)`` runs after every step,
including the last (whose ``x_next`` is x̂0 itself, so a hook may also rewrite the returned latent).
It may rewrite the latent (ClearSR's LSA, paper 003 Eq. 3/4) and the condition used by the next step
(AddSR's PSR, paper 002 Eq. 2: the next step is conditioned on this step's x̂0). The sampler is the
outermost caller of the model, so wrappers around the model (classifier-free guidance, tiled
aggregation) see the rewritten condition of the whole latent and cut tiles from it unchanged. Several
hooks compose as a list (applied in order). ``callback(t, x0_hat)`` is an observer (progress,
tests) with no return value.

Host–device synchronisation: ᾱ values are read once as Python floats (one device-to-host copy before the
loop) and the timestep tensors (``(B,)`` int64, a fixed shape for ``torch.compile``) are built on the device
once per call, so the loop body — model, step rules, hooks — reads nothing back from the device and copies
nothing to it: no ``.item()`` / ``float()`` / ``int()`` / ``bool()`` / ``.tolist()`` / ``.cpu()`` of a tensor, no
``torch.tensor(...)`` per step (``tests/test_speed.py`` runs every sampler and hook with those raising).
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

import torch

from sr_lab.diffusion.schedule import x0_from_eps
from sr_lab.diffusion.samplers.steps import Rule

Model = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

__all__ = ["Model", "StepHook", "compose_hooks", "check_timesteps", "run_steps"]


class StepHook(Protocol):
    def __call__(self, i: int, n: int, t: int, x_next: torch.Tensor, x0_hat: torch.Tensor,
                 cond: dict) -> tuple[torch.Tensor, dict]: ...


def compose_hooks(hook: StepHook | Iterable[StepHook] | None) -> StepHook | None:
    """``None``, one hook, or a list of hooks (applied in order) -> one hook or ``None``."""
    if hook is None:
        return None
    if callable(hook):
        return hook
    hooks = [h for h in hook if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def composed(i, n, t, x_next, x0_hat, cond):
        for h in hooks:
            x_next, cond = h(i, n, t, x_next, x0_hat, cond)
        return x_next, cond

    return composed


def check_timesteps(timesteps: Sequence[int], num_timesteps: int, name: str = "sampler.timesteps") -> list[int]:
    """A non-empty, strictly descending list of integers in [0, T); returns it as ``list[int]``."""
    ts = list(timesteps)
    if not ts:
        raise ValueError(f"{name} is empty")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
        raise ValueError(f"{name}={ts} must be integers")
    if any(not 0 <= t < num_timesteps for t in ts):
        raise ValueError(f"{name}={ts} must lie in [0, {num_timesteps})")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{name}={ts} must be strictly descending")
    return [int(t) for t in ts]


def run_steps(model: Model, x: torch.Tensor, cond: dict, alphas_cumprod: torch.Tensor,
              timesteps: Sequence[int], rules: Rule | Sequence[Rule], *, generator=None,
              targets: Sequence[int | None] | None = None, hook=None,
              callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the model at ``timesteps`` (descending) from ``x``; returns the latent after the last step
    (x̂0 of the last step, possibly rewritten by the hook). ``rules`` is one rule or one per step;
    ``targets[i]`` is the timestep step i moves to (default: the next listed one; ``None`` after the
    last step = ᾱ 1, i.e. x̂0)."""
    n = len(timesteps)
    if n == 0:
        raise ValueError("a sampler needs at least one timestep")
    rules = list(rules) if isinstance(rules, (list, tuple)) else [rules] * n
    if len(rules) != n:
        raise ValueError(f"{len(rules)} step rules for {n} timesteps")
    targets = list(targets) if targets is not None else [*timesteps[1:], None]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} step targets for {n} timesteps")
    hook = compose_hooks(hook)
    abar = alphas_cumprod.double().cpu().tolist()
    b = x.shape[0]
    t_tensors = [torch.full((b,), int(t), device=x.device, dtype=torch.long) for t in timesteps]
    for i, t in enumerate(timesteps):
        tt = t_tensors[i]
        eps = model(x, tt, cond)
        x0 = x0_from_eps(alphas_cumprod, x, tt, eps)
        s = targets[i]
        abar_s = 1.0 if s is None else float(abar[int(s)])
        x = x0 if abar_s >= 1.0 else rules[i](x, eps, x0, float(abar[int(t)]), abar_s, generator)
        if callback is not None:
            callback(int(t), x0)
        if hook is not None:
            x, cond = hook(i, n, int(t), x, x0, cond)
    return x

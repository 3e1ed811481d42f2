"""Classifier-free guidance with a negative prompt as a model wrapper (StableSR paper 001, Sec. 5.1,
Eq. 8; Ho & Salimans 2021).

StableSR Eq. 8 writes ε̃ = ε(Z, F, c, t) + s (ε(Z, F, [], t) − ε(Z, F, c, t)) with c the negative
prompt and [] the stage's own (null) prompt, i.e.

    ε̃ = ε_uncond + s (ε_cond − ε_uncond),   ε_uncond := ε with the negative prompt.

s = 1 is the plain model (one pass, the wrapper is not applied), s = 0 uses the negative prompt alone.
Both passes run as **one** batched call: the batch is doubled (conditional rows first) and every
batch-shaped tensor of the condition is repeated, except ``context`` whose second half is the negative
prompt's embedding ``cond[uncond_key]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

UNCOND_KEY = "uncond_context"


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """StableSR Eq. 8: ε_uncond + s (ε_cond − ε_uncond)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _double(value: Any, batch: int) -> Any:
    """Repeat batch-shaped tensors (first dim == ``batch``) twice along dim 0, recursing into
    dicts/lists/tuples; anything else passes through."""
    if torch.is_tensor(value):
        return torch.cat([value, value]) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _double(v, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v, batch) for v in value)
    return value


def double_condition(cond: dict, batch: int, uncond_key: str = UNCOND_KEY) -> dict:
    """The condition for the doubled batch [conditional rows; unconditional rows]."""
    if uncond_key not in cond:
        raise KeyError(f"classifier-free guidance needs cond[{uncond_key!r}] (the negative prompt's context)")
    out = {k: _double(v, batch) for k, v in cond.items() if k not in ("context", uncond_key)}
    out["context"] = torch.cat([cond["context"], cond[uncond_key].to(cond["context"].dtype)])
    return out


def classifier_free_guidance(model: Model, scale: float, uncond_key: str = UNCOND_KEY) -> Model:
    """Wrap ``model(x, t, cond) -> ε`` into the guided model of StableSR Eq. 8 (``scale`` = s).

    Returns ``model`` itself for s = 1 (guidance off, a single pass). Otherwise the wrapper expects
    ``cond[uncond_key]``, the context of the negative prompt, next to ``cond["context"]``.
    """
    scale = float(scale)
    if scale == 1.0:
        return model

    def guided(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        b = x.shape[0]
        eps = model(torch.cat([x, x]), torch.cat([t, t]), double_condition(cond, b, uncond_key))
        eps_cond, eps_uncond = eps[:b], eps[b:]
        return cfg_combine(eps_cond, eps_uncond, scale)

    guided.cfg_scale = scale  # type: ignore[attr-defined]
    return guided

"""One frozen-UNet evaluation steered by several control branches (config group ``adapter``).

:class:`ControlledUNet` ``(unet, x, t, context, cond) -> ε̂``: every branch attaches its hooks
(StableSR's SFT, stage-owned LoRA / attention processors) and/or returns ControlNet residuals; the
residuals of all branches are summed element-wise and the frozen UNet runs **once** with them
(ClearSR paper 003, Fig. 3: DPM + GSPM control signals are summed into the UNet decoder; a ControlNet
plus StableSR's SFT works the same way). Hooks are removed in a ``finally``, so the UNet object stays
clean between evaluations and can be shared by several stages (a teacher and a student on one
backbone). Not thread-safe: two concurrent forwards on one UNet would see each other's hooks.

The condition is the union of the branches' declared keys (:meth:`condition`); two branches declaring
the same key share one entry (it is built by a branch that :attr:`~ControlBranch.owns_condition`, else by
the first). It also holds ``lr_image``, the upsampled LR
in [0, 1] (pixel-space PSR refines from it). Interface for stages: :meth:`condition`,
:attr:`condition_requires_grad`, :meth:`refine`, ``forward``.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sr_lab.models.branches.base import LR_IMAGE_KEY, ControlBranch, upsample_to

__all__ = ["ControlledUNet"]


def _accepts(factory: Any, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _build(branch: Any, unet: nn.Module, vae: nn.Module | None) -> ControlBranch:
    """A branch module, or a factory completed with the UNet (Hydra ``_partial_: true``); a factory that
    takes a ``vae`` argument (a branch owning a copy of the VAE encoder) also gets the backbone's VAE."""
    if isinstance(branch, nn.Module):
        b = branch
    elif _accepts(branch, "vae"):
        if vae is None:
            raise ValueError(f"{getattr(branch, 'func', branch)} needs the backbone's VAE: build the adapter "
                             f"as adapter(unet, vae=backbone.vae)")
        b = branch(unet, vae=vae)
    else:
        b = branch(unet)
    if not isinstance(b, ControlBranch):
        raise TypeError(f"{type(b).__name__} is not a ControlBranch (sr_lab.models.branches.base)")
    return b


class ControlledUNet(nn.Module):
    """Runner over named control branches (a mapping name -> branch or factory; a list is named 0, 1, …)."""

    def __init__(self, unet: nn.Module, branches: Mapping[str, Any] | Sequence[Any], vae: nn.Module | None = None):
        super().__init__()
        items = branches.items() if isinstance(branches, Mapping) else enumerate(branches)
        self.branches = nn.ModuleDict({str(k): _build(b, unet, vae) for k, b in items if b is not None})
        if not len(self.branches):
            raise ValueError("adapter.branches is empty: a ControlledUNet needs at least one control branch")

    # -- condition ---------------------------------------------------------------------------------
    @property
    def condition_keys(self) -> tuple[str, ...]:
        keys: list[str] = []
        for b in self.branches.values():
            keys += [k for k in b.condition_keys if k not in keys]
        return tuple(keys)

    @property
    def condition_requires_grad(self) -> bool:
        return any(b.condition_requires_grad for b in self.branches.values())

    def _condition_order(self) -> list[ControlBranch]:
        """Branches that own their condition's encoder first (ClearSR's LoRA'd LR encoder makes the
        ``lr_latent`` that DPM and GSPM read; without it, the first of them encodes with the frozen VAE)."""
        bs = list(self.branches.values())
        return [b for b in bs if b.owns_condition] + [b for b in bs if not b.owns_condition]

    def condition(self, backbone, lr01: torch.Tensor, hr_size: tuple[int, int], reuse: dict | None = None) -> dict:
        """The branches' conditions for LR images in [0, 1] (plus ``lr_image``). ``reuse``: a condition of
        the same images built before (an earlier loss part's): only the branches whose condition carries
        gradients are rebuilt, the others' entries (e.g. a CLIP image embedding) are taken from it."""
        cond: dict = {}
        for b in self._condition_order():
            if all(k in cond for k in b.condition_keys):
                continue
            if reuse is not None and not b.condition_requires_grad and all(k in reuse for k in b.condition_keys):
                cond.update({k: reuse[k] for k in b.condition_keys})
                continue
            cond.update(b.condition(backbone, lr01, hr_size))
        cond[LR_IMAGE_KEY] = upsample_to(lr01, hr_size).detach()
        return cond

    def refine(self, backbone, cond: dict, x0_hat: torch.Tensor, w: float, space: str = "latent") -> dict:
        """Every branch's condition rebuilt from x̂0 (AddSR PSR, paper 002 Eq. 2; see ControlBranch.refine)."""
        done: set[str] = set()
        for b in self._condition_order():
            if all(k in done for k in b.condition_keys):
                continue
            cond = b.refine(backbone, cond, x0_hat, w, space)
            done.update(b.condition_keys)
        return cond

    def learned_state_keys(self) -> set[str]:
        """The branches' learned tensors, named as in this runner's state dict (``branches.<name>.*``)."""
        return {f"branches.{name}.{k}" for name, b in self.branches.items() for k in b.learned_state_keys()}

    # -- one evaluation ----------------------------------------------------------------------------
    def forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                cond: dict) -> torch.Tensor:
        udt = unet.dtype
        down_sum: list[torch.Tensor] | None = None
        mid_sum: torch.Tensor | None = None
        handles: list = []
        try:
            for b in self.branches.values():
                res = b.residuals(unet, x, t, context, cond)
                if res is not None:
                    down, mid = res
                    if down_sum is None:
                        down_sum, mid_sum = list(down), mid
                    else:
                        down_sum = [a + d for a, d in zip(down_sum, down)]
                        mid_sum = mid_sum + mid
                handles += b.attach(unet, x, t, context, cond)
            kwargs = {}
            if down_sum is not None:
                kwargs = {"down_block_additional_residuals": [d.to(udt) for d in down_sum],
                          "mid_block_additional_residual": mid_sum.to(udt)}
            return unet(x.to(udt), t, encoder_hidden_states=context.to(udt), **kwargs).sample
        finally:
            for h in handles:
                h.remove()

"""The control-branch interface and the shared LR-latent condition.

A branch contributes to one frozen-UNet evaluation in either (or both) of two ways:

* :meth:`ControlBranch.residuals` returns ControlNet-style residuals ``(down, mid)`` which the runner
  sums over branches and adds to the UNet's skip connections and middle block (CCSR's LAControlNet;
  ClearSR's DPM + GSPM, paper 003 Fig. 3, are two such branches summed);
* :meth:`ControlBranch.attach` registers removable forward hooks on the UNet for the duration of one
  forward (StableSR's SFT layers, paper 001 Eq. 1; stage-owned LoRA or attention processors on the UNet
  decoder), and returns their handles; the runner removes them in a ``finally``.

Conditions are declared, not conventional: a branch lists the keys it reads from the condition dict in
:attr:`condition_keys` and builds them in :meth:`condition` (``lr01`` in [0, 1] at LR or HR size). When
the branch owns a trainable encoder its condition carries gradients (:attr:`condition_requires_grad`):
the stage then rebuilds the condition for every backward pass instead of once under ``no_grad``. HR
target latents never come from a branch: they come from the backbone's frozen, pretrained encoder.

:meth:`refine` rewrites the branch's condition from a predicted x̂0 (AddSR's PSR, paper 002 Eq. 2:
step i is conditioned on x̂0 of step i−1): ``latent`` space blends the latents directly,
``w·x̂0 + (1 − w)·c_LR``; ``pixel`` space decodes x̂0, blends with the LR image,
``w·D(x̂0) + (1 − w)·I_LR`` (the authors' inference, AddSR code), and re-encodes it with the branch's
encoder. The LR original is kept in the condition under ``<key>@lr`` so repeated refinements always
blend with the LR, never with a previous refinement.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ControlBranch", "upsample_to", "REFINE_SPACES", "LR_IMAGE_KEY"]

REFINE_SPACES = ("latent", "pixel")
LR_IMAGE_KEY = "lr_image"  # the bicubic-upsampled LR in [0, 1] at the HR size (pixel-space PSR)


def upsample_to(lr01: torch.Tensor, hr_size: tuple[int, int]) -> torch.Tensor:
    """LR in [0, 1] -> bicubic to ``hr_size`` (if it differs), clamped to [0, 1]."""
    if tuple(lr01.shape[-2:]) != tuple(hr_size):
        lr01 = F.interpolate(lr01, size=tuple(hr_size), mode="bicubic", align_corners=False).clamp(0, 1)
    return lr01


class ControlBranch(nn.Module):
    """Base class: a branch conditioned on the VAE latent (posterior mode) of the bicubic-upsampled LR,
    stored under ``cond_key`` (default ``"lr_latent"``). Subclasses override :meth:`residuals` and/or
    :meth:`attach`; a branch with its own encoder overrides :meth:`encode_condition`."""

    #: True for a branch whose encoder makes the condition entry other branches read (ClearSR's LoRA'd
    #: LR encoder): the runner builds (and refines) its keys before any other branch's.
    owns_condition: bool = False

    def __init__(self, cond_key: str = "lr_latent"):
        super().__init__()
        self.cond_key = str(cond_key)

    # -- the condition ---------------------------------------------------------------------------
    @property
    def condition_keys(self) -> tuple[str, ...]:
        return (self.cond_key,)

    @property
    def condition_requires_grad(self) -> bool:
        """True when :meth:`condition` runs trainable weights (the stage then recomputes it with grad)."""
        return False

    def encode_condition(self, backbone, image01: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] at HR size -> the condition latent (default: the frozen VAE, posterior mode)."""
        with torch.no_grad():
            return backbone.encode(image01, sample=False)

    def condition(self, backbone, lr01: torch.Tensor, hr_size: tuple[int, int]) -> dict:
        """LR in [0, 1] -> bicubic to the HR size (if smaller) -> ``{cond_key: latent}``."""
        grad = torch.enable_grad() if self.condition_requires_grad and torch.is_grad_enabled() else torch.no_grad()
        with grad:
            return {self.cond_key: self.encode_condition(backbone, upsample_to(lr01, hr_size))}

    def learned_state_keys(self) -> set[str]:
        """Names (in this branch's state dict) of the tensors that are the branch's learned state: what a
        stage stores and what a student initialised from this branch may train. Default: all of them;
        a branch holding frozen copies rebuilt at construction (a LoRA'd copy of the VAE encoder's base
        weights, a pretrained CLIP tower) returns only its own weights."""
        return set(self.state_dict().keys())

    # -- the UNet evaluation -----------------------------------------------------------------------
    def step_modules(self) -> dict[str, nn.Module]:
        """The networks this branch evaluates at every model call, by attribute name (what ``speed.compile``
        compiles and ``speed.channels_last`` converts, :mod:`sr_lab.models.speed`); default none."""
        return {}

    def residuals(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  cond: dict) -> tuple[Sequence[torch.Tensor], torch.Tensor] | None:
        """ControlNet residuals ``(down, mid)`` for this evaluation, or ``None``."""
        return None

    def attach(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               cond: dict) -> list:
        """Register forward hooks on ``unet`` for one evaluation; returns the handles to remove."""
        return []

    # -- refinement from x̂0 (PSR) -------------------------------------------------------------------
    def refine(self, backbone, cond: dict, x0_hat: torch.Tensor, w: float, space: str = "latent") -> dict:
        """The condition with this branch's entry rebuilt from x̂0 (module doc); ``w = 0`` keeps the LR's."""
        if space not in REFINE_SPACES:
            raise ValueError(f"refine space={space!r} must be one of {REFINE_SPACES}")
        key, origin = self.cond_key, self.cond_key + "@lr"
        out = dict(cond)
        base = out.setdefault(origin, cond[key])
        w = float(w)
        if w == 0.0:
            out[key] = base
            return out
        if space == "latent":
            out[key] = w * x0_hat.to(base.dtype) + (1.0 - w) * base
            return out
        if LR_IMAGE_KEY not in out:
            raise KeyError(f"pixel-space refinement needs cond[{LR_IMAGE_KEY!r}] (the upsampled LR image, "
                           f"added by ControlledUNet.condition)")
        with torch.no_grad():
            image = w * backbone.decode(x0_hat.float()) + (1.0 - w) * out[LR_IMAGE_KEY].float()
            out[key] = self.encode_condition(backbone, image.clamp(0, 1))
        return out

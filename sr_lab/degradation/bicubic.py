"""Plain bicubic downscaling "degradation" (classic, non-blind SR benchmark setting)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BicubicDegradation"]


class BicubicDegradation(nn.Module):
    """Bicubic x``scale`` downscaling with the :class:`RealESRGANDegradation` call signature.

    Classic bicubic SR degradation (as CCSR's ``BicubicBatchTransform``, which also uses
    ``F.interpolate(mode='bicubic', antialias=True)``). Note: torch's antialiased bicubic (a = -0.75,
    kernel stretched by the scale) is close to, but not the same as, MATLAB ``imresize``
    (a = -0.5); spec §3 resize row.

    ``deg(hr, generator=None)`` with ``hr`` (B, 3, H, W) in [0, 1], H and W divisible by ``scale``;
    ``generator`` is accepted for interface compatibility and unused (the op is deterministic).
    Returns ``{"hr": hr, "lr": lr}`` (float32); ``lr`` is (B, 3, H/scale, W/scale), or bicubically
    upsampled back to (H, W) with ``resize_lr_to_hr``; clamped to [0, 1] and, with ``round_lr``,
    rounded to 8 bit (after the upsampling, as CCSR).
    """

    def __init__(self, scale: int = 4, resize_lr_to_hr: bool = False, round_lr: bool = False):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
            raise ValueError(f"scale: must be a positive int, got {scale!r}")
        self.scale = scale
        self.resize_lr_to_hr = bool(resize_lr_to_hr)
        self.round_lr = bool(round_lr)

    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Downscale ``hr`` bicubically (antialiased); see the class docstring."""
        if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
            raise ValueError(f"hr: expected a float tensor (B, 3, H, W), got {tuple(hr.shape)} {hr.dtype}")
        h, w = hr.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"hr: H and W ({h}, {w}) must be divisible by scale={self.scale}")
        x = hr.float()
        lr = F.interpolate(x, size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True)
        if not self.round_lr:
            lr = torch.clamp(lr, 0, 1)
        if self.resize_lr_to_hr:
            lr = F.interpolate(lr, size=(h, w), mode="bicubic", antialias=True)
        lr = torch.clamp(lr, 0, 1)
        if self.round_lr:
            lr = torch.round(lr * 255.0) / 255.0
        return {"hr": x, "lr": lr}

    def extra_repr(self) -> str:
        return f"scale={self.scale}, resize_lr_to_hr={self.resize_lr_to_hr}, round_lr={self.round_lr}"

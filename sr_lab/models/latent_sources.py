"""Where a decoder stage gets its latents from, when they are not stored in the batch.

:class:`TruncatedSamplerLatents` — CCSR stage 2 (paper 000, Sec. 3.3 "Remarks": "we take [stage 1's]
output x̂_{0←t_min} as the input of the second stage ... all the parameters of the first stage are
frozen"): under ``no_grad`` the frozen stage-1 model runs the CCSR truncated sampler and the returned
x̂_{0←t_min} is decoded by the trainable decoder. The chain starts at t = T-1 from

* ``start="hr"`` — the HR latent noised to T-1 (CCSR v1: ``q_sample(x_start, t=T)`` in the authors'
  ``ldm/models/diffusion/ddpm_ccsr_stage2.py`` ``p_losses``), or
* ``start="lr"`` — the LR latent noised to T-1 (the later CCSR v2 behaviour), or
* ``start="noise"`` — pure noise (what the paper's inference does).

The stage-1 adapter is rebuilt from the stage's stored config (:func:`sr_lab.modules.stage_io.load_frozen_adapter`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.diffusion.schedule import q_sample, randn_like
from sr_lab.modules.stage_io import load_frozen_adapter

__all__ = ["TruncatedSamplerLatents"]


class TruncatedSamplerLatents(nn.Module):
    """``forward(backbone, hr01, lr01, generator) -> latent`` by the frozen stage 1 + ``sampler``."""

    def __init__(self, backbone: nn.Module, stage1: str, sampler: Callable, start: str = "hr",
                 prompt: str | None = None):
        super().__init__()
        if start not in ("hr", "lr", "noise"):
            raise ValueError(f"latent_source.start={start!r} must be 'hr' (CCSR v1), 'lr' (v2) or 'noise'")
        if not stage1:
            raise ValueError("latent_source.stage1 is required: the export folder of a trained stage 1")
        adapter, stage_prompt, _ = load_frozen_adapter(stage1, backbone)
        self.adapter = adapter
        self.stage1, self.sampler, self.start = str(stage1), sampler, start
        self.prompt = stage_prompt if prompt is None else str(prompt)

    def train(self, mode: bool = True):  # frozen: never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, backbone: nn.Module, hr01: torch.Tensor, lr01: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        hr_size = tuple(hr01.shape[-2:])
        cond = self.adapter.condition(backbone, lr01, hr_size)
        cond["context"] = backbone.prompt_embedding(self.prompt, lr01.shape[0])

        def model(x, t, c):
            return self.adapter(backbone.unet, x, t, c["context"], c).float()

        if self.start == "hr":
            x0 = backbone.encode(hr01, generator=generator, sample=True)
        elif self.start == "lr":
            x0 = cond.get("lr_latent")
            if x0 is None:
                up = F.interpolate(lr01, size=hr_size, mode="bicubic", align_corners=False).clamp(0, 1)
                x0 = backbone.encode(up, sample=False)
        else:
            f = backbone.vae_factor
            x0 = torch.zeros(lr01.shape[0], backbone.unet.config.in_channels, hr_size[0] // f, hr_size[1] // f,
                             device=lr01.device)
        noise = randn_like(x0.float(), generator)
        ab = backbone.alphas_cumprod
        if self.start == "noise":
            x_T = noise
        else:
            t = torch.full((x0.shape[0],), ab.shape[0] - 1, device=x0.device, dtype=torch.long)
            x_T = q_sample(ab, x0.float(), t, noise)
        return self.sampler(model, x_T, cond, ab, generator=generator).float()

"""Where a decoder stage gets its latents from, when they are not stored in the batch.

:class:`TruncatedSamplerLatents` — CCSR stage 2 (paper 000, Sec. 3.3 "Remarks": "we take [stage 1's]
output x̂_{0←t_min} as the input of the second stage ... all the parameters of the first stage are
frozen"): under ``no_grad`` the frozen stage-1 model runs the CCSR truncated sampler and the returned
x̂_{0←t_min} is decoded by the trainable decoder. The chain starts at t = T-1 from

* ``start="hr"`` — the HR latent noised to T-1 (CCSR v1: ``q_sample(x_start, t=T)`` in the authors'
  ``ldm/models/diffusion/ddpm_ccsr_stage2.py`` ``p_losses``), or
* ``start="lr"`` — the LR latent noised to T-1 (the later CCSR v2 behaviour), or
* ``start="noise"`` — pure noise (what the paper's inference does).

The frozen stage 1 is rebuilt on the shared backbone by the stage layer
(:func:`sr_lab.modules.stage_io.load_frozen_stage`: every tensor it trained is restored) when training
starts (:meth:`sr_lab.modules.decoder_gan.DecoderGANFinetune.setup`), so a CCSR stage-2 export loads
for inference without the stage-1 files. Condition, context and x_T come from the stage's own
``prepare`` (:mod:`sr_lab.models.stage_inputs`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sr_lab.modules.stage_io import load_frozen_stage

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
        self.stage = load_frozen_stage(stage1, backbone)
        self.stage1, self.sampler, self.start = str(stage1), sampler, start
        self.prompt = None if prompt is None else str(prompt)  # None: the stage's own prompt source

    def train(self, mode: bool = True):  # frozen: never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, backbone: nn.Module, hr01: torch.Tensor, lr01: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        cond, x_T = self.stage.prepare(lr01, tuple(hr01.shape[-2:]), prompts=self.prompt, start=self.start,
                                       generator=generator, hr=hr01)
        return self.sampler(self.stage.denoise, x_T, cond, backbone.alphas_cumprod, generator=generator).float()

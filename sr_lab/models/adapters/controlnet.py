"""ControlNet adapter conditioned on the LR latent (CCSR's "LAControlNet", methods.md; also the base of
AddSR/SeeSR and of ClearSR's DPM/GSPM).

A trainable copy of the UNet encoder (diffusers ``ControlNetModel.from_unet``) receives the noisy latent
plus the VAE latent of the bicubic-upsampled LR at latent resolution; its zero-initialised residuals are
added to the frozen UNet's skip connections and middle block. The condition enters through a
one-level conditioning embedding (conv -> SiLU -> zero conv, no downsampling, since the latent is
already at the UNet's resolution). The authors instead concatenate the latent to the ControlNet input
(input conv widened with zero-initialised channels); both start as the identity on the frozen UNet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ControlNetAdapter(nn.Module):
    def __init__(self, unet: nn.Module, latent_channels: int = 4, embedding_channels: int = 64,
                 conditioning_scale: float = 1.0, seed: int = 0):
        super().__init__()
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=(int(embedding_channels),),
                conditioning_channels=int(latent_channels))
        self.controlnet.requires_grad_(True)  # from_unet builds float32 weights
        self.conditioning_scale = float(conditioning_scale)

    @torch.no_grad()
    def condition(self, backbone, lr01: torch.Tensor, hr_size: tuple[int, int]) -> dict:
        """LR in [0, 1] -> bicubic to the HR size (if smaller) -> VAE latent (posterior mode)."""
        if tuple(lr01.shape[-2:]) != tuple(hr_size):
            lr01 = F.interpolate(lr01, size=hr_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return {"lr_latent": backbone.encode(lr01, sample=False)}

    def forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                cond: dict) -> torch.Tensor:
        dtype = next(self.controlnet.parameters()).dtype
        down, mid = self.controlnet(x.to(dtype), t, encoder_hidden_states=context.to(dtype),
                                    controlnet_cond=cond["lr_latent"].to(dtype),
                                    conditioning_scale=self.conditioning_scale, return_dict=False)
        udt = unet.dtype
        return unet(x.to(udt), t, encoder_hidden_states=context.to(udt),
                    down_block_additional_residuals=[d.to(udt) for d in down],
                    mid_block_additional_residual=mid.to(udt)).sample

"""ControlNet branch conditioned on the LR latent (CCSR's "LAControlNet", methods.md; also the base of
AddSR/SeeSR and of ClearSR's DPM/GSPM).

A trainable copy of the UNet encoder (diffusers ``ControlNetModel.from_unet``) receives the noisy latent
plus the VAE latent of the bicubic-upsampled LR at latent resolution; its zero-initialised residuals are
returned to the runner (:class:`sr_lab.models.runner.ControlledUNet`), which adds them (summed with
other branches') to the frozen UNet's skip connections and middle block. The condition enters through a
one-level conditioning embedding (conv -> SiLU -> zero conv, no downsampling, since the latent is
already at the UNet's resolution). The authors instead concatenate the latent to the ControlNet input
(input conv widened with zero-initialised channels); both start as the identity on the frozen UNet.
"""
from __future__ import annotations

import torch
from torch import nn

from sr_lab.models.branches.base import ControlBranch


class ControlNetBranch(ControlBranch):
    def __init__(self, unet: nn.Module, latent_channels: int = 4, embedding_channels: int = 64,
                 conditioning_scale: float = 1.0, seed: int = 0, cond_key: str = "lr_latent"):
        super().__init__(cond_key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.controlnet = self.make_controlnet(unet, int(latent_channels), int(embedding_channels))
        self.controlnet.requires_grad_(True)  # built in float32 (from_unet copies into float32 weights)
        self.conditioning_scale = float(conditioning_scale)

    def make_controlnet(self, unet: nn.Module, latent_channels: int, embedding_channels: int) -> nn.Module:
        """The trainable network: a full copy of the UNet encoder (subclasses build other shapes)."""
        from diffusers import ControlNetModel

        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(embedding_channels,),
                                         conditioning_channels=latent_channels)

    def step_modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def residuals(self, unet, x, t, context, cond):
        dtype = next(self.controlnet.parameters()).dtype
        down, mid = self.controlnet(x.to(dtype), t, encoder_hidden_states=context.to(dtype),
                                    controlnet_cond=cond[self.cond_key].to(dtype),
                                    conditioning_scale=self.conditioning_scale, return_dict=False)
        return down, mid

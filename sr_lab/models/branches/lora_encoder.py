"""ClearSR's LoRA-finetuned LR encoder E_θ′ (ClearSR paper 003, Sec. 3.1 and App. A; methods.md "ClearSR").

"Sending the low-quality image I_lr into E_θ′ yields the latent LR embeddings x_lr", where E_θ′ is the
pretrained VAE encoder with LoRA "on each convolution layer and attention layer" (rank 16), while "I_hq
pass[es] through E_θ" — the frozen pretrained encoder — to make the diffusion targets. sr_lab keeps both:
this branch owns a **copy** of the backbone's VAE encoder and ``quant_conv`` (frozen base weights) with
peft LoRA on every ``Conv2d`` and attention projection of the copy (:func:`sr_lab.models.lora.add_peft_lora`;
``alpha`` = peft's default 8 since the paper gives none, so the LoRA scale is alpha / rank), and the
stage's HR latents keep coming from ``backbone.encode``. x_lr is the posterior **mode** (mean) of the copy,
times the VAE's latent scale, i.e. the same quantity as the frozen LR condition of CCSR / StableSR.

The branch only makes the condition (``owns_condition``): it contributes no residual and no hook. DPM and
GSPM read its entry (``cond_key``, default ``lr_latent``), as does the LSA step hook at inference (x_lr of
ClearSR Eq. 3/4). Its condition carries gradients while its LoRA trains, so the stage rebuilds it for every
backward pass. Only the LoRA tensors are trainable, hence only they enter checkpoints and exports; the base
copy is rebuilt from the backbone. Dropping this branch (``~adapter.branches.lr_encoder``) is Table 3's
"no VAE LoRA": DPM then encodes x_lr with the frozen VAE.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sr_lab.models.branches.base import ControlBranch

__all__ = ["LoRAEncoderBranch", "LREncoder"]


class LREncoder(nn.Module):
    """VAE encoder + quant_conv -> posterior mean, scaled: image in [0, 1] -> latent."""

    def __init__(self, encoder: nn.Module, quant_conv: nn.Module | None, latent_scale: float):
        super().__init__()
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.latent_scale = float(latent_scale)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype
        h = self.encoder(image01.to(dtype) * 2 - 1)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, _ = torch.chunk(h, 2, dim=1)
        return mean.float() * self.latent_scale


class LoRAEncoderBranch(ControlBranch):
    """Owns ``cond[cond_key]`` = E_θ′(LR): a LoRA'd copy of the VAE encoder (module doc)."""

    owns_condition = True

    def __init__(self, unet: nn.Module, vae: nn.Module, rank: int = 16, alpha: float | None = None,
                 seed: int = 0, cond_key: str = "lr_latent"):
        super().__init__(cond_key)
        from sr_lab.models.lora import DEFAULT_ALPHA, add_peft_lora, encoder_lora_targets

        quant = getattr(vae, "quant_conv", None)
        enc = LREncoder(copy.deepcopy(vae.encoder), copy.deepcopy(quant) if quant is not None else None,
                        float(vae.config.scaling_factor))
        enc.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(DEFAULT_ALPHA if alpha is None else alpha)
        self.lr_encoder = add_peft_lora(enc, encoder_lora_targets(enc), rank=self.rank, alpha=self.alpha,
                                        seed=int(seed))
        for name, p in self.lr_encoder.named_parameters():
            if p.requires_grad:  # LoRA weights train in float32 whatever the frozen copy's dtype
                p.data = p.data.float()

    def learned_state_keys(self) -> set[str]:
        """Only the LoRA tensors: the base copy is rebuilt from the backbone's VAE."""
        return {k for k in self.state_dict() if ".lora_A." in k or ".lora_B." in k}

    @property
    def condition_requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.lr_encoder.parameters())

    def encode_condition(self, backbone, image01: torch.Tensor) -> torch.Tensor:
        return self.lr_encoder(image01)

    @classmethod
    def validate_config(cls, cfg, error: type[Exception], key: str) -> None:
        from omegaconf import OmegaConf

        check_lora(OmegaConf.select(cfg, f"{key}.rank", default=16),
                   OmegaConf.select(cfg, f"{key}.alpha", default=None), error, key)


def check_lora(rank, alpha, error: type[Exception], key: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise error(f"{key}.rank={rank} must be a positive integer (paper: 16; Tables 7/8: 8 / 16 / 32)")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise error(f"{key}.alpha={alpha} must be > 0 (or null: peft's default 8)")

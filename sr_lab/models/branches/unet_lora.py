"""LoRA on the attention layers of the frozen UNet's decoder, attached only during this stage's forward
(ClearSR paper 003, Sec. 3.1 and App. A: "for UNet, we only use LoRA layers in the attention layer of the
UNet decoder", rank 16; methods.md "ClearSR").

The UNet is shared: a teacher and a student, or a frozen second stage, may run the same UNet object. So
the LoRA weights are owned by this branch (:class:`sr_lab.models.lora.HookedLoRA`: peft's LoRA maths and
initialisation, A Kaiming-uniform, B = 0, scale alpha / rank with peft's default alpha 8) and added by
forward hooks on the UNet's ``to_q/to_k/to_v/to_out.0`` of every self- and cross-attention in
``up_blocks``, which :meth:`attach` registers for one runner forward and the runner removes in a
``finally``. With B = 0 the UNet's output is unchanged at initialisation. Dropping the branch
(``~adapter.branches.unet_lora``) is Table 3's "no UNet LoRA".
"""
from __future__ import annotations

from torch import nn

from sr_lab.models.branches.base import ControlBranch
from sr_lab.models.branches.lora_encoder import check_lora

__all__ = ["UNetDecoderLoRABranch"]


class UNetDecoderLoRABranch(ControlBranch):
    """Hook-attached LoRA on the UNet decoder's attention projections; reads no condition."""

    def __init__(self, unet: nn.Module, rank: int = 16, alpha: float | None = None, seed: int = 0):
        super().__init__("")
        from sr_lab.models.lora import DEFAULT_ALPHA, HookedLoRA, decoder_attention_targets

        self.rank, self.alpha = int(rank), float(DEFAULT_ALPHA if alpha is None else alpha)
        self.lora = HookedLoRA(unet, decoder_attention_targets(unet), rank=self.rank, alpha=self.alpha,
                               seed=int(seed))

    @property
    def condition_keys(self) -> tuple[str, ...]:
        return ()

    def condition(self, backbone, lr01, hr_size) -> dict:
        return {}

    def refine(self, backbone, cond, x0_hat, w, space="latent") -> dict:
        return cond

    def attach(self, unet, x, t, context, cond) -> list:
        return self.lora.attach(unet)

    @classmethod
    def validate_config(cls, cfg, error: type[Exception], key: str) -> None:
        from omegaconf import OmegaConf

        check_lora(OmegaConf.select(cfg, f"{key}.rank", default=16),
                   OmegaConf.select(cfg, f"{key}.alpha", default=None), error, key)

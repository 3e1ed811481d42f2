"""ClearSR's image prompt: the CLIP image embedding of the LR replaces the null-text context in the UNet
decoder's cross-attention (ClearSR paper 003, Sec. 3.1: "we let the LR image pass through the CLIP image
encoder to obtain the image-level feature p and replace the null-text prompt in the UNet decoder", as in
PASD and CoSeR; methods.md "ClearSR").

* The condition (``cond["image_context"]``, :data:`~sr_lab.models.stage_inputs.IMAGE_CONTEXT_KEY`) is the
  frozen open_clip visual tower's image embedding of the LR (:class:`sr_lab.models.clip_image.ClipImageEncoder`;
  default OpenCLIP ViT-H/14, whose text half is SD 2.1's text tower — see that module for why and where the
  weights go; a random tiny CLIP on the ``tiny`` backbone). It is computed without gradient and, being
  one vector per image, passes unchanged through classifier-free guidance, tiles and seed batching.
* A trainable projection maps it to ``tokens`` context tokens of the UNet's cross-attention width: Linear
  + LayerNorm, IP-Adapter's image-prompt projection (Ye et al. 2023, 4 tokens by default; the paper does not
  say how p is shaped, so ``tokens`` is a key).
* :meth:`attach` registers forward pre-hooks on the transformer blocks of the UNet's ``up_blocks`` (the
  decoder) that swap their ``encoder_hidden_states`` for the projected tokens, for one runner forward. The
  UNet's down and middle blocks and every control branch keep the stage's text context (the null prompt).
  The projection is not zero-initialised, so unlike the other ClearSR parts this one changes the frozen
  UNet's output from the first step (the intended replacement).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from sr_lab.models.branches.base import ControlBranch
from sr_lab.models.stage_inputs import IMAGE_CONTEXT_KEY

__all__ = ["ImagePromptBranch", "decoder_transformers"]


def decoder_transformers(unet: nn.Module) -> list[str]:
    """Names of the cross-attention transformer models (Transformer2DModel) in the UNet's up blocks."""
    out = []
    for i, block in enumerate(unet.up_blocks):
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            out.append(f"up_blocks.{i}.attentions.{j}")
    return out


class ImagePromptBranch(ControlBranch):
    """CLIP image embedding of the LR -> projected tokens -> the UNet decoder's cross-attention context."""

    def __init__(self, unet: nn.Module, model: str = "ViT-H-14", weights: str | None = None, tokens: int = 4,
                 tiny: bool = False, allow_random_init: bool = False, seed: int = 0,
                 cond_key: str = IMAGE_CONTEXT_KEY):
        super().__init__(cond_key)
        from sr_lab.models.clip_image import ClipImageEncoder

        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"image prompt tokens={tokens} must be a positive integer")
        self.clip = ClipImageEncoder(model=model, weights=weights, tiny=tiny,
                                     allow_random_init=allow_random_init, seed=int(seed))
        width = int(unet.config.cross_attention_dim)
        self.tokens, self.width = int(tokens), width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 2)
            self.proj = nn.Linear(int(self.clip.embed_dim), self.tokens * width)
            self.norm = nn.LayerNorm(width)
        self.targets = decoder_transformers(unet)
        if not self.targets:
            raise ValueError("the UNet has no cross-attention in its up blocks: nothing takes an image prompt")

    def learned_state_keys(self) -> set[str]:
        """The projection only: the CLIP tower is rebuilt from its weights file (or seed)."""
        return {k for k in self.state_dict() if not k.startswith("clip.")}

    def condition(self, backbone, lr01: torch.Tensor, hr_size) -> dict:
        with torch.no_grad():
            return {self.cond_key: self.clip(lr01)}

    def refine(self, backbone, cond, x0_hat, w, space="latent") -> dict:
        return cond  # the image prompt always describes the LR

    def prompt_tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, D_clip) -> (B, tokens, cross-attention width)."""
        dtype = self.proj.weight.dtype
        return self.norm(self.proj(embedding.to(dtype)).view(-1, self.tokens, self.width))

    @staticmethod
    def _swap(context: torch.Tensor, module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = context
        return args, kwargs

    def attach(self, unet, x, t, context, cond) -> list:
        tokens = self.prompt_tokens(cond[self.cond_key]).to(unet.dtype)
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"image prompt: {tokens.shape[0]} embeddings for a batch of {x.shape[0]}")
        handles = []
        try:
            for name in self.targets:
                handles.append(unet.get_submodule(name).register_forward_pre_hook(
                    partial(self._swap, tokens), with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    @classmethod
    def validate_config(cls, cfg, error: type[Exception], key: str) -> None:
        from omegaconf import OmegaConf

        from sr_lab.config.validation import declared
        from sr_lab.models.clip_image import ClipImageEncoder

        tokens = OmegaConf.select(cfg, f"{key}.tokens", default=4)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise error(f"{key}.tokens={tokens} must be a positive integer")
        toy_backbone = bool(declared(cfg, "backbone", "toy", False))
        ClipImageEncoder.validate_config(OmegaConf.select(cfg, key), error, key, random_backbone=toy_backbone)

"""Prompt encoders: tokenizer + CLIP text tower, returning the cross-attention context.

SD 2.x conditions on OpenCLIP ViT-H's penultimate layer followed by the final layer norm; diffusers'
converted ``text_encoder`` (a ``transformers.CLIPTextModel`` with 23 layers) returns exactly that as
``last_hidden_state`` (methods.md, Backbones). The ``tiny`` backbone pairs open_clip's tokenizer, which
ships its BPE vocabulary, with a small randomly initialised ``CLIPTextModel``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """``encode(prompts) -> (B, L, D)`` cross-attention context; frozen."""

    def __init__(self, tokenize: Callable[[Sequence[str]], torch.Tensor], text_model: nn.Module):
        super().__init__()
        self._tokenize = tokenize
        self.text_model = text_model

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        ids = self._tokenize(list(prompts)).to(device)
        return self.text_model(input_ids=ids).last_hidden_state


def open_clip_tokenizer(context_length: int = 77) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's SimpleTokenizer (vocabulary shipped in the wheel, no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    return lambda prompts: tok(list(prompts), context_length=context_length)


def hf_clip_tokenizer(path: str, **kwargs) -> Callable[[Sequence[str]], torch.Tensor]:
    """The ``tokenizer`` subfolder of a diffusers SD checkpoint, padded to its max length."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)

    def tokenize(prompts: Sequence[str]) -> torch.Tensor:
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids

    return tokenize

"""Per-sample prompts (config group ``prompt``), called when a stage builds its condition.

A prompt source is ``source(lr01, hr01=None) -> list[str]``, one prompt per batch row. StableSR and CCSR
use the empty prompt (``prompt=none``); ``prompt=fixed`` gives every row the same text; tag extractors
plug in as further options: ``prompt=clip_tags`` (:class:`sr_lab.models.tagging.ClipTags`, AddSR's tag
prompts: CLIP zero-shot tags of the LR for the student, ``prompt.image=hr`` for the teacher).
:meth:`sr_lab.models.backbone.Backbone.prompt_embedding` embeds the list (each distinct string once,
cached).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["FixedPrompt", "PromptSource", "as_prompt_source", "prompt_rows"]

PromptSource = Callable[..., list[str]]


class FixedPrompt:
    """The same ``text`` for every row (``""``: the empty prompt of StableSR / CCSR)."""

    def __init__(self, text: str = ""):
        if not isinstance(text, str):
            raise ValueError(f"prompt.text={text!r} must be a string")
        self.text = text

    def __call__(self, lr01: torch.Tensor, hr01: torch.Tensor | None = None) -> list[str]:
        return [self.text] * int(lr01.shape[0])

    def __repr__(self) -> str:
        return f"FixedPrompt({self.text!r})"


def as_prompt_source(prompt: str | PromptSource | None) -> PromptSource:
    """A string (or None = empty) becomes :class:`FixedPrompt`; a callable is kept."""
    if prompt is None or isinstance(prompt, str):
        return FixedPrompt(prompt or "")
    if not callable(prompt):
        raise TypeError(f"prompt {prompt!r} is neither a string nor a prompt source")
    return prompt


def prompt_rows(prompts: str | Sequence[str], batch: int) -> list[str]:
    """One prompt per row: a single string is repeated; a list must have ``batch`` entries."""
    if isinstance(prompts, str):
        return [prompts] * batch
    rows = [str(p) for p in prompts]
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} prompts for a batch of {batch}")
    return rows

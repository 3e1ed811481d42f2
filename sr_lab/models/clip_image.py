"""The frozen CLIP image encoder that gives ClearSR its image prompt.

ClearSR (Sec. 3.1), like PASD and CoSeR, "let[s] the LR image pass through the CLIP image encoder to obtain
the image-level feature p and replace the null-text prompt in the UNet decoder". :class:`ClipImageEncoder`
is that encoder: ``ClipImageEncoder(...)(lr01) -> (B, embed_dim)``, the raw (not L2-normalised) float32
image embedding of open_clip's ``encode_image``; how it is laid out as cross-attention context is the
caller's business.

Which model and why: by default OpenCLIP **ViT-H/14** trained on LAION-2B
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; its ``open_clip_model.safetensors`` placed in
``$SR_LAB_WEIGHTS/ViT-H-14/``)::

    huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_model.safetensors \\
        --local-dir $SR_LAB_WEIGHTS/ViT-H-14

Stable Diffusion 2.1's text encoder *is* the text half of that same OpenCLIP ViT-H/14, so the 1024-d image
embedding lives in the joint image-text space SD 2.1's cross-attention conditioning was trained against
(and has its width, 1024). ``tiny=True`` builds the ~1.7M-parameter :data:`~sr_lab.models.open_clip_models.TINY_CLIP`
(32-d embedding; random, unless ``weights`` names a file), for the ``tiny`` backbone of tests and smoke
runs; ``allow_random_init=True`` keeps a seeded random ``model`` when its weights are missing (smoke runs
only: the image prompt then means nothing).

Weights come from LOCAL files only (nothing is downloaded; the search is that of
:mod:`sr_lab.models.open_clip_models`: ``weights`` a file or a folder, else ``$SR_LAB_WEIGHTS`` and the
torch hub cache, ``<dir>/<model>/open_clip_model.safetensors`` first). Missing weights raise
:class:`~sr_lab.utils.weights.MissingWeights` naming the file and the folder, at construction;
:meth:`ClipImageEncoder.validate_config` checks a config node before anything is built.

Only the visual tower is kept (submodule ``visual``; the text tower is dropped to save memory). It is frozen
(``requires_grad`` False) and stays in eval mode whatever ``train()`` is called with. Being a submodule,
it follows ``.to(device)`` of its holder and appears in the holder's ``state_dict``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sr_lab.models.open_clip_models import (
    TINY_CLIP,
    build_open_clip,
    check_open_clip_weights,
    check_smoke_flags,
    clip_preprocess,
    node_get,
    preprocess_cfg,
)
from sr_lab.utils.weights import MissingWeights

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "ClipImageEncoder"]

#: OpenCLIP ViT-H/14 (LAION-2B): the image half of SD 2.1's text encoder.
DEFAULT_MODEL = "ViT-H-14"
_WHAT = "CLIP image encoder"


class ClipImageEncoder(nn.Module):
    """Frozen open_clip visual tower: ``(B, 3, H, W)`` images in [0, 1] -> ``(B, embed_dim)`` float32.

    Args:
        model: an open_clip architecture name (default ``ViT-H-14``, see the module docstring).
        weights: the local weight file (or a folder holding it); ``None``: searched.
        tiny: the tiny CLIP (:data:`TINY_CLIP`) for fast CPU tests; random unless ``weights``.
        allow_random_init: keep a seeded random model when the weights are missing (smoke runs only).
        seed: the seed of a random initialisation.
        key: the config key named in messages (e.g. ``adapter.branches.image_prompt.clip``).

    Preprocessing is that of :class:`~sr_lab.models.tagging.ClipTags`: the short side resized (bicubic,
    antialiased) to the input size, centre crop, CLIP mean/std.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | None = None, tiny: bool = False,
                 allow_random_init: bool = False, seed: int = 0, *, key: str = "clip"):
        super().__init__()
        self.model_name = "tiny" if tiny else str(model)
        net, self.weights_path = build_open_clip(
            self.model_name, weights, tiny=tiny, allow_random_init=allow_random_init, seed=seed, what=_WHAT,
            key=key, owner="ClipImageEncoder", random_note=": the image prompt means nothing", logger=log)
        self.random_weights = self.weights_path is None
        self.image_size, mean, std = preprocess_cfg(net)
        visual = net.visual
        del net  # the text tower, token embedding and logit scale go
        out = getattr(visual, "output_dim", None)
        if out is None:
            import open_clip

            cfg = TINY_CLIP if tiny else (open_clip.get_model_config(self.model_name) or {})
            out = cfg["embed_dim"]
        self.embed_dim = int(out)
        visual.requires_grad_(False)
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> ClipImageEncoder:
        """Always eval: the encoder is frozen (``mode`` is ignored)."""
        return super().train(False)

    def preprocess(self, img01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the visual tower's float32 input (resize short side, centre crop, mean/std)."""
        return clip_preprocess(img01, self.image_size, self.mean, self.std)

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        if img01.ndim != 4 or img01.shape[1] != 3:
            raise ValueError(f"ClipImageEncoder expects images (B, 3, H, W) in [0, 1], got {tuple(img01.shape)}")
        if self.visual.training:
            self.visual.eval()
        param = next(self.visual.parameters())
        with torch.no_grad(), torch.autocast(param.device.type, enabled=False):
            pixels = self.preprocess(img01.to(device=param.device))
            feats = self.visual(pixels.to(dtype=param.dtype))
        return feats.float()

    @classmethod
    def validate_config(cls, node: Any, error: type[Exception], key: str, random_backbone: bool = False) -> None:
        """Check the encoder's config node (``model``, ``weights``, ``tiny``, ``allow_random_init``; a
        DictConfig, a dict or ``None``) at ``key`` before anything is built; raise ``error`` with one line.
        ``tiny`` / ``allow_random_init`` are accepted only when ``random_backbone`` (the backbone is a random
        smoke-run backbone, e.g. ``tiny``); missing weights are reported with the file and the folder."""
        check_smoke_flags(node, error, key, random_backbone, str(node_get(node, "model", DEFAULT_MODEL)))
        try:
            check_open_clip_weights(node, key=key, what=_WHAT, default_model=DEFAULT_MODEL)
        except (MissingWeights, ValueError) as exc:
            raise error(f"{key}: {exc}") from None

    def extra_repr(self) -> str:
        return (f"model={self.model_name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
                f"random_weights={self.random_weights}")

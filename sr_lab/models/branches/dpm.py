"""ClearSR's Detail Preserving Module (DPM): a ControlNet with window cross-attention to the LR latent
(ClearSR paper 003, Sec. 3.2 "Detail Preserving Module", Eq. 2, Fig. 3; methods.md "ClearSR").

The branch is :class:`~sr_lab.models.branches.controlnet.ControlNetBranch` (a trainable copy of the UNet
encoder, diffusers ``ControlNetModel.from_unet``, fed the LR latent ``x_lr``) plus one
:class:`~sr_lab.models.window_attention.WindowCrossAttention` per transformer block of the ControlNet
(down blocks and middle block): queries from the block's features in S×S windows, keys/values from
``x_lr`` in the matching windows, ``softmax(QKᵀ/√d + B)V`` with a learned relative position bias B,
output projection zero-initialised (so at initialisation the DPM is exactly a ControlNet, whose zero
convolutions make it exactly the frozen UNet).

Where the layer sits. The paper places it "after the text cross-attention". diffusers' transformer block
computes ``h ← h + attn2(norm2(h), text)``; sr_lab attaches the window attention with a forward hook on
``attn2`` for the duration of the branch's forward (no diffusers code is copied, the hook is removed in a
``finally``): the hook returns ``attn2_out + WCA(norm2(h) + attn2_out, x_lr)``, so the block computes
``h ← h + attn2(norm2 h) + WCA(·)`` — the window attention sees the features after the text
cross-attention (its own LayerNorm on the queries) and adds its output to the same residual stream.

Which region a window covers (``kv_mode``, the paper is silent):

* ``window`` (default): keys/values come from ``x_lr`` at its own (latent) resolution and the key window
  is the query window scaled by the level's downsampling ``r = 2^level`` (s = S·r), so both cover the same
  image region and no LR detail is averaged away before the attention;
* ``resize``: ``x_lr`` is area-resized to the level's size and s = S.

``window_size`` (paper: 16; Table 6 ablates 8 / 16 / 32) is in feature pixels of each level; at levels
smaller than the window the window is the whole map (logged once); ``window_size: null`` is global
cross-attention without position bias (Table 2 "DPM w/o window partition"); ``window_attention: false``
drops the layers (Table 2 "DPM w/o cross-attn layers": a plain ControlNet on the LoRA'd LR latent).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from sr_lab.models.branches.controlnet import ControlNetBranch

__all__ = ["DPMBranch", "transformer_block_levels", "level_size"]


def transformer_block_levels(controlnet: nn.Module) -> list[tuple[str, int]]:
    """(name, level) of every transformer block of a diffusers ControlNet (down blocks, then the middle
    block at the lowest level); level = number of downsamplings above the block."""
    out: list[tuple[str, int]] = []
    n_levels = len(controlnet.down_blocks)
    for name, module in controlnet.named_modules():
        if not (hasattr(module, "attn2") and getattr(module, "attn2", None) is not None):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            out.append((name, int(parts[1])))
        elif parts[0] == "mid_block":
            out.append((name, n_levels - 1))
    return out


def level_size(h: int, w: int, level: int) -> tuple[int, int]:
    """Feature size at ``level`` for a latent of (h, w): diffusers' stride-2 convs (padding 1) round up."""
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class DPMBranch(ControlNetBranch):
    """ControlNet + window cross-attention to ``cond[cond_key]`` in every transformer block (module doc)."""

    def __init__(self, unet: nn.Module, latent_channels: int = 4, embedding_channels: int = 64,
                 conditioning_scale: float = 1.0, seed: int = 0, cond_key: str = "lr_latent",
                 window_attention: bool = True, window_size: int | None = 16, kv_mode: str = "window",
                 heads: int | None = None):
        super().__init__(unet, latent_channels=latent_channels, embedding_channels=embedding_channels,
                         conditioning_scale=conditioning_scale, seed=seed, cond_key=cond_key)
        from sr_lab.models.window_attention import WindowCrossAttention

        check_window_size(window_size, ValueError, "window_size")
        self.window_size = None if window_size is None else int(window_size)
        self.kv_mode = str(kv_mode)
        self._levels: dict[str, int] = {}
        self.window_attn = nn.ModuleDict()
        if not window_attention:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            for name, level in transformer_block_levels(self.controlnet):
                attn2 = self.controlnet.get_submodule(name).attn2
                dim = int(attn2.to_q.in_features)
                n_heads = int(attn2.heads if heads is None else heads)
                key = name.replace(".", "__")
                self.window_attn[key] = WindowCrossAttention(
                    dim, int(latent_channels), n_heads, window_size=self.window_size, ratio=2 ** level,
                    kv_mode=self.kv_mode)
                self._levels[key] = level

    def _hook(self, key: str, x_lr: torch.Tensor, latent_hw: tuple[int, int], module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        hw = level_size(*latent_hw, self._levels[key])
        wca = self.window_attn[key]
        return output + wca(hidden + output, hw, x_lr).to(output.dtype)

    def residuals(self, unet, x, t, context, cond):
        if not len(self.window_attn):
            return super().residuals(unet, x, t, context, cond)
        x_lr = cond[self.cond_key]
        handles = []
        try:
            for key in self.window_attn:
                attn2 = self.controlnet.get_submodule(key.replace("__", ".")).attn2
                handles.append(attn2.register_forward_hook(
                    partial(self._hook, key, x_lr, tuple(x.shape[-2:])), with_kwargs=True))
            return super().residuals(unet, x, t, context, cond)
        finally:
            for h in handles:
                h.remove()

    @classmethod
    def validate_config(cls, cfg, error: type[Exception], key: str) -> None:
        from omegaconf import OmegaConf

        check_window_size(OmegaConf.select(cfg, f"{key}.window_size", default=16), error, f"{key}.window_size")
        heads = OmegaConf.select(cfg, f"{key}.heads", default=None)
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise error(f"{key}.heads={heads} must be a positive integer dividing each block's width, or null "
                        f"(the block's text cross-attention heads)")
        mode = OmegaConf.select(cfg, f"{key}.kv_mode", default="window")
        if mode not in ("window", "resize"):
            raise error(f"{key}.kv_mode={mode} must be 'window' or 'resize'")


def check_window_size(value, error: type[Exception], key: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise error(f"{key}={value} must be a positive integer (paper: 16; Table 6: 8 / 16 / 32) or null "
                    f"(global cross-attention, no window partition)")

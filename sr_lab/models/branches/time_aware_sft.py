"""StableSR's time-aware encoder + SFT modulation of a frozen SD UNet (StableSR paper 001, Sec. 3.1).

* **Time-aware encoder** (Sec. 3.1 "Time-aware Guidance", App. A Table 7): the contracting path of a
  UNet with fewer channels and its *own* timestep embedding, run on the VAE latent of the
  bicubic-upsampled LR (4 channels). It returns one feature map per UNet resolution: the output of
  each level's last block (before its downsampling) and, for the lowest level, the middle block; each
  is mapped to ``out_channels`` by a time-conditioned ResBlock (authors' ``fea_tran``; the authors'
  ``EncoderUNetModelWT`` in IceClear/StableSR ``ldm/modules/diffusionmodules/openaimodel.py``).
* **SFT** (Eq. 1): every ResBlock of the frozen UNet (down, middle and up blocks) gets its feature map
  modulated as ``F' = (1 + α) ⊙ F + β`` with ``(α, β) = M(F_enc)``, ``M`` a small conv net (a shared
  3×3 conv + ReLU, then one 3×3 conv each for α and β, as the authors' SPADE layer with its hard-coded
  128 hidden channels) of the encoder feature at the block's resolution. The α/β convs are
  zero-initialised, so before training the adapted UNet *is* the frozen UNet (bit for bit).

The SFT layers are attached to the unmodified diffusers ``UNet2DConditionModel`` through forward
hooks that exist only during one runner forward (:meth:`TimeAwareSFTBranch.attach`, removed by
:class:`sr_lab.models.runner.ControlledUNet` (they are removed in a
``finally``), so the same UNet object stays clean for every other user (e.g. a CFG branch without the
adapter, another stage). Not thread-safe: two concurrent forwards on one UNet would see each other's
hooks.

Where F is taken (``position``):

* ``"residual"`` (default, the authors' placement): the residual branch of the ResBlock, i.e. the
  output of its last conv (``ResnetBlock2D.conv2``), before the skip connection is added — the
  authors apply SPADE to ``h`` after ``out_layers`` and then add ``skip_connection(x)``.
* ``"output"``: the ResBlock's output (after the skip addition), the literal reading of Eq. 1.

Deviation from the authors' code: their SPADE first normalises ``h`` with a parameter-free GroupNorm
(``(1 + γ) ⊙ GN(h) + β``), which changes the frozen UNet even at initialisation; sr_lab follows Eq. 1
without the normalisation, which makes zero-initialised SFT an exact identity.

Encoder settings left ``None`` are derived from the UNet so that SD 2.1-base gives Table 7 exactly
and the ``tiny`` backbone gets a proportionally small encoder (:func:`derive_encoder_settings`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.models.branches.base import ControlBranch

__all__ = ["TimeAwareEncoder", "SFTLayer", "TimeAwareSFTBranch", "derive_encoder_settings",
           "unet_resblock_levels"]


def _groups(channels: int, preferred: int = 32) -> int:
    """GroupNorm group count: ``preferred`` (GroupNorm32 as in SD) when it divides, else the gcd."""
    return math.gcd(int(preferred), int(channels))


def derive_encoder_settings(unet_config, **overrides) -> dict:
    """Time-aware encoder settings from the UNet config; ``None`` overrides are derived.

    Rules (SD 2.1-base, block_out_channels 320/640/1280/1280, 2 layers per block, cross-attention in
    the first three down blocks → Table 7: model_channels 256, channel_mult 1,1,2,2, 2 res blocks,
    attention at downsampling factors 4,2,1 i.e. levels 0,1,2, out_channels 256, 4 heads; SFT hidden
    width 128 as the authors' SPADE):

    * ``model_channels`` = 4/5 of the UNet's first width, rounded down to a multiple of 8;
    * ``channel_mult[i]`` = max(1, width_i / (2 · width_0)), one entry per UNet resolution;
    * ``num_res_blocks`` = the UNet's ``layers_per_block``;
    * ``attention_levels`` = the levels whose UNet down block has (cross-)attention;
    * ``out_channels`` = ``model_channels``; ``sft_hidden`` = ``out_channels // 2``; ``num_heads`` = 4.
    """
    widths = [int(c) for c in unet_config.block_out_channels]
    n = len(widths)
    mc = overrides.get("model_channels") or max(8, widths[0] * 4 // 5 // 8 * 8)
    mult = overrides.get("channel_mult") or [max(1, w // (2 * widths[0])) for w in widths]
    if len(mult) != n:
        raise ValueError(f"time_aware_sft: channel_mult has {len(mult)} levels but the UNet has {n} resolutions")
    nrb = overrides.get("num_res_blocks") or int(unet_config.layers_per_block if isinstance(
        unet_config.layers_per_block, int) else unet_config.layers_per_block[0])
    att = overrides.get("attention_levels")
    if att is None:
        att = [i for i, t in enumerate(unet_config.down_block_types) if "Attn" in t]
    out = overrides.get("out_channels") or mc
    hidden = overrides.get("sft_hidden") or max(8, out // 2)
    heads = overrides.get("num_heads") or 4
    return {"model_channels": int(mc), "channel_mult": [int(m) for m in mult], "num_res_blocks": int(nrb),
            "attention_levels": sorted(int(a) for a in att), "out_channels": int(out),
            "sft_hidden": int(hidden), "num_heads": int(heads)}


def unet_resblock_levels(unet: nn.Module) -> list[tuple[str, int]]:
    """``(qualified name, resolution level)`` of every ``ResnetBlock2D`` of a diffusers UNet.

    Level 0 is the full latent resolution. ``down_blocks[i]`` work at level i, the middle block at the
    lowest level, and ``up_blocks[j]`` at level n-1-j (their upsampler comes last).
    """
    from diffusers.models.resnet import ResnetBlock2D

    n = len(unet.config.block_out_channels)
    out = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, ResnetBlock2D):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            level = n - 1
        else:
            raise ValueError(f"time_aware_sft: unexpected ResnetBlock2D at {name}")
        out.append((name, level))
    if not out:
        raise ValueError("time_aware_sft: the UNet has no ResnetBlock2D to modulate")
    return out


class _Level(nn.Module):
    """One encoder resolution: ``num_res_blocks`` × (ResBlock [+ self-attention]) [+ downsample]."""

    def __init__(self, ch_in: int, ch: int, temb: int, n_blocks: int, attention: bool, heads: int,
                 downsample: bool):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(n_blocks):
            cin = ch_in if i == 0 else ch
            self.resnets.append(ResnetBlock2D(in_channels=cin, out_channels=ch, temb_channels=temb,
                                              groups=_groups(cin), groups_out=_groups(ch), eps=1e-5))
            if attention:
                self.attentions.append(Attention(ch, heads=heads, dim_head=ch // heads, norm_num_groups=_groups(ch),
                                                 residual_connection=True, bias=True, upcast_softmax=True,
                                                 eps=1e-5, _from_deprecated_attn_block=True))
        self.downsample = Downsample2D(ch, use_conv=True, out_channels=ch, padding=1) if downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature of this level before downsampling, input of the next level)."""
        for i, res in enumerate(self.resnets):
            h = res(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h)
        return h, (self.downsample(h) if self.downsample is not None else h)


class TimeAwareEncoder(nn.Module):
    """UNet contracting path with its own time embedding (StableSR Table 7; authors' EncoderUNetModelWT).

    ``forward(lr_latent, t)`` returns ``n_levels`` feature maps with ``out_channels`` channels; map
    ``i`` has the spatial size of the UNet's level ``i`` (downsampling is a stride-2 3×3 conv with
    padding 1, as in the SD UNet, so odd tile sizes line up too).
    """

    def __init__(self, in_channels: int = 4, model_channels: int = 256, channel_mult: Sequence[int] = (1, 1, 2, 2),
                 num_res_blocks: int = 2, attention_levels: Sequence[int] = (0, 1, 2), num_heads: int = 4,
                 out_channels: int = 256):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D

        mc = int(model_channels)
        temb = 4 * mc
        self.model_channels = mc
        self.time_proj = Timesteps(mc, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(mc, temb)
        self.conv_in = nn.Conv2d(in_channels, mc, 3, padding=1)
        n = len(channel_mult)
        self.levels = nn.ModuleList()
        chans, ch = [], mc
        for i, m in enumerate(channel_mult):
            level = _Level(ch, mc * int(m), temb, int(num_res_blocks), i in set(attention_levels), int(num_heads),
                           downsample=i < n - 1)
            ch = mc * int(m)
            self.levels.append(level)
            chans.append(ch)
        g = _groups(ch)
        self.mid = nn.ModuleList([
            ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb, groups=g, eps=1e-5),
            Attention(ch, heads=num_heads, dim_head=ch // num_heads, norm_num_groups=g, residual_connection=True,
                      bias=True, upcast_softmax=True, eps=1e-5, _from_deprecated_attn_block=True),
            ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb, groups=g, eps=1e-5)])
        self.feature_out = nn.ModuleList([
            ResnetBlock2D(in_channels=c, out_channels=int(out_channels), temb_channels=temb, groups=_groups(c),
                          groups_out=_groups(out_channels), eps=1e-5) for c in chans])
        self.out_channels = int(out_channels)

    def time_embed(self, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        return self.time_embedding(self.time_proj(t).to(dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        temb = self.time_embed(t, x.shape[0], dtype)
        h = self.conv_in(x.to(dtype))
        feats = []
        for i, level in enumerate(self.levels):
            f, h = level(h, temb)
            if i < len(self.levels) - 1:
                feats.append(f)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        feats.append(self.mid[2](h, temb))
        return [proj(f, temb) for proj, f in zip(self.feature_out, feats)]


class SFTLayer(nn.Module):
    """Eq. 1: F' = (1 + α) ⊙ F + β, (α, β) = M(F_enc); α/β convs zero-initialised (identity at start)."""

    def __init__(self, cond_channels: int, feat_channels: int, hidden: int = 128, kernel_size: int = 3):
        super().__init__()
        p = kernel_size // 2
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, kernel_size, padding=p), nn.ReLU())
        self.alpha = nn.Conv2d(hidden, feat_channels, kernel_size, padding=p)
        self.beta = nn.Conv2d(hidden, feat_channels, kernel_size, padding=p)
        for conv in (self.alpha, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feat: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != feat.shape[-2:]:  # only for sizes the UNet rounds differently
            cond = F.interpolate(cond, size=feat.shape[-2:], mode="nearest")
        a = self.shared(cond.to(self.alpha.weight.dtype))
        out = feat.to(a.dtype) * (1 + self.alpha(a)) + self.beta(a)
        return out.to(feat.dtype)


class TimeAwareSFTBranch(ControlBranch):
    """Branch ``time_aware_sft`` (StableSR stage 1): time-aware encoder + one SFT layer per UNet ResBlock.

    Branch interface (:class:`sr_lab.models.branches.base.ControlBranch`): the condition is the LR latent
    under ``cond_key`` (spatial, so a tiled sampler crops it per tile; the encoder runs inside
    :meth:`attach` on whatever it receives), and :meth:`attach` registers the SFT hooks for one UNet
    evaluation (no residuals). Only the encoder and the SFT layers train.
    """

    def __init__(self, unet: nn.Module, latent_channels: int = 4, model_channels: int | None = None,
                 channel_mult: Sequence[int] | None = None, num_res_blocks: int | None = None,
                 attention_levels: Sequence[int] | None = None, num_heads: int | None = None,
                 out_channels: int | None = None, sft_hidden: int | None = None, position: str = "residual",
                 seed: int = 0, cond_key: str = "lr_latent"):
        super().__init__(cond_key)
        if position not in ("residual", "output"):
            raise ValueError(f"time_aware_sft: position={position!r} must be 'residual' or 'output'")
        self.settings = derive_encoder_settings(
            unet.config, model_channels=model_channels, channel_mult=list(channel_mult) if channel_mult else None,
            num_res_blocks=num_res_blocks, attention_levels=attention_levels, num_heads=num_heads,
            out_channels=out_channels, sft_hidden=sft_hidden)
        s = self.settings
        self.position = position
        self.blocks = unet_resblock_levels(unet)  # names only: the UNet is never a submodule
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = TimeAwareEncoder(int(latent_channels), s["model_channels"], s["channel_mult"],
                                            s["num_res_blocks"], s["attention_levels"], s["num_heads"],
                                            s["out_channels"])
            self.sft = nn.ModuleDict({
                self._key(name): SFTLayer(s["out_channels"], int(unet.get_submodule(name).out_channels),
                                          s["sft_hidden"])
                for name, _ in self.blocks})
        self.requires_grad_(True)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def _hook(self, key: str, cond: torch.Tensor, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return self.sft[key](output, cond)

    def attach_features(self, unet: nn.Module, features: Sequence[torch.Tensor]) -> list:
        """Register the SFT hooks for ``features`` (one per level); returns the handles to remove."""
        handles = []
        try:
            for name, level in self.blocks:
                target = unet.get_submodule(name + ".conv2" if self.position == "residual" else name)
                handles.append(target.register_forward_hook(partial(self._hook, self._key(name), features[level])))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def step_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}  # the SFT layers run inside the UNet's hooks (traced with it)

    def attach(self, unet, x, t, context, cond) -> list:
        return self.attach_features(unet, self.encoder(cond[self.cond_key], t))

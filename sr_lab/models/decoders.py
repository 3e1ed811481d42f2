"""Trainable decoders for the decoder-GAN stages, on top of the frozen backbone's VAE.

Both expose the interface :class:`sr_lab.modules.decoder_gan.DecoderGANFinetune` uses:
``reconstruct(backbone, latent, lr01, w=None) -> image in [-1, 1]`` (with grad), ``last_layer(backbone)``
(the weight the LDM adaptive GAN weight differentiates against, ``None`` if frozen) and
``trainable_parameters()``.

* :class:`CFWDecoder` — StableSR's controllable feature wrapping (paper 001, Sec. 3.2, Eq. 6):
  F_m = F_d + C(F_e, F_d; θ) · w at several decoder scales, F_e the VAE-encoder features of the LR
  input, F_d the frozen decoder's features. Only C trains (w = 1 in training); w ∈ [0, 1] is chosen at
  inference (default 0.5, Table 4). Authors (IceClear/StableSR ``ldm/modules/diffusionmodules/model.py``
  ``Decoder_Mix``/``Fuse_sft_block_RRDB``): fusion after the res blocks of the decoder levels 2 and 1
  (the two middle resolutions of the 4-level SD VAE, i.e. 128 and 256 px for 512 px output), with the
  encoder features taken after the res blocks of the same encoder levels; C = ResBlock(2C→C) on
  [F_e, F_d], ``num_rrdb`` RRDBs (growth 32), ResBlock(C→C). Attached to the unmodified diffusers VAE
  by forward hooks on ``encoder.down_blocks[l].resnets[-1]`` (capture F_e) and
  ``decoder.up_blocks[n-1-l].resnets[-1]`` (replace F_d by F_m), present only during
  :meth:`CFWDecoder.reconstruct`; with w = 0 no hook is attached, so the output is exactly the plain
  VAE decoder's.
* :class:`VAEDecoderFinetune` — CCSR stage 2 (DeFT, paper 000 Sec. 3.3): a trainable copy of the VAE's
  ``post_quant_conv`` + ``decoder`` (the authors finetune exactly these); the backbone's own decoder
  stays frozen and untouched, so a stage-1 pipeline sharing the backbone keeps the original decoder.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CFWDecoder", "FusionBlock", "RRDB", "VAEDecoderFinetune", "lr_for_decoder"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


def lr_for_decoder(lr01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """LR in [0, 1] → bicubic to the output size (if needed) → [-1, 1], the CFW encoder input."""
    if tuple(lr01.shape[-2:]) != tuple(size):
        lr01 = F.interpolate(lr01.float(), size=size, mode="bicubic", align_corners=False)
    return lr01.clamp(0, 1) * 2 - 1


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with a 1×1 projection when the width changes (authors' ``ResBlock``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _DenseBlock(nn.Module):
    """ESRGAN residual dense block: 5 densely connected 3×3 convs, LeakyReLU 0.2, residual scale 0.2."""

    def __init__(self, ch: int, grow: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(ch + i * grow, grow if i < 4 else ch, 3, padding=1) for i in range(5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            y = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(y, 0.2))
        return x + 0.2 * y


class RRDB(nn.Module):
    """Residual-in-residual dense block (ESRGAN): three dense blocks, residual scale 0.2."""

    def __init__(self, ch: int, grow: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*[_DenseBlock(ch, grow) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class FusionBlock(nn.Module):
    """C(F_e, F_d; θ) of Eq. 6; ``forward(F_e, F_d, w) = F_d + w · C(F_e, F_d)``."""

    def __init__(self, channels: int, num_rrdb: int = 2, grow: int = 32):
        super().__init__()
        self.enc1 = _ResBlock(2 * channels, channels)
        self.rrdb = nn.Sequential(*[RRDB(channels, grow) for _ in range(num_rrdb)])
        self.enc3 = _ResBlock(channels, channels)

    def correction(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return self.enc3(self.rrdb(self.enc1(torch.cat([enc.to(dec.dtype), dec], 1))))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        return dec + self.correction(enc, dec) * w


class CFWDecoder(nn.Module):
    """StableSR CFW (Eq. 6) on the frozen backbone VAE; only the fusion blocks are parameters.

    Args:
        backbone: the frozen backbone (only read to size the fusion blocks; never stored).
        levels: VAE resolution levels to fuse at (0 = full resolution, n-1 = the latent's). Authors: the
            two middle levels of the 4-level SD VAE, ``[1, 2]``.
        num_rrdb, grow_channels: RRDBs per fusion block (authors: 2) and their growth (32).
        w: fusion weight at inference / validation (default 0.5, StableSR Table 4).
        train_w: fusion weight during training (authors: 1).
    """

    def __init__(self, backbone: nn.Module, levels: Sequence[int] = (1, 2), num_rrdb: int = 2,
                 grow_channels: int = 32, w: float = 0.5, train_w: float = 1.0, seed: int = 0):
        super().__init__()
        chans = [int(c) for c in backbone.vae.config.block_out_channels]
        n = len(chans)
        self.levels = sorted({int(level) for level in levels})
        if not self.levels or any(not 0 <= level < n for level in self.levels):
            raise ValueError(f"cfw levels={list(levels)} must be VAE levels in [0, {n})")
        for name, v in (("w", w), ("train_w", train_w)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"cfw {name}={v} must be in [0, 1]")
        self.n_levels = n
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fusion = nn.ModuleDict({str(level): FusionBlock(chans[level], int(num_rrdb), int(grow_channels))
                                         for level in self.levels})
        self.w, self.train_w = float(w), float(train_w)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters())

    def last_layer(self, backbone: nn.Module) -> torch.Tensor | None:
        return None  # the decoder's conv_out is frozen: the authors' λ falls back to the fixed weight

    # -- hooks -------------------------------------------------------------------------------------
    def encoder_features(self, backbone: nn.Module, lr01: torch.Tensor,
                         size: tuple[int, int]) -> dict[int, torch.Tensor]:
        """F_e: the frozen VAE encoder's features of the LR (after each fused level's res blocks)."""
        vae, feats, handles = backbone.vae, {}, []

        def grab(level, module, args, output):
            feats[level] = output

        try:
            for level in self.levels:
                handles.append(vae.encoder.down_blocks[level].resnets[-1].register_forward_hook(partial(grab, level)))
            with torch.no_grad():
                vae.encoder(lr_for_decoder(lr01, size).to(vae.dtype))
        finally:
            for h in handles:
                h.remove()
        return feats

    def _fuse_hook(self, level: int, enc: torch.Tensor, w: float, module, args, output):
        return self.fusion[str(level)](enc, output, w)

    def reconstruct(self, backbone: nn.Module, latent: torch.Tensor, lr01: torch.Tensor | None,
                    w: float | None = None) -> torch.Tensor:
        """Decode the (scaled) latent with fusion weight ``w`` (default: ``self.w``) → [-1, 1]."""
        w = self.w if w is None else float(w)
        vae = backbone.vae
        z = latent.to(vae.dtype) / backbone.latent_scale
        if w == 0.0:
            return vae.decode(z).sample.float()
        if lr01 is None:
            raise ValueError("CFW needs the LR image (decode_latent(latent, lr01)) when w > 0")
        size = (latent.shape[-2] * backbone.vae_factor, latent.shape[-1] * backbone.vae_factor)
        feats = self.encoder_features(backbone, lr01, size)
        handles = []
        try:
            for level in self.levels:
                block = vae.decoder.up_blocks[self.n_levels - 1 - level].resnets[-1]
                handles.append(block.register_forward_hook(partial(self._fuse_hook, level, feats[level], w)))
            return vae.decode(z).sample.float()
        finally:
            for h in handles:
                h.remove()


class VAEDecoderFinetune(nn.Module):
    """CCSR stage 2: trainable copies of the backbone VAE's ``post_quant_conv`` and ``decoder``."""

    def __init__(self, backbone: nn.Module, dtype: str = "float32"):
        super().__init__()
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.post_quant_conv = copy.deepcopy(backbone.vae.post_quant_conv).to(dt)
        self.decoder = copy.deepcopy(backbone.vae.decoder).to(dt)
        self.requires_grad_(True)
        self.decoder.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def last_layer(self, backbone: nn.Module) -> torch.Tensor | None:
        return self.decoder.conv_out.weight

    def reconstruct(self, backbone: nn.Module, latent: torch.Tensor, lr01: torch.Tensor | None = None,
                    w: float | None = None) -> torch.Tensor:
        z = latent.to(self.decoder.conv_in.weight.dtype) / backbone.latent_scale
        return self.decoder(self.post_quant_conv(z)).float()

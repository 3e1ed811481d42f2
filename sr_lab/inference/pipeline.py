"""Method-agnostic SR inference: LR of any size -> exactly ``upscale`` x SR, for N seeds.

:class:`SRPipeline` works with every stage that follows the stage protocol (``backbone``,
``denoise(x, t, cond)``, ``prepare(lr01, hr_size, prompts=…, negative_prompts=…)``,
``decode_latent(latent, lr01)``, optionally ``start``: the start mode it was validated with)
and every sampler ``sample(model, noise, cond, alphas_cumprod, *, generator, **knobs)``:

1. bicubic-upsample the LR by ``upscale``; reflect-pad right/bottom to a multiple of the VAE factor;
2. build the condition with ``stage.prepare`` (:mod:`sr_lab.models.stage_inputs`; VAE encodes tiled for large images, see
   :mod:`sr_lab.inference.tiling`); with CFG also the negative prompt's context;
3. draw x_T per seed (:func:`sr_lab.models.stage_inputs.start_latent`; default: the stage's own start
   mode) — ``start="noise"``: N(0, I); ``start="lr"``: the LR latent noised to t = T−1
   with that noise (what the StableSR authors' scripts do, methods.md);
4. run the sampler on the (optionally CFG-guided, StableSR Eq. 8, and tile-aggregated, StableSR
   Eq. 7 / Alg. 1) denoiser;
5. decode with the decoder stage if given (StableSR CFW with fidelity ``w``, CCSR stage-2 decoder),
   else with the stage's ``decode_latent``; tiled for large images;
6. crop the padding, colour-correct against the LR (StableSR Eq. 2 / Eq. 3-5), clamp to [0, 1].

Seeds: every output row has its own generator ``make_generator(seed, "infer")`` (drawing x_T and then
all of the sampler's noise for that row through :func:`sr_lab.diffusion.schedule.randn_like`), so a
seed gives the same image whether it runs alone, batched with other seeds (``seed_batch``) or batched
with other images of the same size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sr_lab.diffusion.guidance import classifier_free_guidance
from sr_lab.diffusion.samplers import sampler_timesteps
from sr_lab.inference.color_fix import METHODS as COLOR_FIX_METHODS
from sr_lab.inference.color_fix import color_fix as apply_color_fix
from sr_lab.inference.tiling import TiledModel, tiled_decode, tiled_vae_encode
from sr_lab.models.stage_inputs import lr_start_latent, repeat_rows, start_latent
from sr_lab.utils.seeding import make_generator

STARTS = ("noise", "lr")
PRECISIONS = ("32", "bf16")


@dataclass
class TileSettings:
    """Aggregation sampling tiles in latent pixels (authors: 64 latent = 512 px, overlap 32)."""
    enabled: bool = True
    size: int = 64
    overlap: int = 32
    batch: int = 4          # tiles per model call


@dataclass
class VAETileSettings:
    """VAE encode/decode tiles in image pixels (multiples of the VAE factor)."""
    enabled: bool = True
    size: int = 1024
    overlap: int = 128


class GeneratorRows(list):
    """One ``torch.Generator`` per batch row (a list, as :func:`randn_like` accepts), with ``device``."""

    @property
    def device(self) -> torch.device:
        return self[0].device


def seed_generators(seeds: Sequence[int], rows_per_seed: int, device: torch.device | str) -> GeneratorRows:
    """Generators for a batch laid out seed-major: ``rows_per_seed`` rows per seed, each row seeded
    with ``make_generator(seed, "infer")`` — identical streams for a seed however it is batched."""
    return GeneratorRows(make_generator(int(s), "infer", device=device) for s in seeds for _ in range(rows_per_seed))


class _StepCounter:
    """Wraps a model to report every denoiser call (= one sampler step of all rows) to ``on_call``."""

    def __init__(self, model: Callable, on_call: Callable[[], None]):
        self.model, self.on_call = model, on_call

    def __call__(self, x, t, cond):
        out = self.model(x, t, cond)
        self.on_call()
        return out


class SRPipeline:
    """``pipe(lr01 (B, 3, h, w), seeds) -> (len(seeds), B, 3, h·upscale, w·upscale)`` in [0, 1] (CPU).

    Args:
        stage: denoising stage (stage protocol; e.g. from :func:`sr_lab.inference.stage.load_stage`).
        sampler: ``sample(model, noise, cond, alphas_cumprod, *, generator)`` (knobs bound).
        decoder_stage: optional stage whose ``decode_latent`` replaces the denoising stage's.
        decoder_w: sets ``decoder_stage.w`` (StableSR CFW fidelity, Eq. 6) when it has that attribute.
        upscale: SR factor (integer).
        start: ``"noise"`` or ``"lr"`` (LR latent noised to t = T-1 with the seed's first noise).
        cfg_scale, negative_prompt: classifier-free guidance (StableSR Eq. 8); 1 = off.
        prompt: the positive prompt; None = the stage's own (StableSR / CCSR: empty).
        color_fix: none | adain | wavelet; wavelet_levels: l of StableSR Eq. 3.
        tile, vae_tile: :class:`TileSettings`, :class:`VAETileSettings`.
        precision: "32" or "bf16" (autocast).
        speed: speed switches (:class:`sr_lab.models.speed.SpeedConfig` or its keys) applied to the stage (and,
            without compiling, the decoder stage) here, for ``precision``; ``None`` (default): none, the stage
            is used as it is. :attr:`speed_report` says what changed.
        seed_batch: seeds per sampling call (None = all at once).
        progress: ``False``; ``True`` / ``"bar"`` / ``"log"``: progress of each call (total: images ×
            seeds × model calls, :mod:`sr_lab.inference.progress`); or an
            :class:`~sr_lab.inference.progress.InferenceProgress` shared across calls (``sr-infer``).
    """

    def __init__(self, stage, sampler: Callable, *, decoder_stage=None, decoder_w: float | None = None,
                 upscale: int = 4, start: str | None = None, cfg_scale: float = 1.0, negative_prompt: str = "",
                 prompt: str | None = None, color_fix: str = "none", wavelet_levels: int = 5,
                 tile: TileSettings | None = None, vae_tile: VAETileSettings | None = None,
                 precision: str = "32", seed_batch: int | None = None, progress=False, speed=None):
        if start is not None and start not in STARTS:
            raise ValueError(f"start={start!r} must be one of {STARTS} (or None: the stage's own)")
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix={color_fix!r} must be one of {COLOR_FIX_METHODS}")
        if str(precision) not in PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
        if int(upscale) < 1:
            raise ValueError(f"upscale={upscale} must be a positive integer")
        if seed_batch is not None and int(seed_batch) < 1:
            raise ValueError(f"seed_batch={seed_batch} must be >= 1 or None")
        self.stage, self.sampler, self.decoder_stage = stage, sampler, decoder_stage
        if decoder_stage is not None and decoder_w is not None and hasattr(decoder_stage, "w"):
            decoder_stage.w = float(decoder_w)
        self.upscale, self.start = int(upscale), start
        self.cfg_scale, self.negative_prompt, self.prompt = float(cfg_scale), str(negative_prompt), prompt
        self.color_fix, self.wavelet_levels = color_fix, int(wavelet_levels)
        self.tile = tile or TileSettings()
        self.vae_tile = vae_tile or VAETileSettings()
        self.precision, self.seed_batch, self.progress = str(precision), seed_batch, progress
        self.speed = self.speed_report = None
        if speed is not None:
            from dataclasses import replace

            from sr_lab.models.speed import SpeedConfig, apply_speed

            self.speed = SpeedConfig.from_config(speed)
            self.speed_report = apply_speed(stage, self.speed, precision=self.precision)
            if decoder_stage is not None and decoder_stage is not stage:
                apply_speed(decoder_stage, replace(self.speed, compile=False), precision=self.precision)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def start_mode(self) -> str:
        """The chosen start, else the one the stage was validated with (StableSR: ``lr``), else noise."""
        return self.start or str(getattr(self.stage, "start", None) or "noise")

    def model_calls(self) -> int:
        """Denoiser evaluations per image and seed (the sampler's timestep list; ×2 rows under CFG,
        ×tiles under aggregation sampling)."""
        return len(sampler_timesteps(self.sampler, self.backbone.num_timesteps))

    @property
    def backbone(self):
        return self.stage.backbone

    @property
    def device(self) -> torch.device:
        return self.backbone.alphas_cumprod.device

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _vae_tiles_needed(self, height: int, width: int) -> bool:
        return self.vae_tile.enabled and (height > self.vae_tile.size or width > self.vae_tile.size)

    def _encode_context(self, height: int, width: int):
        if self._vae_tiles_needed(height, width):
            return tiled_vae_encode(self.backbone, self.vae_tile.size, self.vae_tile.overlap)
        return contextlib.nullcontext()

    def prepare_lr(self, lr01: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Bicubic-upsample by ``upscale`` and pad (reflect; replicate if too small) right/bottom to a
        multiple of the VAE factor. Returns (padded upsampled LR, (H, W) before padding)."""
        h, w = lr01.shape[-2:]
        size = (h * self.upscale, w * self.upscale)
        up = lr01 if self.upscale == 1 else F.interpolate(lr01, size=size, mode="bicubic", align_corners=False)
        up = up.clamp(0, 1)
        f = int(self.backbone.vae_factor)
        ph, pw = (-size[0]) % f, (-size[1]) % f
        if ph or pw:
            mode = "reflect" if ph < size[0] and pw < size[1] else "replicate"
            up = F.pad(up, (0, pw, 0, ph), mode=mode)
        return up, size

    def _model(self, reporter, latent: torch.Tensor | None = None) -> Callable:
        model = classifier_free_guidance(self.stage.denoise, self.cfg_scale)
        if self.tile.enabled:
            static = self.speed is not None and self.speed.compile  # one tile-batch shape: compiled once
            model = TiledModel(model, self.tile.size, self.tile.overlap, self.tile.batch, static_batch=static)
            if latent is not None:  # tile layout and weights on the device before the sampler's loop
                model.layout(latent.shape[-2], latent.shape[-1], latent.device, torch.float32)
        return _StepCounter(model, reporter.model_call) if reporter is not None else model

    def _reporter(self, images: int, seeds: Sequence[int]):
        """(progress reporter or None, whether this call owns it)."""
        if not self.progress:
            return None, False
        if hasattr(self.progress, "model_call"):
            return self.progress, False
        from sr_lab.inference.progress import InferenceProgress

        try:
            calls = self.model_calls()
        except Exception:  # noqa: BLE001 - a plain callable sampler: no known timestep list
            calls = None
        return InferenceProgress(images, seeds, calls, self.progress, desc="sampling", leave=False), True

    def _decode(self, latent: torch.Tensor, image_cond: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder_stage if self.decoder_stage is not None else self.stage
        height, width = image_cond.shape[-2:]
        if self._vae_tiles_needed(height, width):
            f = int(self.backbone.vae_factor)
            return tiled_decode(decoder.decode_latent, latent, image_cond, self.vae_tile.size, self.vae_tile.overlap, f)
        return decoder.decode_latent(latent, image_cond)

    # -- main -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, lr01: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if lr01.ndim != 4 or lr01.shape[1] != 3:
            raise ValueError(f"lr01 must be (B, 3, h, w), got {tuple(lr01.shape)}")
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("at least one seed is needed")
        dev = self.device
        lr01 = lr01.to(dev, torch.float32)
        b = lr01.shape[0]
        up, (height, width) = self.prepare_lr(lr01)
        hp, wp = up.shape[-2:]
        abar = self.backbone.alphas_cumprod
        start = self.start_mode
        with self._autocast(), self._encode_context(hp, wp):
            cond, _ = self.stage.prepare(up, (hp, wp), prompts=self.prompt,
                                         negative_prompts=self.negative_prompt if self.cfg_scale != 1.0 else None)
            z_lr = lr_start_latent(self.backbone, cond) if start == "lr" else None

        per_call = len(seeds) if self.seed_batch is None else int(self.seed_batch)
        outputs = []
        reporter, own = self._reporter(b, seeds)
        try:
            for i in range(0, len(seeds), per_call):
                chunk = seeds[i:i + per_call]
                n = len(chunk)
                gens = seed_generators(chunk, b, dev)
                x_t = start_latent(self.backbone, cond, start, gens, repeat=n, z_lr=z_lr)
                cond_n = repeat_rows(cond, b, n)
                if reporter is not None:
                    reporter.begin_chunk(chunk, b)
                with self._autocast():
                    x0 = self.sampler(self._model(reporter, x_t), x_t, cond_n, abar, generator=gens)
                for k in range(n):  # decode one seed (B images) at a time
                    with self._autocast():
                        sr = self._decode(x0[k * b:(k + 1) * b].float(), up).float()
                    sr = sr[..., :height, :width]
                    sr = apply_color_fix(sr, lr01, self.color_fix, self.wavelet_levels).clamp(0, 1)
                    outputs.append(sr.cpu())
                if reporter is not None:
                    reporter.end_chunk()
        finally:
            if own:
                reporter.close()
        return torch.stack(outputs)

"""Pretrain the ``tiny`` SD-shaped prior from scratch on the photos that ship with scikit-image.

``python -m sr_lab.pretrain.tiny [--out DIR] [--seed 0] [--vae-steps N] [--unet-steps N] [--device auto]
[--minutes-budget M]`` (``make pretrain-tiny ARGS=...``). Plain PyTorch, one function per phase:

1. **Photos** (:func:`load_photos`): scikit-image's colour photos, listed by name; grayscale, unreadable,
   small (< 128 px) files and the two graphics in :data:`NOT_PHOTOS` are skipped; :data:`HELD_OUT` is kept
   for evaluation. Random square crops (:func:`random_crops`): a window of ``size * zoom`` pixels (zoom
   log-uniform in ``[1, 4]``, capped by the photo) resized to ``size`` with an antialiased bilinear filter,
   flipped left-right half of the time; every draw from an explicit ``torch.Generator``.
2. **VAE** (:func:`train_vae`): ``build_tiny(seed).vae`` (diffusers ``AutoencoderKL``, factor 8, 4 latent
   channels) trained on fresh random crops with L1 + image-gradient L1 + a small KL (:func:`vae_loss`).
3. **Latent bank and scaling factor** (:func:`encode_bank`, :func:`measure_latent_std`): the trained VAE
   encodes a fixed bank of random 128 px training crops once (posterior mean and std); the scaling factor is
   LDM's, 1 / std of posterior *samples* of those crops, stored with
   ``vae.register_to_config(scaling_factor=...)`` (``Backbone`` reads ``vae.config.scaling_factor``).
4. **UNet** (:func:`train_unet`): ``build_tiny(seed).unet`` (diffusers ``UNet2DConditionModel``),
   eps-prediction with SD's scaled-linear betas (0.00085 -> 0.012, T = 1000) on scaled posterior samples
   (fresh noise every step) of random 64-128 px windows of the bank's latents, conditioned on the
   empty-prompt context of ``build_tiny(seed)``'s random, frozen text encoder; AdamW, linear warmup +
   cosine LR, EMA of the weights (the EMA is exported). Encoding the crops once instead of every step
   saves about a third of the phase's time on a CPU.
5. **Evaluation** (:func:`vae_psnr`, :func:`eps_mse`), an unconditional DDIM sample grid
   (:func:`sample_grid`), then :func:`export`: ``unet.safetensors``, ``vae.safetensors``, ``samples.png``
   and ``card.json`` (recipe, data, quality, sizes, sha256), each written atomically.

Same seed, same CPU and thread count (``--threads``) -> bit-identical files (deterministic algorithms,
explicit generators, data drawn in the main process). Defaults: 2000 VAE + 2400 UNet steps, estimated at
about 22 min with ``--threads 1`` on an otherwise idle CPU (from the measured CPU time per step; about half
of it each phase), about 33 min on a CPU shared with three other jobs. ``--minutes-budget M`` times a few steps of
each phase on this machine instead and gives each phase half of what is left after the bank and a
reserve for evaluation: the VAE limits everything downstream (its held-out PSNR was still rising when the
UNet's loss had flattened). The planned step counts depend on the machine's speed; the card records them,
and ``--vae-steps/--unet-steps`` replay them exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.data import ImageReadError, find_images, read_rgb_uint8, sample_image_dir
from sr_lab.pretrain.prior import CARD_FORMAT, DEFAULT_PRIOR_DIR, file_sha256
from sr_lab.utils.atomic import atomic_safetensors_save, atomic_save_image, atomic_write_text, remove_stale_temps
from sr_lab.utils.seeding import make_generator

#: held out from training, for the card's PSNR and eps-MSE (neither has a near-duplicate in training)
HELD_OUT = ("chelsea.png", "rocket.jpg")
#: colour files of scikit-image's data folder that are graphics, not photos
NOT_PHOTOS = {"color.png": "synthetic colour wheel, not a photo",
              "logo.png": "graphic (scikit-image logo), not a photo"}
MIN_SIDE = 128          # smaller files cannot give a 128 px crop
CHROMA_MIN = 1.0        # mean |R-G| + |G-B| (0-255) below which an RGB file is grayscale content
SIZE_BUDGET = 20 * 2 ** 20


def say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Recipe:
    """Every hyperparameter of a run (recorded in card.json)."""

    seed: int = 0
    # data: random crops (photo uniform, zoom log-uniform in [1, max_zoom], left-right flips)
    max_zoom: float = 4.0
    # VAE
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_crop_sizes: tuple[int, ...] = (64, 96, 128)   # one size per batch, uniform
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_grad_weight: float = 0.5                      # L1 of horizontal/vertical finite differences
    vae_kl_weight: float = 1e-6                       # x per-image KL sum, against the per-image summed L1
    # latent bank (the UNet's data) and the scaling factor
    bank_size: int = 4096
    bank_crop_size: int = 128
    # UNet
    unet_steps: int = 2400
    unet_batch: int = 32
    unet_crop_sizes: tuple[int, ...] = (64, 96, 128)  # px (latent windows of size / 8), one per batch
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    unet_weight_decay: float = 0.01
    ema_decay: float = 0.998                          # with diffusers' warmup min(decay, (1 + n) / (10 + n))
    # both phases
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.05                        # the cosine ends at this fraction of the peak LR
    # noise schedule (SD)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # evaluation and samples
    eval_crops: int = 32
    eval_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950)
    num_samples: int = 16
    sample_size: int = 128
    ddim_steps: int = 50

    def check(self) -> None:
        unet_sizes = [*self.unet_crop_sizes, self.bank_crop_size, self.sample_size]
        if any(s < 32 or s % 32 for s in unet_sizes):
            raise ValueError(f"UNet crop, bank and sample sizes must be multiples of 32 (latents divisible by the "
                             f"UNet's two downsamplings): {unet_sizes}")
        if any(s < 8 or s % 8 for s in self.vae_crop_sizes):
            raise ValueError(f"VAE crop sizes must be multiples of 8: {list(self.vae_crop_sizes)}")
        if max(self.unet_crop_sizes) > self.bank_crop_size:
            raise ValueError(f"UNet crops {list(self.unet_crop_sizes)} must fit in the bank's {self.bank_crop_size} px")
        if max(*self.vae_crop_sizes, self.bank_crop_size) > MIN_SIDE:
            raise ValueError(f"crops must be <= {MIN_SIDE} px (the smallest photo kept)")
        if min(self.vae_steps, self.unet_steps) < 0 or min(self.bank_size, self.eval_crops, self.num_samples) < 1:
            raise ValueError("step counts must be >= 0, bank, eval crops and samples >= 1")


# -- 1. photos and crops -----------------------------------------------------------------------------

@dataclass
class Photos:
    train: dict[str, torch.Tensor]                          # name -> (3, H, W) uint8, sorted by name
    held_out: dict[str, torch.Tensor]
    excluded: dict[str, str] = field(default_factory=dict)  # name -> reason


def load_photos(folder: str | os.PathLike | None = None) -> Photos:
    """scikit-image's colour photos (sorted by name), split into training and :data:`HELD_OUT`."""
    folder = folder or sample_image_dir()
    train, held, excluded = {}, {}, {}
    for path in find_images(folder, recursive=False):
        name = Path(path).name
        if name in NOT_PHOTOS:
            excluded[name] = NOT_PHOTOS[name]
            continue
        try:
            arr, _ = read_rgb_uint8(path)
        except ImageReadError as exc:
            excluded[name] = f"unreadable ({exc.reason})"
            continue
        if min(arr.shape[:2]) < MIN_SIDE:
            excluded[name] = f"smaller than {MIN_SIDE} px"
            continue
        a = arr.astype(np.int16)
        if float(np.abs(a[..., 0] - a[..., 1]).mean() + np.abs(a[..., 1] - a[..., 2]).mean()) < CHROMA_MIN:
            excluded[name] = "grayscale"
            continue
        (held if name in HELD_OUT else train)[name] = torch.tensor(arr).permute(2, 0, 1).contiguous()
    missing = [n for n in HELD_OUT if n not in held]
    if missing or len(train) < 2:
        raise FileNotFoundError(f"{folder}: held-out photo(s) {missing} missing or fewer than 2 training photos "
                                f"({sorted(train)}); is scikit-image's data folder complete?")
    return Photos(train, {n: held[n] for n in HELD_OUT}, excluded)


def random_crops(photos: list[torch.Tensor], n: int, size: int, gen: torch.Generator,
                 max_zoom: float = 4.0) -> torch.Tensor:
    """``n`` random crops ``(n, 3, size, size)`` in [-1, 1]: photo uniform, window ``size * zoom`` (zoom
    log-uniform in [1, min(max_zoom, short side / size)]) resized to ``size`` (antialiased bilinear),
    left-right flip with probability 1/2. All draws from ``gen``."""
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        h, w = img.shape[-2:]
        zmax = max(1.0, min(max_zoom, min(h, w) / size))
        zoom = math.exp(float(torch.rand((), generator=gen)) * math.log(zmax))
        win = min(min(h, w), max(size, round(size * zoom)))
        top = int(torch.randint(h - win + 1, (1,), generator=gen))
        left = int(torch.randint(w - win + 1, (1,), generator=gen))
        crop = img[:, top:top + win, left:left + win].float()[None]
        if win != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop[0] / 127.5 - 1).clamp(-1, 1)
    return out


def pick(options: tuple[int, ...], gen: torch.Generator) -> int:
    return int(options[int(torch.randint(len(options), (1,), generator=gen))])


# -- shared training helpers -------------------------------------------------------------------------

def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int, min_ratio: float):
    """Linear warmup over ``warmup`` steps, then cosine from the peak LR to ``min_ratio`` of it."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def effective_warmup(warmup: int, steps: int) -> int:
    """The warmup, capped at a tenth of a short run."""
    return min(warmup, max(1, steps // 10))


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Plain progress lines: step, loss (mean since the last line), lr, it/s, elapsed, ETA."""

    def __init__(self, phase: str, steps: int, every: int):
        self.phase, self.steps, self.every = phase, steps, max(1, every)
        self.start = time.perf_counter()
        self.window: list[float] = []
        self.history: list[float] = []

    def update(self, step: int, loss: float, lr: float, extra: str = "") -> None:
        self.window.append(loss)
        self.history.append(loss)
        if step % self.every and step != self.steps:
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else float("nan")
        eta = (self.steps - step) / rate if rate > 0 else 0.0
        say(f"{self.phase:4s} step {step}/{self.steps} ({100 * step / self.steps:.0f}%) "
            f"loss {sum(self.window) / len(self.window):.4f}{extra} lr {lr:.2e} | {rate:.2f} it/s | "
            f"elapsed {hms(elapsed)} | ETA {hms(eta)}")
        self.window = []

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.start
        tail = self.history[-max(1, min(100, len(self.history) // 10)):]
        return {"steps": self.steps, "seconds": round(seconds, 2),
                "it_per_s": round(self.steps / seconds, 3) if seconds > 0 and self.steps else None,
                "first_loss": self.history[0] if self.history else None,
                "final_loss": sum(tail) / len(tail) if tail else None,
                "final_loss_over_last_steps": len(tail)}


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``mean + std * noise``, the noise drawn on the CPU from ``gen`` (the same draws on any device)."""
    return mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)


# -- 2. VAE ------------------------------------------------------------------------------------------

def image_grad_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of ``y`` and ``x``."""
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    return (dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean()


def vae_loss(vae: nn.Module, x: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    """L1 + ``vae_grad_weight`` * gradient L1 + ``vae_kl_weight`` * KL, all per input value: LDM's
    ``sum|x - y| + kl_weight * KL`` per image divided by the image's 3·H·W values. The decoder sees a
    posterior sample (as LDM's autoencoder is trained)."""
    post = vae.encode(x).latent_dist
    y = vae.decode(posterior_sample(post.mean, post.std, gen)).sample
    l1 = (y - x).abs().mean()
    grad = image_grad_l1(y, x)
    kl = post.kl().mean()  # per image: 0.5 * sum(mean² + var - 1 - log var) over the latent
    loss = l1 + recipe.vae_grad_weight * grad + recipe.vae_kl_weight * kl / x[0].numel()
    return loss, {"l1": float(l1.detach()), "grad": float(grad.detach()), "kl": float(kl.detach())}


def optimise(loss: torch.Tensor, model: torch.nn.Module, opt, sched, grad_clip: float) -> float:
    """One optimiser step (gradient clipped) and one LR-schedule step; returns the LR the step used."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    lr = sched.get_last_lr()[0]
    sched.step()
    return lr


def train_vae(vae: nn.Module, photos: list[torch.Tensor], recipe: Recipe, device: torch.device,
              log_every: int = 50) -> dict:
    """Train ``vae`` in place for ``recipe.vae_steps`` steps on fresh random crops; returns the summary."""
    vae.train().requires_grad_(True)
    steps = recipe.vae_steps
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, betas=recipe.adam_betas, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, effective_warmup(recipe.vae_warmup, steps), recipe.min_lr_ratio)
    data_gen = make_generator(recipe.seed, "vae", "crops")
    noise_gen = make_generator(recipe.seed, "vae", "posterior")
    progress = Progress("vae", steps, log_every)
    for step in range(1, steps + 1):
        size = pick(recipe.vae_crop_sizes, data_gen)
        x = random_crops(photos, recipe.vae_batch, size, data_gen, recipe.max_zoom).to(device)
        loss, stats = vae_loss(vae, x, noise_gen, recipe)
        lr = optimise(loss, vae, opt, sched, recipe.grad_clip)
        progress.update(step, float(loss.detach()), lr, f" (l1 {stats['l1']:.4f}, kl {stats['kl']:.0f})")
    vae.eval().requires_grad_(False)
    return progress.summary()


# -- 3. latent bank and scaling factor ---------------------------------------------------------------

@dataclass
class LatentBank:
    """Posterior means and stds (unscaled, CPU) of the VAE on ``bank_size`` fixed random crops."""

    mean: torch.Tensor  # (N, 4, s/8, s/8)
    std: torch.Tensor


@torch.no_grad()
def encode_bank(vae: nn.Module, photos: list[torch.Tensor], recipe: Recipe, device: torch.device,
                batch: int = 32) -> LatentBank:
    """Encode ``recipe.bank_size`` random ``recipe.bank_crop_size`` px crops (generator
    ``make_generator(seed, "bank", "crops")``) with the trained VAE."""
    gen = make_generator(recipe.seed, "bank", "crops")
    means, stds = [], []
    for start in range(0, recipe.bank_size, batch):
        n = min(batch, recipe.bank_size - start)
        post = vae.encode(random_crops(photos, n, recipe.bank_crop_size, gen, recipe.max_zoom).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return LatentBank(torch.cat(means), torch.cat(stds))


@torch.no_grad()
def measure_latent_std(bank: LatentBank, seed: int) -> tuple[float, int]:
    """Std (float64, unbiased) of one posterior sample of every bank crop (noise from
    ``make_generator(seed, "scale", "posterior")``); LDM's scaling factor is 1 / this.
    Returns ``(std, number of latent values)``."""
    z = posterior_sample(bank.mean, bank.std, make_generator(seed, "scale", "posterior")).double()
    return float(z.std()), int(z.numel())


def bank_batch(bank: LatentBank, n: int, size: int, index_gen: torch.Generator,
               noise_gen: torch.Generator) -> torch.Tensor:
    """``n`` posterior samples (unscaled, CPU) of random ``size x size`` latent windows of random bank entries."""
    h, w = bank.mean.shape[-2:]
    idx = torch.randint(bank.mean.shape[0], (n,), generator=index_gen)
    tops = torch.randint(h - size + 1, (n,), generator=index_gen)
    lefts = torch.randint(w - size + 1, (n,), generator=index_gen)
    win = [(slice(None), slice(int(t), int(t) + size), slice(int(c), int(c) + size)) for t, c in zip(tops, lefts)]
    mean = torch.stack([bank.mean[int(i)][s] for i, s in zip(idx, win)])
    std = torch.stack([bank.std[int(i)][s] for i, s in zip(idx, win)])
    return posterior_sample(mean, std, noise_gen)


# -- 4. UNet -----------------------------------------------------------------------------------------

class EMA:
    """``ema = d * ema + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))`` (diffusers' warmup)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)


def diffusion_loss(unet: nn.Module, z0: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                   t_gen: torch.Generator, eps_gen: torch.Generator) -> torch.Tensor:
    """eps-prediction MSE at ``t`` uniform in [0, T) (DDPM / SD)."""
    b = z0.shape[0]
    t = torch.randint(alphas_cumprod.shape[0], (b,), generator=t_gen).to(z0.device)
    eps = torch.randn(z0.shape, generator=eps_gen).to(z0.device)
    a = alphas_cumprod.to(z0.device, torch.float32)[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    pred = unet(zt, t, encoder_hidden_states=context.expand(b, -1, -1)).sample
    return F.mse_loss(pred, eps)


def train_unet(unet: nn.Module, bank: LatentBank, context: torch.Tensor, alphas_cumprod: torch.Tensor,
               scaling_factor: float, recipe: Recipe, device: torch.device,
               log_every: int = 50) -> tuple[nn.Module, dict]:
    """Train ``unet`` in place on scaled posterior samples of bank windows; returns ``(EMA copy, summary)``."""
    unet.train().requires_grad_(True)
    steps = recipe.unet_steps
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, betas=recipe.adam_betas,
                            weight_decay=recipe.unet_weight_decay)
    sched = warmup_cosine(opt, steps, effective_warmup(recipe.unet_warmup, steps), recipe.min_lr_ratio)
    ema = EMA(unet, recipe.ema_decay)
    index_gen = make_generator(recipe.seed, "unet", "windows")
    post_gen = make_generator(recipe.seed, "unet", "posterior")
    t_gen = make_generator(recipe.seed, "unet", "timesteps")
    eps_gen = make_generator(recipe.seed, "unet", "noise")
    progress = Progress("unet", steps, log_every)
    for step in range(1, steps + 1):
        size = pick(recipe.unet_crop_sizes, index_gen) // 8
        z0 = bank_batch(bank, recipe.unet_batch, size, index_gen, post_gen).to(device) * scaling_factor
        loss = diffusion_loss(unet, z0, context, alphas_cumprod, t_gen, eps_gen)
        lr = optimise(loss, unet, opt, sched, recipe.grad_clip)
        ema.update(unet)
        progress.update(step, float(loss.detach()), lr)
    unet.eval().requires_grad_(False)
    return ema.model, progress.summary()


# -- 5. evaluation and samples -----------------------------------------------------------------------

def center_crop_multiple(img: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre crop of a (3, H, W) image to the largest multiple of ``multiple`` on each side, no resampling
    (chelsea.png 451x300 -> 448x296, rocket.jpg 640x427 -> 640x424)."""
    h, w = img.shape[-2:]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return img[..., top:top + nh, left:left + nw]


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """RGB PSNR on the 0-255 scale between two uint8 (or integer-valued) images."""
    mse = float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean())
    return 10 * math.log10(255 ** 2 / mse)


@torch.no_grad()
def vae_psnr(backbone, images: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR of ``decode(encode(x))`` (posterior mode) on whole (3, H, W) uint8 images, the reconstruction
    clamped to [0, 1] and rounded to uint8; per image plus ``mean`` (of the per-image PSNRs)."""
    device = backbone.alphas_cumprod.device
    out = {}
    for name, img in images.items():
        rec = backbone.decode(backbone.encode(img[None].float().div(255).to(device)))
        out[name] = psnr_uint8(rec[0].cpu().mul(255).round(), img)
    out["mean"] = sum(out.values()) / len(images)
    return out


@torch.no_grad()
def eps_mse(unet: nn.Module, backbone, images: list[torch.Tensor], recipe: Recipe) -> dict[str, float]:
    """eps-MSE of ``unet`` on the scaled posterior-mode latents of ``recipe.eval_crops`` random
    ``bank_crop_size`` px crops of ``images`` (the held-out photos; generator ``(seed, "eval", "crops")``),
    one noise draw per crop from ``(seed, "eval-eps", t)``; per ``t`` plus ``mean`` over ``t``."""
    device = backbone.alphas_cumprod.device
    x = random_crops(images, recipe.eval_crops, recipe.bank_crop_size, make_generator(recipe.seed, "eval", "crops"),
                     recipe.max_zoom)
    z0 = backbone.encode((x.to(device) + 1) / 2)
    ac = backbone.alphas_cumprod.to(torch.float32)
    context = backbone.prompt_embedding("", z0.shape[0])
    out = {}
    for t in recipe.eval_timesteps:
        eps = torch.randn(z0.shape, generator=make_generator(recipe.seed, "eval-eps", t)).to(device)
        zt = ac[t].sqrt() * z0 + (1 - ac[t]).sqrt() * eps
        tt = torch.full((z0.shape[0],), t, device=device, dtype=torch.long)
        out[str(t)] = float(F.mse_loss(unet(zt, tt, encoder_hidden_states=context).sample, eps))
    out["mean"] = sum(out.values()) / len(recipe.eval_timesteps)
    return out


def ddim_scheduler(recipe: Recipe):
    """SD's DDIM configuration (eta 0, "leading" spacing with offset 1, final alpha = alphas_cumprod[0])."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_start=recipe.beta_start,
                         beta_end=recipe.beta_end, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@torch.no_grad()
def sample_grid(backbone, recipe: Recipe) -> np.ndarray:
    """``recipe.num_samples`` unconditional samples (empty prompt, DDIM ``recipe.ddim_steps`` steps from
    noise drawn from ``make_generator(seed, "samples")``), decoded, tiled in a grid with 2 px white gaps."""
    device = backbone.alphas_cumprod.device
    sched = ddim_scheduler(recipe)
    sched.set_timesteps(recipe.ddim_steps)
    n, s = recipe.num_samples, recipe.sample_size // 8
    z = torch.randn((n, 4, s, s), generator=make_generator(recipe.seed, "samples")).to(device)
    context = backbone.prompt_embedding("", n)
    for t in sched.timesteps:
        eps = backbone.unet(z, t.to(device), encoder_hidden_states=context).sample
        z = sched.step(eps, t, z).prev_sample
    imgs = backbone.decode(z).cpu().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size, gap = recipe.sample_size, 2
    grid = np.full((rows * (size + gap) - gap, cols * (size + gap) - gap, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = im
    return grid


# -- 6. export ---------------------------------------------------------------------------------------

def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def export(out: Path, unet_state: dict, vae_state: dict, grid: np.ndarray, card: dict) -> dict:
    """Write the weights, the sample grid and, last, the card with every file's size and sha256. Each file
    is written atomically. The safetensors metadata is one key (``sr_lab``, a sorted JSON string: format,
    module, seed, scaling factor): safetensors stores metadata in a hash map, so several keys would come
    out in a different order in every process and the files would not be bit-identical."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    for module, state in (("unet", unet_state), ("vae", vae_state)):
        meta = {"format": CARD_FORMAT, "module": module, "seed": card["seed"], "scaling_factor": card["scaling_factor"]}
        atomic_safetensors_save(state, out / f"{module}.safetensors",
                                metadata={"sr_lab": json.dumps(meta, sort_keys=True)})
    atomic_save_image(out / "samples.png", grid)
    params = {"unet.safetensors": sum(v.numel() for v in unet_state.values()),
              "vae.safetensors": sum(v.numel() for v in vae_state.values())}
    files = {}
    for name in ("unet.safetensors", "vae.safetensors", "samples.png"):
        files[name] = {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
        if name in params:
            files[name]["params"] = params[name]
    card["files"] = files
    card["total_bytes_without_card"] = sum(f["bytes"] for f in files.values())
    atomic_write_text(out / "card.json", json.dumps(card, indent=2) + "\n")
    return card


# -- driver ------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def deterministic(device: torch.device):
    """Deterministic algorithms during the run (an error on CPU if an op has none, a warning on CUDA),
    the previous settings restored afterwards."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]


@contextmanager
def cpu_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block (``None``: unchanged). Bit-identical results need the same
    thread count; on a CPU shared with other jobs, 1 thread can be several times faster than 2 (OpenMP
    threads spin at barriers while their partners wait for a core)."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def warn_if_cpu_busy(device: torch.device) -> None:
    """One line when other processes keep the CPU busy and torch uses several threads (see :func:`cpu_threads`)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        say(f"note: the CPU is busy (load {load:.1f} on {cores} cores before this run's work); with {threads} threads "
            f"the run can be several times slower than with --threads 1")


def plan_steps(minutes: float, recipe: Recipe, backbone, photos: list[torch.Tensor], device: torch.device,
               vae_share: float = 0.5) -> dict:
    """Step counts that fill ``minutes`` on this machine: a few timed steps of each phase at every crop size
    (throwaway copies of the models, one untimed warm-up step per size), minus the bank's encoding time and
    a reserve for evaluation and export (5 % of the budget, at least 1 minute), split ``vae_share`` / rest."""
    gen = make_generator(recipe.seed, "calibrate")
    vae = copy.deepcopy(backbone.vae).train().requires_grad_(True)
    unet = copy.deepcopy(backbone.unet).train().requires_grad_(True)
    context = backbone.prompt_embedding("", 1)
    opt_v = torch.optim.AdamW(vae.parameters(), lr=1e-6)
    opt_u = torch.optim.AdamW(unet.parameters(), lr=1e-6)

    def vae_step(size):
        loss, _ = vae_loss(vae, random_crops(photos, recipe.vae_batch, size, gen, recipe.max_zoom).to(device), gen,
                           recipe)
        opt_v.zero_grad()
        loss.backward()
        opt_v.step()

    def unet_step(size):
        z0 = torch.randn(recipe.unet_batch, 4, size // 8, size // 8, generator=gen).to(device)
        loss = diffusion_loss(unet, z0, context, backbone.alphas_cumprod, gen, gen)
        opt_u.zero_grad()
        loss.backward()
        opt_u.step()

    @torch.no_grad()
    def encode_step(size):
        vae.encode(random_crops(photos, 32, size, gen, recipe.max_zoom).to(device))

    def seconds_per_step(fn, sizes, timed=2):
        total = 0.0
        for size in sizes:
            fn(size)  # warm-up: kernel selection / primitive creation for this shape
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(timed):
                fn(size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += (time.perf_counter() - t0) / timed
        return total / len(sizes)

    s_vae = seconds_per_step(vae_step, recipe.vae_crop_sizes)
    s_unet = seconds_per_step(unet_step, recipe.unet_crop_sizes)
    s_bank = seconds_per_step(encode_step, (recipe.bank_crop_size,)) * math.ceil(recipe.bank_size / 32)
    reserve = max(60.0, 0.05 * minutes * 60)
    avail = max(0.0, minutes * 60 - reserve - s_bank)
    plan = {"minutes": minutes, "vae_share": vae_share, "reserve_s": round(reserve, 1),
            "bank_s_estimate": round(s_bank, 1),
            "calibrated_s_per_step": {"vae": round(s_vae, 4), "unet": round(s_unet, 4)},
            "vae_steps": int(vae_share * avail / s_vae), "unet_steps": int((1 - vae_share) * avail / s_unet)}
    say(f"budget {minutes:g} min: {s_vae:.3f} s/VAE step, {s_unet:.3f} s/UNet step, bank ~{s_bank:.0f} s -> "
        f"{plan['vae_steps']} VAE + {plan['unet_steps']} UNet steps")
    return plan


def environment(device: torch.device) -> dict:
    import diffusers
    import skimage
    import transformers

    from sr_lab.utils.device import device_name

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "scikit_image": skimage.__version__,
            "device": device.type, "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": True}


def describe(recipe: Recipe, photos: Photos, n_values: int) -> dict:
    """The card's prose: what was trained on what, how, and how the numbers were measured."""
    s = recipe.seed
    return {
        "architecture": {
            "builder": "sr_lab.models.backbone.build_tiny",
            "init": f"build_tiny(seed={s}): UNet seed {s}, VAE seed {s + 1}, text encoder seed {s + 2}",
            "unet": "diffusers UNet2DConditionModel, channels 32/64/64, cross-attention dim 32",
            "vae": "diffusers AutoencoderKL, blocks 16/32/32/32 (factor 8), 4 latent channels",
        },
        "text_encoder": {"saved": False, "trained": False,
                         "source": f"build_tiny(seed={s})'s random CLIPTextModel, frozen; only the empty prompt's "
                                   f"context is used"},
        "data": {
            "source": "scikit-image's data folder (sr_lab.data.sample_image_dir()), colour photos sorted by name",
            "train_photos": sorted(photos.train), "held_out_photos": list(photos.held_out),
            "excluded": dict(sorted(photos.excluded.items())),
            "crops": f"photo uniform; window size*zoom, zoom log-uniform in [1, min({recipe.max_zoom:g}, short "
                     f"side/size)], resized to size (antialiased bilinear); left-right flip p=0.5; "
                     f"generators make_generator(seed, phase, ...)",
            "vae_batches": f"{recipe.vae_batch} fresh crops per step, one size per batch from "
                           f"{list(recipe.vae_crop_sizes)} px",
            "unet_batches": f"a bank of {recipe.bank_size} crops of {recipe.bank_crop_size} px encoded once by the "
                            f"trained VAE (posterior mean and std); per step {recipe.unet_batch} random windows of "
                            f"one size from {list(recipe.unet_crop_sizes)} px (latent size/8) of random bank "
                            f"entries, a fresh posterior sample each, times the scaling factor",
        },
        "losses": {
            "vae": f"L1 + {recipe.vae_grad_weight:g} * L1 of the images' finite differences + "
                   f"{recipe.vae_kl_weight:g} * KL, with KL summed per image against L1 summed per image (LDM's "
                   f"kl_weight); the decoder sees a posterior sample; no perceptual or adversarial term (no "
                   f"downloaded weights)",
            "unet": f"MSE(eps_pred, eps), t uniform in [0, {recipe.num_train_timesteps}), SD scaled-linear betas "
                    f"{recipe.beta_start:g}-{recipe.beta_end:g}, empty-prompt context",
            "optimizers": f"AdamW betas {list(recipe.adam_betas)}: VAE lr {recipe.vae_lr:g} wd 0, UNet lr "
                          f"{recipe.unet_lr:g} wd {recipe.unet_weight_decay:g}; linear warmup (at most a tenth of "
                          f"the steps) then cosine to {recipe.min_lr_ratio:g} x lr; grad-norm clip "
                          f"{recipe.grad_clip:g}; UNet EMA {recipe.ema_decay:g} (diffusers warmup), exported",
        },
        "scaling_factor_protocol": f"1 / std (unbiased, float64) of one posterior sample of every bank crop "
                                   f"({n_values} latent values; noise make_generator(seed, 'scale', "
                                   f"'posterior')), as LDM; set with vae.register_to_config(scaling_factor=...)",
        "quality_protocol": {
            "vae_psnr_rgb": "held-out photos centre-cropped to multiples of 8 px (no resampling; chelsea 448x296, "
                            "rocket 640x424), decode(posterior mode), clamped to [0,1], rounded to uint8; PSNR over "
                            "RGB on the 0-255 scale per photo; mean of the per-photo PSNRs",
            "eps_mse": f"exported (EMA) and raw UNet on the scaled posterior-mode latents of {recipe.eval_crops} "
                       f"random {recipe.bank_crop_size} px crops of the held-out photos (make_generator(seed, "
                       f"'eval', 'crops')), one noise draw per crop from make_generator(seed, 'eval-eps', t); "
                       f"1.0 = predicting zero",
        },
        "samples": f"samples.png: {recipe.num_samples} unconditional samples at {recipe.sample_size} px, DDIM "
                   f"{recipe.ddim_steps} steps (eta 0, SD's DDIM config) from make_generator(seed, 'samples')",
    }


def pretrain(recipe: Recipe, out: str | os.PathLike = DEFAULT_PRIOR_DIR, device: str = "auto",
             minutes_budget: float | None = None, planned: tuple[str, ...] = ("vae_steps", "unet_steps"),
             log_every: int = 50, command: str | None = None, threads: int | None = None) -> dict:
    """Run every phase and write the prior folder ``out``; returns the card. With ``minutes_budget`` the
    recipe's step counts named in ``planned`` are replaced by :func:`plan_steps`'. ``threads``: torch's
    CPU threads during the run (restored afterwards; default: unchanged)."""
    from sr_lab.models.backbone import Backbone, build_tiny

    recipe.check()
    start = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    phase_s: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phase_s[name] = round(now - since, 2)
        return now

    with deterministic(dev), cpu_threads(threads):
        photos = load_photos()
        train_imgs = list(photos.train.values())
        say(f"photos: {len(photos.train)} training {sorted(photos.train)}, held out {list(photos.held_out)}")
        bb = build_tiny(seed=recipe.seed, num_train_timesteps=recipe.num_train_timesteps,
                        beta_start=recipe.beta_start, beta_end=recipe.beta_end).to(dev)
        context = bb.prompt_embedding("", 1)
        plan = None
        if minutes_budget is not None:
            plan = plan_steps(minutes_budget, recipe, bb, train_imgs, dev)
            recipe = replace(recipe, **{k: plan[k] for k in planned})
        say(f"device {dev.type}, {torch.get_num_threads()} threads; {recipe.vae_steps} VAE + "
            f"{recipe.unet_steps} UNet steps, seed {recipe.seed}")
        warn_if_cpu_busy(dev)
        t = lap("setup", start)

        vae_summary = train_vae(bb.vae, train_imgs, recipe, dev, log_every)
        t = lap("vae", t)
        bank = encode_bank(bb.vae, train_imgs, recipe, dev)
        std, n_values = measure_latent_std(bank, recipe.seed)
        scaling_factor = 1.0 / std
        bb.vae.register_to_config(scaling_factor=scaling_factor)
        say(f"bank of {recipe.bank_size} crops encoded; latent std {std:.5f} over {n_values} values -> "
            f"scaling factor {scaling_factor:.6f}")
        t = lap("bank", t)

        unet_ema, unet_summary = train_unet(bb.unet, bank, context, bb.alphas_cumprod, scaling_factor, recipe,
                                            dev, log_every)
        del bank
        t = lap("unet", t)

        prior = Backbone(unet_ema, bb.vae, bb.prompt_encoder, bb.alphas_cumprod, name="tiny_prior").to(dev)
        assert prior.latent_scale == scaling_factor
        held = {name: center_crop_multiple(img) for name, img in photos.held_out.items()}
        psnr = vae_psnr(prior, held)
        mse_ema = eps_mse(unet_ema, prior, list(photos.held_out.values()), recipe)
        mse_raw = eps_mse(bb.unet, prior, list(photos.held_out.values()), recipe)
        say(f"held-out VAE PSNR {psnr['mean']:.2f} dB ({', '.join(f'{k} {v:.2f}' for k, v in psnr.items())}); "
            f"eps-MSE EMA {mse_ema['mean']:.4f} (raw {mse_raw['mean']:.4f})")
        t = lap("eval", t)
        grid = sample_grid(prior, recipe)
        t = lap("samples", t)

        card = {"format": CARD_FORMAT, "seed": recipe.seed, "command": command, "recipe": asdict(recipe),
                "budget_plan": plan, **describe(recipe, photos, n_values),
                "scaling_factor": scaling_factor, "latent_std": std,
                "quality": {"vae_psnr_rgb": psnr, "eps_mse_ema": mse_ema, "eps_mse_raw": mse_raw},
                "training": {"vae": vae_summary, "unet": unet_summary},
                "environment": environment(dev), "phase_seconds": phase_s,
                "wall_time_s": round(time.perf_counter() - start, 1)}
        card = export(out, cpu_state(unet_ema), cpu_state(bb.vae), grid, card)
    total = sum(f.stat().st_size for f in out.iterdir() if f.name in (*card["files"], "card.json"))
    say(f"wrote {out}: " + ", ".join(f"{k} {v['bytes'] / 2 ** 20:.2f} MiB" for k, v in card["files"].items())
        + f"; total with card.json {total / 2 ** 20:.2f} MiB (budget {SIZE_BUDGET / 2 ** 20:.0f} MiB); "
        f"wall time {hms(time.perf_counter() - start)}")
    if total > SIZE_BUDGET:
        say(f"WARNING: the prior is {total / 2 ** 20:.1f} MiB, over the {SIZE_BUDGET / 2 ** 20:.0f} MiB budget")
    return card


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Recipe()
    p = argparse.ArgumentParser(prog="python -m sr_lab.pretrain.tiny",
                                description="Pretrain the tiny SD-shaped prior (VAE + UNet) from scratch on "
                                            "scikit-image's colour photos, deterministically from a seed.")
    p.add_argument("--out", default=str(DEFAULT_PRIOR_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None, help=f"default {d.vae_steps} (or from --minutes-budget)")
    p.add_argument("--unet-steps", type=int, default=None, help=f"default {d.unet_steps} (or from --minutes-budget)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="fit both phases into M minutes on this machine (half VAE, half UNet, calibrated); "
                        "an explicit --vae-steps/--unet-steps wins for its phase")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--vae-crop-sizes", type=_sizes, default=d.vae_crop_sizes, help="comma-separated px, multiples of 8")
    p.add_argument("--unet-crop-sizes", type=_sizes, default=d.unet_crop_sizes,
                   help="comma-separated px, multiples of 32, <= the bank's crop size")
    p.add_argument("--bank-size", type=int, default=d.bank_size)
    p.add_argument("--bank-crop-size", type=int, default=d.bank_crop_size)
    p.add_argument("--eval-crops", type=int, default=d.eval_crops)
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--sample-size", type=int, default=d.sample_size)
    p.add_argument("--ddim-steps", type=int, default=d.ddim_steps)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); results are bit-identical only "
                        "for the same thread count; 1 is often faster on a CPU shared with other jobs")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    d = Recipe()
    recipe = Recipe(seed=args.seed, vae_batch=args.vae_batch, unet_batch=args.unet_batch,
                    vae_crop_sizes=args.vae_crop_sizes, unet_crop_sizes=args.unet_crop_sizes,
                    vae_steps=d.vae_steps if args.vae_steps is None else args.vae_steps,
                    unet_steps=d.unet_steps if args.unet_steps is None else args.unet_steps,
                    bank_size=args.bank_size, bank_crop_size=args.bank_crop_size, eval_crops=args.eval_crops,
                    num_samples=args.num_samples, sample_size=args.sample_size, ddim_steps=args.ddim_steps)
    planned = tuple(k for k in ("vae_steps", "unet_steps") if getattr(args, k) is None)
    budget = args.minutes_budget
    if budget is not None and not planned:
        say("--minutes-budget ignored: both step counts are given")
        budget = None
    command = " ".join(["python -m sr_lab.pretrain.tiny", *(sys.argv[1:] if argv is None else argv)])
    return pretrain(recipe, args.out, args.device, minutes_budget=budget, planned=planned,
                    log_every=args.log_every, command=command, threads=args.threads)


if __name__ == "__main__":
    main()

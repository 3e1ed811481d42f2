"""What every sampling call of a denoising stage needs: the condition, the context and x_T.

One implementation for training validation, StableSR's latent records, CCSR stage 2's latent source
and inference (:class:`sr_lab.inference.pipeline.SRPipeline`):

* :func:`build_condition` — the runner's branch conditions for the LR (``lr01`` at LR or HR size, in
  [0, 1]), ``context`` (the prompt embedding, one prompt per row), optionally the negative prompt's
  context for classifier-free guidance (StableSR Eq. 8) and an ``image_context`` entry (ClearSR's CLIP
  image embedding), plus ``refine`` — the runner's refinement from x̂0, bound to the backbone, which a
  PSR step hook calls (AddSR Eq. 2). Entries that are not tensors pass through CFG, tiling and seed
  batching untouched.
* :func:`start_latent` — x_T for a start mode: ``noise`` (x_T ~ N(0, I)); ``lr`` (the frozen-VAE latent
  of the upsampled LR noised to T−1: StableSR's authors' sampling and latent-record scripts, CCSR v2's
  stage-2 latents); ``hr`` (the HR latent, a posterior sample, noised to T−1: CCSR v1 stage 2,
  ``q_sample(x_start, t=T)`` in the authors' ``ddpm_ccsr_stage2.py``). Noise is drawn after the HR
  posterior sample, from the same generator(s).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from sr_lab.diffusion.guidance import UNCOND_KEY
from sr_lab.diffusion.schedule import q_sample, randn_like
from sr_lab.models.branches.base import LR_IMAGE_KEY

__all__ = ["STARTS", "IMAGE_CONTEXT_KEY", "build_condition", "lr_start_latent", "start_latent", "repeat_rows"]

STARTS = ("noise", "lr", "hr")
IMAGE_CONTEXT_KEY = "image_context"


def build_condition(backbone, runner, lr01: torch.Tensor, hr_size: tuple[int, int],
                    prompts: str | Sequence[str], *, negative_prompts: str | Sequence[str] | None = None,
                    image_context: torch.Tensor | None = None, reuse: dict | None = None) -> dict:
    b = lr01.shape[0]
    cond = runner.condition(backbone, lr01, tuple(hr_size), reuse=reuse)
    cond["context"] = backbone.prompt_embedding(prompts, b)
    if negative_prompts is not None:
        cond[UNCOND_KEY] = backbone.prompt_embedding(negative_prompts, b)
    if image_context is not None:
        cond[IMAGE_CONTEXT_KEY] = image_context
    cond["refine"] = partial(runner.refine, backbone)
    return cond


def latent_shape(backbone, batch: int, hr_size: tuple[int, int]) -> tuple[int, int, int, int]:
    f = int(backbone.vae_factor)
    return batch, int(backbone.unet.config.in_channels), hr_size[0] // f, hr_size[1] // f


@torch.no_grad()
def lr_start_latent(backbone, cond: dict) -> torch.Tensor:
    """The frozen-VAE latent (posterior mode) of the upsampled LR of a condition (``start="lr"``)."""
    return backbone.encode(cond[LR_IMAGE_KEY], sample=False).float()


@torch.no_grad()
def start_latent(backbone, cond: dict, start: str, generator, *, repeat: int = 1,
                 hr01: torch.Tensor | None = None, z_lr: torch.Tensor | None = None) -> torch.Tensor:
    """x_T for ``repeat`` copies of the condition's batch (seed-major rows, one generator per row
    allowed). ``z_lr``: a precomputed :func:`lr_start_latent` (inference encodes it once per image)."""
    if start not in STARTS:
        raise ValueError(f"start={start!r} must be one of {STARTS}")
    image = cond[LR_IMAGE_KEY]
    b = image.shape[0]
    shape = latent_shape(backbone, b * repeat, tuple(image.shape[-2:]))
    x0 = None
    if start == "hr":
        if hr01 is None or repeat != 1:
            raise ValueError("start='hr' needs the HR image (training only, one copy)")
        x0 = backbone.encode(hr01, generator=generator, sample=True).float()
    elif start == "lr":
        z = lr_start_latent(backbone, cond) if z_lr is None else z_lr.float()
        x0 = torch.cat([z] * repeat) if repeat > 1 else z
    noise = randn_like(torch.empty(shape, device=image.device), generator)
    if x0 is None:
        return noise
    ab = backbone.alphas_cumprod
    t = torch.full((shape[0],), ab.shape[0] - 1, device=noise.device, dtype=torch.long)
    return q_sample(ab, x0, t, noise)


def repeat_rows(value, batch: int, times: int):
    """Repeat batch-shaped tensors (first dim == ``batch``) ``times`` along dim 0, recursing into
    dicts/lists/tuples; anything else (callables such as ``refine``) passes through. Seed batching at
    inference and AddSR's k teacher draws per sample use it on a condition."""
    if torch.is_tensor(value):
        return torch.cat([value] * times) if value.ndim > 0 and value.shape[0] == batch and times > 1 else value
    if isinstance(value, dict):
        return {k: repeat_rows(v, batch, times) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_rows(v, batch, times) for v in value)
    return value

"""Frozen latent-diffusion backbones: UNet, VAE, prompt encoder and noise schedule.

Builders sharing one container:

* :func:`load_pretrained` — SD 2.1-base (or any SD-layout diffusers folder / hub id) through diffusers'
  ``from_pretrained``; fails at once, with what to download and where to point ``backbone.path``, when
  the weights are not reachable (no retry loops).
* :func:`build_tiny_trained` (``backbone=tiny``, the offline embedded default) — the same diffusers classes
  from small configs with the weights ``make pretrain-tiny`` trained from scratch on scikit-image's photos
  and shipped in the package: a toy prior that reconstructs and denoises photos (no claim about real images).
* :func:`build_tiny` (``backbone=tiny_random``) — the same architecture with seeded random weights: its
  results mean "the pipeline runs", never "the method works".
* :func:`build_sd21_shape` — SD 2.1-base's exact architecture with random weights (speed and memory).

The latent scale is read from the VAE config (0.18215 for SD 2.x), never hard-coded (methods.md).

A builder declares what the config check needs to know, with :func:`backbone_builder` (read from the
imported function, nothing built): ``backbone_name`` (the name when the config has no ``name`` key),
``toy`` (a toy backbone, ``tiny`` / ``tiny_random``: smoke-run allowances) and ``validate_config(cfg, error)``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from sr_lab.models.text import PromptEncoder, hf_clip_tokenizer, open_clip_tokenizer

log = logging.getLogger(__name__)

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BackboneUnavailable(RuntimeError):
    """Pretrained weights could not be found locally nor fetched."""


class Backbone(nn.Module):
    """Container of the frozen parts of a latent diffusion model.

    ``alphas_cumprod`` (float64, length T) is the training noise schedule, taken from the
    checkpoint's scheduler config (SD: "scaled_linear" betas 0.00085 -> 0.012, T = 1000).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_encoder: PromptEncoder,
                 alphas_cumprod: torch.Tensor, name: str = "backbone"):
        super().__init__()
        self.name = name
        self.unet = unet
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.latent_scale = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.freeze()

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def freeze(self) -> None:
        for module in (self.unet, self.vae, self.prompt_encoder):
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):  # frozen parts never leave eval mode
        return super().train(False)

    # -- VAE -------------------------------------------------------------------------------------
    def _vae_input_dtype(self, *parts: str) -> torch.dtype:
        """The dtype of the first of the VAE's ``parts`` that has weights (encoder and decoder may differ when
        the frozen VAE is bf16 and a stage keeps its decoder float32, :mod:`sr_lab.models.speed`)."""
        for name in parts:
            p = next(getattr(self.vae, name).parameters(), None) if getattr(self.vae, name, None) is not None else None
            if p is not None:
                return p.dtype
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, image01: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """Image in [0, 1] -> scaled latent. ``sample`` draws from the posterior (LDM's HR latents);
        otherwise its mode (CCSR's LR condition encoder uses the mode)."""
        # [0, 1] -> [-1, 1] in float32, then the encoder's dtype (a bf16 frozen VAE: sr_lab.models.speed)
        x = (image01.float() * 2 - 1).to(self._vae_input_dtype("encoder"))
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return z.float() * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [0, 1] (clamped)."""
        z = (latent.float() / self.latent_scale).to(self._vae_input_dtype("post_quant_conv", "decoder"))  # fp32 scaling
        x = self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_embedding(self, prompt: str | Sequence[str], batch: int) -> torch.Tensor:
        """Context (batch, L, D) for ``prompt``: one string for every row, or one string per row.
        Each distinct string is encoded once and cached (StableSR and CCSR always use the empty
        prompt; AddSR's tag prompts differ per sample)."""
        from sr_lab.models.prompts import prompt_rows

        if isinstance(prompt, str):
            return self._embed_one(prompt).expand(batch, -1, -1)
        rows = prompt_rows(prompt, batch)
        if len(set(rows)) == 1:
            return self._embed_one(rows[0]).expand(batch, -1, -1)
        return torch.cat([self._embed_one(p) for p in rows])

    def _embed_one(self, prompt: str) -> torch.Tensor:
        device = self.alphas_cumprod.device
        emb = self._prompt_cache.get(prompt)
        if emb is None or emb.device != device:
            emb = self.prompt_encoder([prompt]).detach()
            self._prompt_cache[prompt] = emb
        return emb


def backbone_builder(name: str, *, toy: bool = False,
                     validate_config: Callable[..., None] | None = None) -> Callable[[Callable], Callable]:
    """Declare a backbone builder's capabilities on the function (``backbone._target_`` names it).

    ``name``: the backbone's name unless the config sets ``backbone.name`` (stage configs compare it);
    ``toy``: a toy backbone (random weights, or the tiny prior trained here): smoke-run allowances such as a
    random LPIPS trunk or discriminator feature network are accepted on it, never on a real one; ``validate_config``:
    ``(cfg, error) -> None``, checks ``cfg.backbone`` of the composed config before any model is built
    and raises ``error`` with one line naming the key.
    """
    def declare(fn: Callable) -> Callable:
        fn.backbone_name = name
        fn.toy = bool(toy)
        fn.validate_config = validate_config
        return fn
    return declare


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _tiny_parts(seed: int, channels: Sequence[int], cross_attention_dim: int, scaling_factor: float = 0.18215):
    """The tiny SD-shaped UNet, VAE and CLIP text encoder with seeded random weights (UNet ``seed``, VAE
    ``seed + 1``, text encoder ``seed + 2``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ch = tuple(int(c) for c in channels)
    n = len(ch)
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=float(scaling_factor), sample_size=128))
    text = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)))
    return unet, vae, text


def _sd_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012) -> torch.Tensor:
    """SD's "scaled_linear" training schedule as diffusers computes it: alphas_cumprod, length T."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule="scaled_linear").alphas_cumprod


@backbone_builder("tiny_random", toy=True)
def build_tiny(seed: int = 0, dtype: str = "float32", channels: Sequence[int] = (32, 64, 64),
               cross_attention_dim: int = 32, num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012) -> Backbone:
    """``backbone=tiny_random``: SD-shaped UNet/VAE/text encoder from small configs, random weights from
    ``seed``, offline. Its results mean "the pipeline runs", never "the method works" (tests that pin exact
    numbers, and the initialisation of ``make pretrain-tiny``)."""
    unet, vae, text = _tiny_parts(seed, channels, cross_attention_dim)
    bb = Backbone(unet, vae, PromptEncoder(open_clip_tokenizer(77), text),
                  _sd_schedule(num_train_timesteps, beta_start, beta_end), name="tiny_random")
    return bb.to(DTYPES[dtype])


def check_tiny_trained_config(cfg, error: type[Exception]) -> None:
    """Config check of :func:`build_tiny_trained`: the prior folder exists and holds a card (hashes are checked
    when it is loaded)."""
    from omegaconf import OmegaConf

    path = OmegaConf.select(cfg, "backbone.path", default=None)
    if path and not (Path(str(path)).expanduser() / "card.json").is_file():
        raise error(f"backbone.path={path} is not a tiny prior folder (no card.json); make one with "
                    f"`make pretrain-tiny ARGS=\"--out {path}\"` or leave backbone.path unset for the shipped prior")


@backbone_builder("tiny", toy=True, validate_config=check_tiny_trained_config)
def build_tiny_trained(path: str | None = None, dtype: str = "float32") -> Backbone:
    """``backbone=tiny`` (the embedded default): the tiny architecture of :func:`build_tiny` with the weights
    ``make pretrain-tiny`` trained from scratch on scikit-image's photos (:mod:`sr_lab.pretrain.tiny`), read
    from ``path`` (a prior folder; ``None``: the one shipped in the package, ``sr_lab/assets/tiny_prior``).

    The UNet and VAE weights are safetensors checked against the card's sha256; the VAE's latent scaling
    factor is the card's (LDM's 1/std of the training latents, ~0.32, not SD's 0.18215); the text encoder is
    the random one of ``build_tiny(card seed)`` (only the empty prompt's context was used in pretraining);
    the noise schedule is the card's (SD's scaled-linear, T = 1000). A toy prior: it reconstructs and
    denoises photos at small scale, with no claim about real-image quality."""
    from sr_lab.pretrain.prior import DEFAULT_PRIOR_DIR, TinyPriorError, load_tiny_prior

    folder = Path(path).expanduser() if path else DEFAULT_PRIOR_DIR
    try:
        unet_state, vae_state, card = load_tiny_prior(folder)
    except TinyPriorError as exc:
        raise BackboneUnavailable(f"backbone=tiny: {exc}") from exc
    arch = card.get("architecture", {})
    recipe = card.get("recipe", {})
    unet, vae, text = _tiny_parts(int(card["seed"]), arch.get("channels", (32, 64, 64)),
                                  int(arch.get("cross_attention_dim", 32)), float(card["scaling_factor"]))
    for part, state, name in ((unet, unet_state, "unet"), (vae, vae_state, "vae")):
        missing, unexpected = part.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneUnavailable(f"backbone=tiny: {folder}/{name}.safetensors does not fit the tiny {name} "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    schedule = _sd_schedule(int(recipe.get("num_train_timesteps", 1000)), float(recipe.get("beta_start", 0.00085)),
                            float(recipe.get("beta_end", 0.012)))
    bb = Backbone(unet, vae, PromptEncoder(open_clip_tokenizer(77), text), schedule, name="tiny")
    return bb.to(DTYPES[dtype])


#: Stable Diffusion 2.1-base's architecture (the diffusers configs of stabilityai/stable-diffusion-2-1-base):
#: UNet 865.9 M, VAE 83.7 M, OpenCLIP ViT-H text tower 340.4 M (23 of its 24 layers: SD 2.x conditions on the
#: penultimate layer, followed by the final layer norm, as diffusers' converted text encoder).
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def check_sd21_shape_config(cfg, error: type[Exception]) -> None:
    """``backbone=sd21_shape`` is for speed and memory checks: training on its random weights is refused
    unless ``backbone.allow_training=true`` (a pipeline or scaling test that knows the results mean nothing)."""
    from omegaconf import OmegaConf

    fit = OmegaConf.select(cfg, "run_mode", default="fit") == "fit"
    if fit and not bool(OmegaConf.select(cfg, "backbone.allow_training", default=False)):
        raise error("backbone=sd21_shape has random weights (SD 2.1-base's shape, for benchmarks and memory "
                    "checks): training it teaches nothing; use backbone=sd21_base backbone.path=<weights>, or "
                    "backbone.allow_training=true for a scaling test")
    device = OmegaConf.select(cfg, "backbone.device", default="cpu")
    if str(device) == "meta":
        raise error("backbone.device=meta builds no weights (parameter counts only): it cannot run a stage")


@backbone_builder("sd21_shape", toy=True, validate_config=check_sd21_shape_config)
def build_sd21_shape(seed: int = 0, dtype: str = "float32", device: str = "cpu",
                     allow_training: bool = False) -> Backbone:
    """SD 2.1-base's exact architecture (:data:`SD21_UNET`, :data:`SD21_VAE`, :data:`SD21_TEXT`) with seeded
    random weights, offline, in ``dtype``: speed and memory do not depend on weight values, so benchmarks
    and memory checks run at the real shape without the weights. ``device="meta"`` builds it without
    memory (parameter counts, e.g. ``benchmarks/adapter_params.py``); ``cuda`` builds it on the GPU
    directly. ``allow_training`` is read by the config check only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def build(make):
        with torch.device(device):
            return _seeded(seed, make) if device != "meta" else make()

    unet = build(lambda: UNet2DConditionModel(**SD21_UNET))
    vae = build(lambda: AutoencoderKL(**SD21_VAE))
    text = build(lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT)))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    bb = Backbone(unet, vae, PromptEncoder(open_clip_tokenizer(77), text), sched.alphas_cumprod, name="sd21_shape")
    return bb.to(DTYPES[dtype]) if device != "meta" else bb


def looks_like_local_path(path: str) -> bool:
    """A hub id is ``owner/name``; anything absolute, relative-dotted, ``~`` or existing is local."""
    p = str(path)
    return p.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(p)) or p.count("/") != 1


def missing_subfolders(path: str | Path) -> list[str]:
    root = Path(path).expanduser()
    return [s for s in SD_SUBFOLDERS if not (root / s).is_dir()]


def check_pretrained_config(cfg, error: type[Exception]) -> None:
    """Config check of :func:`load_pretrained`: a local ``backbone.path`` is a full diffusers SD folder."""
    from omegaconf import OmegaConf

    path = str(OmegaConf.select(cfg, "backbone.path", default=None))
    if looks_like_local_path(path):
        if not Path(path).expanduser().is_dir():
            raise error(f"backbone.path={path} does not exist (a local SD 2.1-base diffusers "
                        f"folder or a hub id such as stabilityai/stable-diffusion-2-1-base)")
        missing = missing_subfolders(path)
        if missing:
            raise error(f"backbone.path={path} lacks subfolder(s) {missing} of a diffusers SD checkpoint")


@backbone_builder("sd21_base", validate_config=check_pretrained_config)
def load_pretrained(path: str, dtype: str = "float32", local_files_only: bool | None = None,
                    name: str = "sd21_base") -> Backbone:
    """Load an SD-layout diffusers checkpoint (SD 2.1-base: ``stabilityai/stable-diffusion-2-1-base``).

    ``path`` is a local folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/ subfolders or a hub
    id. A hub id is looked up in the local Hugging Face cache first; the hub is contacted only when
    ``local_files_only`` is False (default: False unless ``HF_HUB_OFFLINE=1``), with short timeouts.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    how_to = ("Download an SD 2.1-base diffusers folder (e.g. `huggingface-cli download "
              "stabilityai/stable-diffusion-2-1-base --local-dir /path/sd21-base` on a machine with "
              "network access) and set backbone.path=/path/sd21-base")
    if looks_like_local_path(path):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BackboneUnavailable(f"backbone.path={path}: folder not found. {how_to}")
        missing = missing_subfolders(root)
        if missing:
            raise BackboneUnavailable(f"backbone.path={path}: missing subfolder(s) {missing}. {how_to}")
        kwargs = {"local_files_only": True}
        src = str(root)
    else:
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        kwargs = {"local_files_only": local_files_only}
        src = path
    torch_dtype = DTYPES[dtype]
    try:
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=torch_dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=torch_dtype, **kwargs)
        text = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=torch_dtype, **kwargs)
        tokenize = hf_clip_tokenizer(src, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:  # hub/cache errors are OSError subclasses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneUnavailable(f"backbone.path={path}: could not load weights ({first}). {how_to}") from exc
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise BackboneUnavailable(f"backbone.path={path}: prediction_type="
                                  f"{scheduler.config.prediction_type}; sr_lab stages expect eps-prediction "
                                  f"(SD 2.1-base, not the 768-v model)")
    return Backbone(unet, vae, PromptEncoder(tokenize, text), scheduler.alphas_cumprod, name=name)

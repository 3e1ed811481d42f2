"""AddSR's discriminator: a frozen ViT feature network with small trainable heads, conditioned on the LR.

AddSR (paper 002, Sec. 3.1): "As for the discriminator, we adopt the same structure as StyleGAN-T (44)
conditioned on c_img extracted from x_LR by DINOv2 (45)"; hinge loss, generator weight λ = 0.02
(methods.md, AddSR). The structure is the *projected discriminator* of StyleGAN-T (Sauer et al., ICML
2023, ``networks/discriminator.py``), also used by ADD (Sauer et al., "Adversarial Diffusion
Distillation", 2023), which the authors copy into ``ADD/models/discriminator.py``:

* a frozen ViT ``F`` sees the image (resized to its input size, 224, ImageNet-normalised);
* the tokens of several of its blocks (hooks; ``layers``) and, with ``hook_patch``, of the patch
  embedding (``pos_drop`` output) each feed one trainable head. A token map is the patch tokens plus
  the CLS token ("add" readout, DPT), as a (B, C, N) sequence;
* a head is ``SpectralConv1d(k=1) → GroupNorm(4) → LeakyReLU(0.2)``, a residual block of the same with
  ``k=9`` (circular padding; ``(f(x) + x) / √2``), then a spectral-norm ``Conv1d`` to ``cmap_dim``
  channels; StyleGAN-T uses a "BatchNormLocal" where the AddSR authors switched to GroupNorm(4), kept
  here;
* projection conditioning (Miyato & Koyama 2018, as in StyleGAN-T): ``cmap = cmapper(c_img)`` (an
  equalised-lr linear map), ``logits = Σ_k out_k · cmap_k / √cmap_dim`` → (B, 1, N), returned
  flattened to (B, N) per head (the authors' ``.view(B, -1)``);
* DiffAugment (Zhao et al., NeurIPS 2020) ``translation,cutout`` (the AddSR authors drop StyleGAN-T's
  ``color``) and, with probability ``p_crop``, one random ``image_size`` crop of the batch when it is
  larger (StyleGAN-T/AddSR ``p_crop = 0.5``), before the resize (``area``, as both).

Which networks. Paper: DINOv2 ViT-S/14 (Oquab et al. 2023) for c_img, the trunk unspecified ("same
structure as StyleGAN-T"). Authors' code (``train_addsr.py``): trunk DINO ViT-S/16 (Caron et al. 2021,
``vit_small_patch16_224_dino``) hooked on blocks 2/5/8/11 plus the patch embedding (5 heads), c_img =
the final-norm CLS token of DINOv2 ViT-S/14 run on the LR resized (bilinear) to 518. Both are options
here (``trunk``: ``dinov2_vits14`` | ``dino_vits16``; ``cond_trunk``: either, or ``same`` = the trunk's
own CLS token on the LR at ``image_size``, one network less in memory). When trunk and cond trunk are
the same network they share one module.

Why ``transformers`` and not timm/torch.hub. ``transformers`` is already a dependency (the SD text
encoder) and timm is not; its ``Dinov2Model`` / ``ViTModel`` are exactly these two networks, and the
Hub publishes both checkpoints (``facebook/dinov2-small``, ``facebook/dino-vits16``) as a folder of
``config.json`` + ``model.safetensors``, which loads without unpickling anything — the authors' files
(``dinov2_vits14_pretrain.pth``, ``dino_deitsmall16_pretrain.pth``) are pickles and are refused.
Differences to the authors' networks: DINOv2's position embeddings are resampled by size (HF) rather
than by scale factor + 0.1 offset; a missing ``config.json`` falls back to the published architecture.

Weights (local only, nothing is downloaded): ``weights`` is

* ``None``: the folders ``dinov2-small/`` / ``dino-vits16/`` (each ``config.json`` + ``model.safetensors``,
  as written by ``save_pretrained`` or ``huggingface-cli download <id> --local-dir``) are looked up in
  ``$SR_LAB_WEIGHTS`` and the torch hub cache (:mod:`sr_lab.utils.weights`);
* a folder holding those sub-folders (searched first);
* one network's Hugging Face folder, or one ``.safetensors`` file (its ``config.json`` next to it, else
  the published architecture) — only when a single network is needed (``cond_trunk`` ``same`` or equal
  to ``trunk``);
* a mapping ``{dino_vits16: <dir or file>, dinov2_vits14: <dir or file>}``.

A missing file raises :class:`~sr_lab.utils.weights.MissingWeights` naming the file and where it goes;
:func:`check_discriminator_weights` does the same lookup without building anything (config
validation). ``allow_random_init`` (smoke runs only) builds seeded random trunks instead; ``tiny``
builds small random trunks for CPU tests (it requires ``allow_random_init``).

Randomness: heads (and random trunks) are initialised under a forked RNG from ``seed``; the
augmentation of a training-mode forward draws only from the ``generator`` passed to it (a CPU or
device generator), never from the global RNG.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.utils.weights import MissingWeights, find_weight

log = logging.getLogger(__name__)

__all__ = [
    "TRUNKS",
    "ProjectedDiscriminator",
    "check_discriminator_weights",
    "diff_augment",
    "hinge_d_loss",
    "hinge_g_loss",
    "r1_penalty",
    "resolve_trunk_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl"}


@dataclass(frozen=True)
class TrunkSpec:
    """A supported feature network: its Hugging Face model type, Hub id and local folder name."""

    title: str
    model_type: str        # config.json "model_type": "dinov2" | "vit"
    hub_id: str
    folder: str            # looked up as <weights dir>/<folder>/model.safetensors
    full: dict             # the published architecture (used when config.json is absent)
    tiny: dict             # small random architecture for CPU tests


TRUNKS: dict[str, TrunkSpec] = {
    "dinov2_vits14": TrunkSpec(
        title="DINOv2 ViT-S/14", model_type="dinov2", hub_id="facebook/dinov2-small", folder="dinov2-small",
        full={"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
              "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6},
        tiny={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "mlp_ratio": 4,
              "patch_size": 14, "image_size": 56, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}),
    "dino_vits16": TrunkSpec(
        title="DINO ViT-S/16", model_type="vit", hub_id="facebook/dino-vits16", folder="dino-vits16",
        full={"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
              "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"},
        tiny={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128,
              "patch_size": 8, "image_size": 56, "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"}),
}
_COND_SAME = "same"


# --------------------------------------------------------------------------------------------------
# weights lookup (no model is built here)
# --------------------------------------------------------------------------------------------------
def _spec(name: str, key: str = "trunk") -> TrunkSpec:
    if name not in TRUNKS:
        raise ValueError(f"discriminator {key}={name!r}: expected one of {sorted(TRUNKS)}")
    return TRUNKS[name]


def _needed(trunk: str, cond_trunk: str | None) -> list[str]:
    _spec(trunk)
    if cond_trunk in (None, _COND_SAME, trunk):
        return [trunk]
    _spec(cond_trunk, "cond_trunk")
    return [trunk, cond_trunk]


def _hint(spec: TrunkSpec) -> str:
    return (f"https://huggingface.co/{spec.hub_id} (a folder {spec.folder}/ with config.json + {WEIGHTS_FILE}: "
            f"huggingface-cli download {spec.hub_id} --local-dir <weights dir>/{spec.folder})")


def _is_single_network(p: Path) -> bool:
    """``p`` names one network's weights (a file, or a Hugging Face folder) rather than a weights root."""
    return p.suffix in _PICKLE_SUFFIXES | {".safetensors"} or (p / "config.json").exists() \
        or (p / WEIGHTS_FILE).exists()


def _explicit(name: str, p: Path) -> Path:
    spec = TRUNKS[name]
    purpose = f"{spec.title} of the AddSR discriminator"
    if p.suffix in _PICKLE_SUFFIXES:
        raise ValueError(f"discriminator weights {p}: a pickle ({p.suffix}) is never loaded; use the safetensors "
                         f"Hugging Face folder from {_hint(spec)}")
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise MissingWeights(p.name, p.parent, purpose, _hint(spec))
        return p
    if not (p / WEIGHTS_FILE).is_file():
        raise MissingWeights(WEIGHTS_FILE, p, purpose, _hint(spec))
    return p


def resolve_trunk_weights(name: str, weights=None, single: bool = True) -> Path:
    """Where network ``name``'s weights are: a Hugging Face folder (holding ``model.safetensors``) or a
    ``.safetensors`` file; :class:`MissingWeights` naming the file and its folder otherwise.

    ``weights``: ``None``, a folder of weights (holding ``<folder>/``), one network's folder or file
    (only with ``single``), or a mapping ``{trunk name: dir or file}``."""
    spec = _spec(name)
    root = None
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(TRUNKS))
        if unknown:
            raise ValueError(f"discriminator weights: unknown network(s) {unknown}; expected keys among {sorted(TRUNKS)}")
        if weights.get(name) is not None:
            return _explicit(name, Path(str(weights[name])).expanduser())
    elif weights is not None:
        p = Path(str(weights)).expanduser()
        if _is_single_network(p):
            if not single:
                raise ValueError(
                    f"discriminator weights={p} holds one network's weights, but trunk and cond_trunk are two networks: "
                    f"give a folder holding {', '.join(s.folder + '/' for s in TRUNKS.values())} or a mapping "
                    f"{{{', '.join(f'{k}: <dir>' for k in TRUNKS)}}}")
            return _explicit(name, p)
        root = p
    found = find_weight(f"{spec.folder}/{WEIGHTS_FILE}", root, purpose=f"{spec.title} of the AddSR discriminator",
                        url_hint=_hint(spec))
    return found.parent


def check_discriminator_weights(trunk: str, weights_dir=None, cond_trunk: str | None = None) -> None:
    """Raise :class:`MissingWeights` (what to put where) unless every network the discriminator needs —
    ``trunk`` and, unless ``None``/``"same"``, ``cond_trunk`` — has local weights. Builds nothing."""
    names = _needed(trunk, cond_trunk)
    for name in names:
        resolve_trunk_weights(name, weights_dir, single=len(names) == 1)


# --------------------------------------------------------------------------------------------------
# trunks
# --------------------------------------------------------------------------------------------------
def _model_class(spec: TrunkSpec):
    if spec.model_type == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Config, Dinov2Model, {}
    from transformers import ViTConfig, ViTModel

    return ViTConfig, ViTModel, {"add_pooling_layer": False}


def _random_trunk(spec: TrunkSpec, arch: dict, seed: int) -> nn.Module:
    config_cls, model_cls, kwargs = _model_class(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config_cls(**arch), **kwargs)


def _load_trunk(spec: TrunkSpec, path: Path) -> nn.Module:
    """``from_pretrained(local_files_only=True, use_safetensors=True)``: no download, no pickle, the
    library's own key conversion for older checkpoints. Missing or mis-shaped tensors are an error."""
    config_cls, model_cls, kwargs = _model_class(spec)
    with tempfile.TemporaryDirectory(prefix="sr_lab_disc_") as tmp:
        if path.is_file():  # one .safetensors file: stage it as a folder with its (or the default) config
            folder = Path(tmp)
            os.symlink(path.resolve(), folder / WEIGHTS_FILE)
            if (path.parent / "config.json").is_file():
                shutil.copy(path.parent / "config.json", folder / "config.json")
        else:
            folder = path
        if not (folder / "config.json").is_file():
            log.info("discriminator: %s has no config.json, using the published %s architecture", path, spec.title)
            staged = Path(tmp) / "staged"
            staged.mkdir()
            os.symlink((folder / WEIGHTS_FILE).resolve(), staged / WEIGHTS_FILE)
            config_cls(**spec.full).save_pretrained(staged)
            folder = staged
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != spec.model_type:
            raise ValueError(f"discriminator weights {path}: config.json has model_type={model_type!r}, "
                             f"{spec.title} needs {spec.model_type!r} ({spec.hub_id})")
        model, info = model_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if "mask_token" not in k and not k.startswith("pooler")]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"discriminator weights {path} do not fit {spec.title} "
                         f"(missing {sorted(missing)[:3]}, mismatched {mismatched[:3]})")
    return model.float()


class _Trunk(nn.Module):
    """A frozen ViT: ``forward(x_normalised) -> (hidden_states, last_hidden_state)``; ``hidden_states[0]``
    is the embedding output (patch + position, with CLS), ``hidden_states[i + 1]`` the output of block ``i``
    (before the final norm), as the authors' hooks."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name, self.spec = name, TRUNKS[name]
        self.model = model
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.depth = int(cfg.num_hidden_layers)
        ps = cfg.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        self.prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor):
        kwargs = {"interpolate_pos_encoding": True} if self.spec.model_type == "vit" else {}
        out = self.model(pixel_values=x, output_hidden_states=True, **kwargs)
        return out.hidden_states, out.last_hidden_state


# --------------------------------------------------------------------------------------------------
# heads (StyleGAN-T / AddSR ``DiscHead``)
# --------------------------------------------------------------------------------------------------
def _sn_conv1d(cin: int, cout: int, kernel_size: int) -> nn.Conv1d:
    """Spectral-norm Conv1d (1 power iteration, as ``SpectralConv1d``). The classic hook keeps ``weight_u``
    / ``weight_v`` as buffers of the conv itself, so a trainable-only checkpoint stores them too."""
    conv = nn.Conv1d(cin, cout, kernel_size, padding=kernel_size // 2,
                     padding_mode="circular" if kernel_size > 1 else "zeros")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class _EqualLinear(nn.Module):
    """StyleGAN's ``FullyConnectedLayer`` (linear, lr multiplier 1): w ~ N(0, 1) scaled by 1/√in, b = 0."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.gain = 1.0 / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.gain, self.bias.to(x.dtype))


def _block(channels: int, kernel_size: int, groups: int) -> nn.Sequential:
    return nn.Sequential(_sn_conv1d(channels, channels, kernel_size), nn.GroupNorm(groups, channels),
                         nn.LeakyReLU(0.2, inplace=True))


class DiscHead(nn.Module):
    """(B, C, N) tokens + (B, c_dim) condition → (B, 1, N) logits (projection conditioning)."""

    def __init__(self, channels: int, c_dim: int, cmap_dim: int = 64, groups: int = 4):
        super().__init__()
        if channels % groups:
            raise ValueError(f"discriminator head: {channels} channels not divisible into {groups} groups")
        self.cmap_dim = cmap_dim
        self.main = nn.Sequential(_block(channels, 1, groups), _Residual(_block(channels, 9, groups)))
        self.cmapper = _EqualLinear(c_dim, cmap_dim)
        self.cls = _sn_conv1d(channels, cmap_dim, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.cls(self.main(x))
        cmap = self.cmapper(c.to(out.dtype)).unsqueeze(-1)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


# --------------------------------------------------------------------------------------------------
# DiffAugment (translation, cutout) from an explicit generator
# --------------------------------------------------------------------------------------------------
def _randint(low: int, high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(low, high, (n, 1, 1), generator=generator, device=generator.device).to(device)


def diff_augment(x01: torch.Tensor, generator: torch.Generator, translation: float = 0.125,
                 cutout: float = 0.2) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) ``translation`` then ``cutout`` on [0, 1] images, per sample.

    The authors apply it to [-1, 1] images, where both fill with 0; here the fill is the same grey, 0.5.
    Translation: a shift in [-⌊0.125·H + ½⌋, +…] per axis, vacated pixels filled; cutout: one
    ⌊0.2·H + ½⌋ square (clipped at the border) set to the fill. Draws: tx, ty, cutout x, cutout y."""
    b, _, h, w = x01.shape
    dev = x01.device
    ar_b = torch.arange(b, device=dev)[:, None, None]
    if translation > 0:
        sx, sy = int(h * translation + 0.5), int(w * translation + 0.5)
        tx = _randint(-sx, sx + 1, b, generator, dev)
        ty = _randint(-sy, sy + 1, b, generator, dev)
        gx = torch.clamp(torch.arange(h, device=dev)[None, :, None] + tx + 1, 0, h + 1)
        gy = torch.clamp(torch.arange(w, device=dev)[None, None, :] + ty + 1, 0, w + 1)
        pad = F.pad(x01, [1, 1, 1, 1], value=0.5)
        x01 = pad.permute(0, 2, 3, 1)[ar_b, gx, gy].permute(0, 3, 1, 2)
    if cutout > 0:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        ox = _randint(0, h + (1 - ch % 2), b, generator, dev)
        oy = _randint(0, w + (1 - cw % 2), b, generator, dev)
        gx = torch.clamp(torch.arange(ch, device=dev)[None, :, None] + ox - ch // 2, 0, h - 1)
        gy = torch.clamp(torch.arange(cw, device=dev)[None, None, :] + oy - cw // 2, 0, w - 1)
        mask = torch.ones(b, h, w, dtype=x01.dtype, device=dev)
        mask[ar_b, gx, gy] = 0
        mask = mask.unsqueeze(1)
        x01 = x01 * mask + 0.5 * (1 - mask)
    return x01.contiguous()


# --------------------------------------------------------------------------------------------------
# the discriminator
# --------------------------------------------------------------------------------------------------
class ProjectedDiscriminator(nn.Module):
    """Frozen ViT + per-layer projection heads (StyleGAN-T / ADD / AddSR); see the module docstring.

    ``embed_condition(lr01)`` → c_img (B, D), no grad. ``forward(image01, c_img, generator)`` → one (B, N)
    logits tensor per head (``layers`` order, then the patch-embedding head). In training mode the
    augmentation (``diffaug``, ``p_crop``) draws from ``generator`` (required then); in eval mode there is
    none. Gradients flow through the frozen trunk to the image (the generator loss needs them); only the
    heads train (``trainable_parameters()``), and ``requires_grad_`` / ``train`` never touch the trunks.
    """

    def __init__(self, trunk: str = "dinov2_vits14", cond_trunk: str = "dinov2_vits14",
                 layers: Sequence[int] | None = None, image_size: int | None = None, weights=None,
                 allow_random_init: bool = False, diffaug: bool = True, seed: int = 0, tiny: bool = False,
                 hook_patch: bool = True, cond_image_size: int | None = None, p_crop: float = 0.5,
                 cmap_dim: int = 64, imagenet_norm_cond: bool = True):
        super().__init__()
        names = _needed(trunk, cond_trunk)
        if not 0.0 <= p_crop <= 1.0:
            raise ValueError(f"discriminator p_crop={p_crop} must be in [0, 1]")
        self.trunk_name, self.cond_trunk_name = trunk, cond_trunk
        self.diffaug, self.p_crop, self.hook_patch = bool(diffaug), float(p_crop), bool(hook_patch)
        self.imagenet_norm_cond = bool(imagenet_norm_cond)

        # 1. weights first (fail fast, before anything is built)
        paths: dict[str, Path | None] = {}
        if tiny:
            if not allow_random_init:
                raise ValueError("discriminator tiny=true builds random trunks: it needs allow_random_init=true "
                                 "(smoke runs and tests only)")
            paths = {n: None for n in names}
        else:
            try:
                paths = {n: resolve_trunk_weights(n, weights, single=len(names) == 1) for n in names}
            except MissingWeights as err:
                if not allow_random_init:
                    raise
                log.warning("discriminator: %s; using RANDOM trunks (allow_random_init=true: smoke runs only)", err)
                paths = {n: None for n in names}

        # 2. trunks
        nets: dict[str, _Trunk] = {}
        for i, n in enumerate(names):
            spec = TRUNKS[n]
            model = _random_trunk(spec, spec.tiny if tiny else spec.full, seed + 1 + i) if paths[n] is None \
                else _load_trunk(spec, paths[n])
            if paths[n] is not None:
                log.info("discriminator: %s from %s", spec.title, paths[n])
            nets[n] = _Trunk(n, model)
        self.random_trunk = any(p is None for p in paths.values())
        self.trunk = nets[trunk]
        self.cond_net = nets[names[1]] if len(names) == 2 else None  # shared / "same": no second module

        # 3. sizes and hooks
        self.image_size = int(image_size if image_size is not None else (56 if tiny else 224))
        self.cond_image_size = int(cond_image_size) if cond_image_size is not None else \
            (self.image_size if cond_trunk == _COND_SAME or tiny else 518)
        depth = self.trunk.depth
        self.layers = tuple(int(l) for l in (layers if layers is not None else
                                             ((0, 1, 2, 3) if tiny else (2, 5, 8, 11))))
        bad = [l for l in self.layers if not 0 <= l < depth]
        if bad or not self.layers:
            raise ValueError(f"discriminator layers={list(self.layers)}: {self.trunk.spec.title} has blocks 0..{depth - 1}")
        tokens = (self.image_size // self.trunk.patch_size) ** 2
        if tokens < 5:
            raise ValueError(f"discriminator image_size={self.image_size} gives {tokens} tokens with patch "
                             f"{self.trunk.patch_size}; the 9-wide head needs at least 5")
        self.num_tokens = tokens
        self.c_dim = (self.cond_net or self.trunk).hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        # 4. heads (seeded, independent of whether the trunks are loaded or random)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            n_heads = len(self.layers) + int(self.hook_patch)
            self.heads = nn.ModuleList(DiscHead(self.trunk.hidden_size, self.c_dim, cmap_dim)
                                       for _ in range(n_heads))

    # -- modes --------------------------------------------------------------------------------------
    def _frozen(self) -> list[nn.Module]:
        return [m for m in (self.trunk, self.cond_net) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen():
            m.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True):
        """Toggles the heads only: the trunks stay frozen."""
        self.heads.requires_grad_(requires_grad)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    # -- helpers ------------------------------------------------------------------------------------
    def _normalise(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)

    def _readout(self, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
        """(B, prefix + N, C) → (B, C, N): patch tokens plus the CLS token (DPT "add" readout)."""
        return (tokens[:, prefix:] + tokens[:, :1]).transpose(1, 2).contiguous()

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            raise ValueError("ProjectedDiscriminator: a training-mode forward augments its input and needs an explicit "
                             "torch.Generator (generator=...); sr_lab never draws from the global RNG")
        if self.diffaug:
            x = diff_augment(x, generator)
        h, w = x.shape[-2:]
        if self.p_crop > 0 and min(h, w) > self.image_size \
                and torch.rand((), generator=generator, device=generator.device).item() < self.p_crop:
            s = self.image_size  # one crop for the batch, as torchvision's RandomCrop in the authors' code
            i = int(torch.randint(0, h - s + 1, (), generator=generator, device=generator.device))
            j = int(torch.randint(0, w - s + 1, (), generator=generator, device=generator.device))
            x = x[..., i:i + s, j:j + s]
        return x

    def _resize(self, x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))

    # -- API ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_condition(self, lr01: torch.Tensor) -> torch.Tensor:
        """c_img (B, D): the final-norm CLS token of the condition network on the LR in [0, 1]
        (``cond_trunk`` resized bilinearly to ``cond_image_size``, as the authors; ``same``: the trunk at
        ``image_size``, ``area`` as its discriminator input). ImageNet-normalised unless
        ``imagenet_norm_cond=false`` (the authors' script feeds DINOv2 the raw [0, 1] LR; ``same`` always
        normalises, as the trunk's discriminator input)."""
        x = lr01.float()
        if self.cond_trunk_name == _COND_SAME:
            net, x = self.trunk, self._resize(x, self.image_size, "area")
        else:
            net, x = (self.cond_net or self.trunk), self._resize(x, self.cond_image_size, "bilinear")
        if self.imagenet_norm_cond or self.cond_trunk_name == _COND_SAME:
            x = self._normalise(x)
        _, last = net(x)
        return last[:, 0].float()

    def forward(self, image01: torch.Tensor, c_img: torch.Tensor, generator: torch.Generator | None = None,
                return_features: bool = False, double_backward: bool | None = None):
        """Logits per head, each (B, N). ``return_features``: also the (B, C, N) token maps the heads saw,
        made grad-requiring leaves where they were not (the authors' R1 is taken w.r.t. them).

        ``double_backward``: run the trunk's attention on PyTorch's math SDPA backend, whose backward is
        differentiable (the fused CPU/CUDA kernels' is not), so that R1 w.r.t. the image
        (:func:`r1_penalty` with ``create_graph``) can train the heads. ``None``: when ``image01`` is a leaf
        that requires grad (the R1 pattern; a generator's output is not a leaf)."""
        x = image01
        if double_backward is None:
            double_backward = torch.is_grad_enabled() and image01.requires_grad and image01.is_leaf
        if self.training and (self.diffaug or (self.p_crop > 0 and min(x.shape[-2:]) > self.image_size)):
            x = self._augment(x, generator)
        x = self._normalise(self._resize(x, self.image_size, "area"))
        if double_backward:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                hidden, _ = self.trunk(x)
        else:
            hidden, _ = self.trunk(x)
        prefix = self.trunk.prefix_tokens
        feats = [self._readout(hidden[l + 1], prefix) for l in self.layers]
        if self.hook_patch:
            feats.append(self._readout(hidden[0], prefix))
        if return_features:
            feats = [f if f.requires_grad else f.requires_grad_(True) for f in feats]
        logits = [head(f, c_img).flatten(1) for head, f in zip(self.heads, feats)]
        return (logits, feats) if return_features else logits

    # -- losses as methods (what a stage calls) ----------------------------------------------------
    @staticmethod
    def discriminator_loss(real_logits, fake_logits) -> torch.Tensor:
        """:func:`hinge_d_loss`."""
        return hinge_d_loss(real_logits, fake_logits)

    @staticmethod
    def generator_loss(fake_logits) -> torch.Tensor:
        """:func:`hinge_g_loss`."""
        return hinge_g_loss(fake_logits)

    @staticmethod
    def r1(inputs, real_logits, gamma: float = 1.0) -> torch.Tensor:
        """:func:`r1_penalty` of ``real_logits`` w.r.t. ``inputs`` (the real image given to ``forward`` as a
        leaf that requires grad, or the token maps from ``return_features=True``)."""
        return r1_penalty(real_logits, inputs, gamma)

    # -- config check (before anything is built) ----------------------------------------------------
    @classmethod
    def validate_config(cls, cfg, error: type[Exception], key: str = "discriminator") -> None:
        """Check the composed config's ``<key>`` node; raise ``error`` with one line. ``tiny`` /
        ``allow_random_init`` only on a toy backbone (its builder declares ``toy``: ``tiny``, ``tiny_random``);
        otherwise the weights of every network must be found (:func:`check_discriminator_weights`)."""
        from omegaconf import OmegaConf

        from sr_lab.config.validation import declared

        node = OmegaConf.select(cfg, key, default=None)
        if node is None:
            return

        def get(name, default=None):
            return OmegaConf.select(node, name, default=default) if OmegaConf.is_config(node) \
                else getattr(node, name, default)

        tiny, allow = bool(get("tiny", False)), bool(get("allow_random_init", False))
        if (tiny or allow) and not bool(declared(cfg, "backbone", "toy", False)):
            flag = "tiny" if tiny else "allow_random_init"
            raise error(f"{key}.{flag}=true is only for smoke runs on backbone=tiny; put the discriminator weights "
                        f"in $SR_LAB_WEIGHTS/<{'|'.join(s.folder for s in TRUNKS.values())}>/ or set {key}.weights")
        trunk, cond = get("trunk", "dinov2_vits14"), get("cond_trunk", "dinov2_vits14")
        p_crop = get("p_crop", 0.5)
        if not isinstance(p_crop, (int, float)) or not 0 <= float(p_crop) <= 1:
            raise error(f"{key}.p_crop={p_crop} must be in [0, 1]")
        layers = get("layers", None)
        if layers is not None and (len(layers) == 0 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                           for v in layers)):
            raise error(f"{key}.layers={list(layers)} must be a non-empty list of block indices >= 0")
        try:
            _needed(trunk, cond)
            arch = TRUNKS[trunk].tiny if tiny else TRUNKS[trunk].full
            if layers is not None and max(layers) >= arch["num_hidden_layers"]:
                raise error(f"{key}.layers={list(layers)}: {'tiny ' if tiny else ''}{TRUNKS[trunk].title} has "
                            f"blocks 0..{arch['num_hidden_layers'] - 1}")
            if not tiny:
                check_discriminator_weights(trunk, get("weights", None), cond)
        except MissingWeights as exc:
            if not allow:
                raise error(f"{key}: {exc}") from None
        except ValueError as exc:
            if isinstance(exc, error):
                raise
            raise error(f"{key}: {exc}") from None

    def extra_repr(self) -> str:
        return (f"trunk={self.trunk_name}, cond_trunk={self.cond_trunk_name}, layers={list(self.layers)}, "
                f"hook_patch={self.hook_patch}, image_size={self.image_size}, cond_image_size={self.cond_image_size}, "
                f"diffaug={self.diffaug}, p_crop={self.p_crop}, random_trunk={self.random_trunk}")


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------
def _cat(logits) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        return logits.reshape(logits.shape[0], -1)
    return torch.cat([l.reshape(l.shape[0], -1) for l in logits], dim=1)


def hinge_d_loss(real_logits, fake_logits) -> torch.Tensor:
    """E[relu(1 − D(x))] + E[relu(1 + D(x̂))] over all tokens of all heads (the AddSR authors: heads
    concatenated, no ½ factor — unlike the LDM loss in :mod:`sr_lab.losses.gan`)."""
    return F.relu(1.0 - _cat(real_logits)).mean() + F.relu(1.0 + _cat(fake_logits)).mean()


def hinge_g_loss(fake_logits) -> torch.Tensor:
    """−E[D(x̂)] over all tokens of all heads."""
    return -_cat(fake_logits).mean()


def r1_penalty(real_logits, inputs, gamma: float = 1.0) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): γ · E_b ‖∇ D(x)‖². With ``inputs`` a list (the token maps from
    ``forward(..., return_features=True)``), the authors' variant: per head the gradient of its summed
    logits w.r.t. its own token map, averaged over heads; with one tensor (e.g. the real image, which
    must require grad) the gradient of all logits w.r.t. it. ``create_graph`` so it trains the heads.
    Off in the authors' runs (``r1_lamda = 0``)."""
    if isinstance(inputs, torch.Tensor):
        grad, = torch.autograd.grad(_cat(real_logits).sum(), inputs, create_graph=True)
        return gamma * grad.reshape(grad.shape[0], -1).pow(2).sum(1).mean()
    if isinstance(real_logits, torch.Tensor) or len(real_logits) != len(inputs):
        raise ValueError("r1_penalty: one input per head's logits")
    terms = []
    for logit, inp in zip(real_logits, inputs):
        grad, = torch.autograd.grad(logit.sum(), inp, create_graph=True)
        terms.append(grad.reshape(grad.shape[0], -1).pow(2).sum(1).mean())
    return gamma * torch.stack(terms).mean()

"""open_clip models built from LOCAL weights only (shared by the CLIP tagger and the CLIP image encoder).

Nothing is downloaded: the architecture is built by ``open_clip.create_model(model, pretrained=None)``
(or, with ``tiny=True``, a very small :data:`TINY_CLIP` for fast CPU tests, which has no published
weights) and the state dict is loaded from ``weights`` (a file, or a folder holding it) or, when
``weights`` is null, from ``<dir>/<model>/open_clip_model.safetensors`` (preferred) or
``open_clip_pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``), then the same two names
directly in ``<dir>``, for ``<dir>`` in ``$SR_LAB_WEIGHTS`` and the torch hub cache
(:func:`sr_lab.utils.weights.search_dirs`). A missing file raises
:class:`~sr_lab.utils.weights.MissingWeights` naming the file and the folder (and, where open_clip knows
one, the Hugging Face repository that publishes it); ``allow_random_init=True`` keeps a seeded random
model instead, with a warning (tests and smoke runs on the ``tiny`` backbone only).

Messages name the config node of the caller: ``key`` (e.g. ``prompt``,
``adapter.branches.image_prompt.clip``) and ``what`` (e.g. ``CLIP tagger``), so one config check
(:func:`check_open_clip_weights`) and one builder (:func:`build_open_clip`) serve every user.

Preprocessing (:func:`clip_preprocess`) is open_clip's eval transform on tensors: the short side resized
(bicubic, antialiased) to the input size, centre crop, CLIP mean/std (:func:`preprocess_cfg`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.utils.weights import MissingWeights, search_dirs

log = logging.getLogger(__name__)

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "TINY_CLIP",
    "WEIGHT_FILES",
    "build_open_clip",
    "check_open_clip_weights",
    "clip_preprocess",
    "known_model",
    "load_open_clip_state",
    "node_get",
    "preprocess_cfg",
    "resolve_open_clip_weights",
    "seeded",
    "url_hint",
]

#: Weight file names searched (in this order) in ``<dir>/<model>/`` and then ``<dir>/``.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: The ``tiny=true`` model: ~1.7M parameters (mostly the 49408-token embedding the tokenizer needs).
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------ weights

def known_model(model: str, key: str = "prompt") -> None:
    """``ValueError`` unless ``model`` is a built-in open_clip architecture (no hub / local-dir names)."""
    import open_clip

    if model not in open_clip.list_models():
        raise ValueError(f"{key}.model={model!r} is not a built-in open_clip architecture (e.g. ViT-B-16, "
                         "ViT-B-16-quickgelu, ViT-L-14); hub and local-dir names are not used (nothing is "
                         f"downloaded): set {key}.weights to the local weight file")


def url_hint(model: str) -> str:
    """A Hugging Face repository publishing open_clip weights of ``model`` (same QuickGELU setting)."""
    try:
        import open_clip
        from open_clip import pretrained as oc_pretrained

        quick = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
        base = model.removesuffix("-quickgelu")
        tags = oc_pretrained.list_pretrained_tags_by_model(base)
        tags = sorted(tags, key=lambda t: not t.startswith("laion2b"))  # prefer LAION-2B for GELU models
        for tag in tags:
            pcfg = oc_pretrained.get_pretrained_cfg(base, tag)
            if pcfg.get("hf_hub") and bool(pcfg.get("quick_gelu", False)) == quick:
                return f"https://huggingface.co/{pcfg['hf_hub'].rstrip('/')} ({WEIGHT_FILES[0]})"
    except Exception:  # noqa: BLE001, S110 - a hint only
        pass
    return ""


def _candidates(model: str) -> list[str]:
    return [f"{model}/{f}" for f in WEIGHT_FILES] + list(WEIGHT_FILES)


def _purpose(model: str, what: str, key: str, option: str | None) -> str:
    label = f"{what} {option}" if option else what
    return f"{label}, model {model}; {WEIGHT_FILES[1]} is accepted too, or set {key}.weights=<file>"


def resolve_open_clip_weights(model: str, weights: str | os.PathLike | None = None, *,
                              what: str = "CLIP", key: str = "prompt", option: str | None = None) -> Path:
    """The local weight file of ``model`` or :class:`MissingWeights` (what to put where).

    ``weights`` a file: that file; a folder: ``<folder>/<model>/`` then ``<folder>/`` for
    :data:`WEIGHT_FILES` (safetensors first); ``None``: the same in ``$SR_LAB_WEIGHTS`` and the torch hub
    cache."""
    purpose = _purpose(model, what, key, option)
    if weights is not None and str(weights) != "":
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            looks_like_file = path.suffix in (".safetensors", ".bin", ".pt", ".pth")
            if looks_like_file:
                raise MissingWeights(path.name, path.parent, purpose, url_hint(model))
            raise MissingWeights(f"{model}/{WEIGHT_FILES[0]}", path, purpose, url_hint(model))
        dirs = [path]
    else:
        dirs = search_dirs(None)
    for d in dirs:
        for name in _candidates(model):
            if (d / name).is_file():
                return d / name
    raise MissingWeights(f"{model}/{WEIGHT_FILES[0]}", dirs[0], purpose, url_hint(model))


def node_get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` of a dict / DictConfig / object node; ``default`` when absent (or null, if the default
    is not null)."""
    if node is None:
        return default
    try:
        value = node.get(key, default)
    except Exception:  # noqa: BLE001 - an object node
        value = getattr(node, key, default)
    return default if value is None and default is not None else value


def _tiny_needs_weights(key: str) -> ValueError:
    return ValueError(f"{key}.tiny=true has no published weights: set {key}.allow_random_init=true "
                      f"(tests / smoke runs on backbone=tiny) or {key}.weights=<file>")


def _tiny_weights_file(weights: Any, what: str, key: str) -> Path:
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise MissingWeights(path.name, path.parent, f"tiny {what}, {key}.weights")
    return path


def check_open_clip_weights(cfg_node: Any, *, key: str = "prompt", what: str = "CLIP",
                            option: str | None = None, default_model: str = "ViT-B-16") -> None:
    """Config check of an open_clip node (``model``, ``weights``, ``tiny``, ``allow_random_init``) before
    any model is built: :class:`MissingWeights` when the weight file is not available locally and
    ``allow_random_init`` is not set; ``ValueError`` on an unknown ``model`` or a ``tiny`` model without
    weights nor ``allow_random_init``."""
    model = str(node_get(cfg_node, "model", default_model))
    weights = node_get(cfg_node, "weights", None)
    tiny = bool(node_get(cfg_node, "tiny", False))
    allow = bool(node_get(cfg_node, "allow_random_init", False))
    if tiny:
        if weights in (None, "") and not allow:
            raise _tiny_needs_weights(key)
        if weights not in (None, ""):
            _tiny_weights_file(weights, what, key)
        return
    known_model(model, key)
    try:
        resolve_open_clip_weights(model, weights, what=what, key=key, option=option)
    except MissingWeights:
        if not allow:
            raise


# ------------------------------------------------------------------------------------------------ building

def _no_pretrained_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No pretrained weights loaded")


def seeded(seed: int, build: Callable[[], _T]) -> _T:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global (CPU) RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def load_open_clip_state(net: nn.Module, path: Path, model_name: str, key: str = "prompt") -> None:
    """Load an open_clip state dict (safetensors, or a ``.bin`` with ``weights_only=True``) strictly;
    ``ValueError`` with one line naming the file otherwise."""
    from open_clip.factory import load_checkpoint

    try:
        load_checkpoint(net, str(path), strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{key}.weights: {path} is not an open_clip state dict of {model_name} "
                         f"({type(exc).__name__}: {first[:300]})") from None


def build_open_clip(model: str, weights: str | os.PathLike | None = None, *, tiny: bool = False,
                    allow_random_init: bool = False, seed: int = 0, what: str = "CLIP", key: str = "prompt",
                    option: str | None = None, owner: str | None = None, random_note: str = "",
                    logger: logging.Logger | None = None) -> tuple[nn.Module, Path | None]:
    """A full open_clip ``CLIP`` (not frozen, train/eval untouched) and the weight file it was loaded from
    (``None``: a seeded random model).

    ``tiny``: :data:`TINY_CLIP`, random unless ``weights`` (a file); else the built-in architecture
    ``model`` with the weights found by :func:`resolve_open_clip_weights`. Missing weights raise
    :class:`MissingWeights` (or ``ValueError`` for ``tiny``) unless ``allow_random_init``, which logs a
    warning (``"<owner>: no weights for <model>, using a RANDOM CLIP (<key>.allow_random_init=true; ...
    <random_note>)"``) and keeps the seeded random initialisation. ``what`` / ``key`` / ``option`` name
    the caller in the messages (``"CLIP tagger"``, ``"prompt"``, ``"prompt=clip_tags"``)."""
    import open_clip

    logger = logger or log
    weights = None if weights in (None, "") else weights
    path: Path | None = None
    if tiny:
        from open_clip.model import CLIP

        if weights is None and not allow_random_init:
            raise _tiny_needs_weights(key)
        if weights is not None:
            path = _tiny_weights_file(weights, what, key)
        net = seeded(seed, lambda: CLIP(**TINY_CLIP))
        model_name = "tiny"
    else:
        model_name = str(model)
        known_model(model_name, key)
        try:
            path = resolve_open_clip_weights(model_name, weights, what=what, key=key, option=option)
        except MissingWeights:
            if not allow_random_init:
                raise
            logger.warning("%s: no weights for %s, using a RANDOM CLIP (%s.allow_random_init=true; "
                           "smoke runs on the tiny backbone only%s)", owner or what, model_name, key, random_note)
        root = logging.getLogger()  # open_clip warns on the root logger that it loaded no weights
        root.addFilter(_no_pretrained_warning)
        try:
            net = seeded(seed, lambda: open_clip.create_model(model_name, pretrained=None))
        finally:
            root.removeFilter(_no_pretrained_warning)
    if path is not None:
        load_open_clip_state(net, path, model_name, key)
    return net, path


# ------------------------------------------------------------------------------------------- preprocessing

def preprocess_cfg(net: nn.Module) -> tuple[tuple[int, int], tuple[float, float, float],
                                            tuple[float, float, float]]:
    """``(image_size (H, W), mean, std)`` of an open_clip model (or of its visual tower)."""
    visual = getattr(net, "visual", net)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    image_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    mean = tuple(float(m) for m in cfg.get("mean", OPENAI_MEAN))
    std = tuple(float(s) for s in cfg.get("std", OPENAI_STD))
    return image_size, mean, std  # type: ignore[return-value]


def clip_preprocess(img01: torch.Tensor, image_size: tuple[int, int], mean, std) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> a CLIP input (float32): the short side resized (bicubic,
    antialiased) to the input size, centre crop, CLIP mean/std."""
    x = img01.float()
    h, w = x.shape[-2:]
    th, tw = image_size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[..., top:top + th, left:left + tw].clamp(0.0, 1.0)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def check_smoke_flags(node: Any, error: type[Exception], key: str, random_backbone: bool,
                      model: str = "<model>") -> None:
    """``<key>.tiny`` / ``<key>.allow_random_init`` (a random CLIP) only on a random smoke-run backbone
    (``random_backbone``, e.g. ``tiny``); otherwise raise ``error`` with one line saying where the weights go."""
    tiny = bool(node_get(node, "tiny", False))
    allow = bool(node_get(node, "allow_random_init", False))
    if (tiny or allow) and not random_backbone:
        flag = "tiny" if tiny else "allow_random_init"
        raise error(f"{key}.{flag}=true is only for smoke runs on backbone=tiny; put the CLIP weights "
                    f"({WEIGHT_FILES[0]}) in $SR_LAB_WEIGHTS/{model}/ or set {key}.weights")

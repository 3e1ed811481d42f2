"""Tag prompts (config group ``prompt``, option ``clip_tags``): CLIP zero-shot tags from a vocabulary.

AddSR (like SeeSR) prompts its student with the tags RAM extracts from the LR image and its teacher with
the tags of the HR image. RAM is not a dependency of sr_lab; :class:`ClipTags` is the stand-in: an
open_clip model scores every tag of a vocabulary as ``"a photo of a <tag>"`` against the image and keeps
the ``top_k`` tags whose score (softmax over the vocabulary, or the raw cosine) reaches ``min_score``, in
score order, as one comma-separated prompt per row (``"dog, grass, tree"``; ``""`` when no tag passes).

``ClipTags(...)(lr01, hr01=None) -> list[str]`` — the prompt-source contract of
:mod:`sr_lab.models.prompts`; ``image="lr"`` tags ``lr01`` (the student), ``image="hr"`` tags ``hr01``
(the teacher; ``lr01`` when no HR is given, e.g. at inference).

Weights come from LOCAL files only (nothing is downloaded): the architecture is built by
``open_clip.create_model(model, pretrained=None)`` and the state dict is loaded from ``weights`` (a file,
or a folder holding it) or, when ``weights`` is null, from ``<dir>/<model>/open_clip_model.safetensors``
(preferred) or ``open_clip_pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``), then the
same two names directly in ``<dir>``, for ``<dir>`` in ``$SR_LAB_WEIGHTS`` and the torch hub cache
(:func:`sr_lab.utils.weights.search_dirs`). E.g. for ``model=ViT-B-16`` (LAION-2B)::

    huggingface-cli download laion/CLIP-ViT-B-16-laion2B-s34B-b88K open_clip_model.safetensors \\
        --local-dir $SR_LAB_WEIGHTS/ViT-B-16

OpenAI's weights use QuickGELU: ``model=ViT-B-16-quickgelu`` with ``timm/vit_base_patch16_clip_224.openai``
(its ``open_clip_model.safetensors``) in ``$SR_LAB_WEIGHTS/ViT-B-16-quickgelu``. A missing file raises
:class:`~sr_lab.utils.weights.MissingWeights` naming the file and the folder, and
:func:`check_clip_tag_weights` raises it from the config node before any model is built.
``allow_random_init=true`` keeps a seeded random model instead (tests and smoke runs on the ``tiny``
backbone only: the tags mean nothing); ``tiny=true`` builds a very small CLIP (no published weights) for
fast CPU tests.

The model is frozen (``requires_grad`` False, eval mode for ever) and is *not* an ``nn.Module`` attribute
of the stage that holds the source, so it never enters a checkpoint; it follows the device of the images
(``device=None``) or stays on ``device``. The vocabulary's text embeddings are computed once and cached.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sr_lab.models.open_clip_models import (  # noqa: F401 - re-exported: tagging's former public names
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_CLIP,
    WEIGHT_FILES,
    build_open_clip,
    check_open_clip_weights,
    check_smoke_flags,
    clip_preprocess,
    known_model,
    load_open_clip_state,
    node_get,
    preprocess_cfg,
    resolve_open_clip_weights,
    seeded,
    url_hint,
)
from sr_lab.utils.weights import MissingWeights

log = logging.getLogger(__name__)

__all__ = [
    "TINY_CLIP",
    "WEIGHT_FILES",
    "ClipTags",
    "check_clip_tag_weights",
    "default_vocabulary",
    "load_vocabulary",
    "resolve_clip_weights",
]

VOCABULARY_FILE = "tag_vocabulary.txt"
SCORES = ("softmax", "cosine")
IMAGES = ("lr", "hr")
#: How the tagger names itself in messages (open_clip_models builds the model for it).
_WHAT, _KEY, _OPTION = "CLIP tagger", "prompt", "prompt=clip_tags"

# former private helpers, now in open_clip_models, kept importable under their old names
_node_get = node_get
_url_hint = url_hint
_seeded = seeded


# --------------------------------------------------------------------------------------------- vocabulary

def _parse_lines(lines: Iterable[str]) -> list[str]:
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _clean(tags: Iterable[Any], where: str) -> list[str]:
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str):
            raise ValueError(f"prompt.vocabulary: tag {t!r} ({where}) is not a string")
        t = " ".join(t.split())
        if not t:
            continue
        if "," in t:
            raise ValueError(f"prompt.vocabulary: tag {t!r} ({where}) contains a comma (tags are joined by ', ')")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError(f"prompt.vocabulary ({where}) holds no tag")
    return out


def default_vocabulary() -> list[str]:
    """The vocabulary shipped with sr_lab (``sr_lab/models/tag_vocabulary.txt``)."""
    text = resources.files("sr_lab.models").joinpath(VOCABULARY_FILE).read_text(encoding="utf-8")
    return _clean(_parse_lines(text.splitlines()), VOCABULARY_FILE)


def load_vocabulary(vocabulary: None | str | os.PathLike | Sequence[str]) -> list[str]:
    """``None``: the default vocabulary; a path: a text file, one tag per line (``#`` comments);
    a list of tags. Blank entries are dropped, duplicates kept once (first place), order kept."""
    if vocabulary is None:
        return default_vocabulary()
    if isinstance(vocabulary, (str, os.PathLike)):
        path = Path(vocabulary).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt.vocabulary={vocabulary} is not a file (a text file with one tag per line, "
                             "a list of tags, or null for the default vocabulary)")
        return _clean(_parse_lines(path.read_text(encoding="utf-8").splitlines()), str(path))
    return _clean(list(vocabulary), "list")


# ------------------------------------------------------------------------------------------------ weights

def _known_model(model: str) -> None:
    known_model(model, _KEY)


def resolve_clip_weights(model: str = "ViT-B-16", weights: str | os.PathLike | None = None) -> Path:
    """The local weight file of ``model`` or :class:`MissingWeights` (what to put where).

    ``weights`` a file: that file; a folder: ``<folder>/<model>/`` then ``<folder>/`` for
    :data:`WEIGHT_FILES` (safetensors first); ``None``: the same in ``$SR_LAB_WEIGHTS`` and the torch hub
    cache."""
    return resolve_open_clip_weights(model, weights, what=_WHAT, key=_KEY, option=_OPTION)


def check_clip_tag_weights(cfg_node: Any) -> None:
    """Config check of a ``prompt=clip_tags`` node (``model``, ``weights``, ``tiny``,
    ``allow_random_init``) before any model is built: :class:`MissingWeights` when the weight file is not
    available locally and ``allow_random_init`` is not set; ``ValueError`` on an unknown ``model`` or a
    ``tiny`` model without weights nor ``allow_random_init``."""
    check_open_clip_weights(cfg_node, key=_KEY, what=_WHAT, option=_OPTION, default_model="ViT-B-16")


# ------------------------------------------------------------------------------------------------- tagger

@functools.lru_cache(maxsize=4)
def _tokenizer(model: str | None):
    """open_clip's tokenizer of ``model`` (its BPE vocabulary ships with open_clip; ``None``: the CLIP
    tokenizer with 77 tokens, for the tiny model), built once per process."""
    import open_clip

    if model is None:
        return open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(model)


class ClipTags:
    """Per-sample tag prompts: ``(lr01, hr01=None) -> list[str]``, one ``"tag, tag, ..."`` per row.

    Args:
        model: an open_clip architecture name (``ViT-B-16``; ``ViT-B-16-quickgelu`` for OpenAI weights).
        weights: the local weight file (or a folder holding it); ``None``: searched (module docstring).
        vocabulary: ``None`` (the shipped ``tag_vocabulary.txt``), a list of tags or a text file.
        top_k: at most this many tags per image.
        min_score: keep tags whose score is >= this (softmax probability over the vocabulary, or cosine).
        score: ``softmax`` (``logit_scale * cos`` over the vocabulary) or ``cosine``.
        image: ``lr`` (AddSR's student) or ``hr`` (the teacher; the LR when no HR is given).
        template: the text each tag is embedded in.
        allow_random_init: keep a seeded random model when the weights are missing (smoke runs only).
        tiny: a ~1.7M-parameter CLIP (:data:`TINY_CLIP`) for fast CPU tests; random unless ``weights``.
        seed: the seed of a random initialisation.
        device: where the model runs; ``None``: the device of the images.
        batch_size: images (and vocabulary prompts) encoded per forward.
    """

    def __init__(self, model: str = "ViT-B-16", weights: str | None = None,
                 vocabulary: None | str | Sequence[str] = None, top_k: int = 5, min_score: float = 0.01,
                 score: str = "softmax", image: str = "lr", template: str = "a photo of a {tag}",
                 allow_random_init: bool = False, tiny: bool = False, seed: int = 0,
                 device: str | torch.device | None = None, batch_size: int = 64):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"prompt.top_k={top_k} must be a positive integer")
        if score not in SCORES:
            raise ValueError(f"prompt.score={score!r} must be one of {list(SCORES)}")
        if image not in IMAGES:
            raise ValueError(f"prompt.image={image!r} must be one of {list(IMAGES)}")
        if not isinstance(min_score, (int, float)) or isinstance(min_score, bool):
            raise ValueError(f"prompt.min_score={min_score!r} must be a number")
        if score == "softmax" and not 0.0 <= float(min_score) <= 1.0:
            raise ValueError(f"prompt.min_score={min_score} must be a probability in [0, 1] with score=softmax")
        if "{tag}" not in template:
            raise ValueError(f"prompt.template={template!r} must contain '{{tag}}'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"prompt.batch_size={batch_size} must be a positive integer")
        self.model_name = "tiny" if tiny else str(model)
        self.vocabulary = load_vocabulary(vocabulary)
        self.top_k, self.min_score, self.score = int(top_k), float(min_score), score
        self.image, self.template, self.batch_size = image, template, batch_size
        self.device = None if device is None else torch.device(device)
        self.weights_path: Path | None = None

        net, self.weights_path = build_open_clip(
            self.model_name, weights, tiny=tiny, allow_random_init=allow_random_init, seed=seed,
            what=_WHAT, key=_KEY, option=_OPTION, owner="ClipTags", random_note=": the tags mean nothing",
            logger=log)
        tokenizer = _tokenizer(None if tiny else self.model_name)
        self.random_weights = self.weights_path is None
        self.image_size, self.mean, self.std = preprocess_cfg(net)
        net.requires_grad_(False)
        net.eval()
        self.model = net.to(self.device) if self.device is not None else net
        self.tokenizer = tokenizer
        self._text: torch.Tensor | None = None  # (V, D), L2-normalised, on the model's device

    # -- construction helpers
    def _load(self, net: torch.nn.Module, path: Path) -> None:
        load_open_clip_state(net, path, self.model_name, _KEY)

    # -- state
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to(self, device: torch.device) -> None:
        if self._model_device() != device:
            self.model.to(device)
            if self._text is not None:
                self._text = self._text.to(device)

    @torch.no_grad()
    def text_features(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(V, D) L2-normalised embeddings of the vocabulary prompts, computed once (cached)."""
        if device is not None:
            self._to(torch.device(device))
        if self._text is None:
            device = self._model_device()
            prompts = [self.template.format(tag=t) for t in self.vocabulary]
            feats = []
            with torch.autocast(device.type, enabled=False):
                for i in range(0, len(prompts), max(self.batch_size, 256)):
                    tokens = self.tokenizer(prompts[i:i + max(self.batch_size, 256)]).to(device)
                    feats.append(self.model.encode_text(tokens).float())
            self._text = F.normalize(torch.cat(feats), dim=-1)
        return self._text

    def preprocess(self, img01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> the model's input: the short side resized (bicubic,
        antialiased) to the input size, centre crop, CLIP mean/std."""
        return clip_preprocess(img01, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def scores(self, img01: torch.Tensor) -> torch.Tensor:
        """(B, V) score of every vocabulary tag for every image (softmax probability or cosine)."""
        if img01.ndim != 4 or img01.shape[1] != 3:
            raise ValueError(f"ClipTags expects images (B, 3, H, W) in [0, 1], got {tuple(img01.shape)}")
        if self.model.training:
            self.model.eval()
        self._to(self.device if self.device is not None else img01.device)
        device = self._model_device()
        text = self.text_features()
        out = []
        with torch.autocast(device.type, enabled=False):
            for i in range(0, img01.shape[0], self.batch_size):
                pixels = self.preprocess(img01[i:i + self.batch_size].to(device))
                feats = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
                cos = feats @ text.T
                if self.score == "softmax":
                    scale = self.model.logit_scale.exp().float().clamp(max=100.0)
                    cos = torch.softmax(scale * cos, dim=-1)
                out.append(cos)
        return torch.cat(out)

    def tags(self, img01: torch.Tensor) -> list[list[str]]:
        """Per image, the top-k tags with score >= ``min_score``, best first (ties: vocabulary order)."""
        s = self.scores(img01).cpu()
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        return [[self.vocabulary[j] for j in row.tolist() if s[b, j] >= self.min_score]
                for b, row in enumerate(order)]

    def __call__(self, lr01: torch.Tensor, hr01: torch.Tensor | None = None) -> list[str]:
        img = hr01 if (self.image == "hr" and hr01 is not None) else lr01
        if img.shape[0] != lr01.shape[0]:
            raise ValueError(f"ClipTags: hr01 has {img.shape[0]} rows for {lr01.shape[0]} LR rows")
        return [", ".join(t) for t in self.tags(img)]

    @classmethod
    def validate_config(cls, cfg: Any, error: type[Exception], key: str = "prompt") -> None:
        """Check the composed config's ``<key>`` node before any model is built; raise ``error`` with one
        line. ``allow_random_init`` / ``tiny`` are accepted only on a toy backbone (its
        builder declares ``toy``: ``tiny``, ``tiny_random``)."""
        from omegaconf import OmegaConf

        from sr_lab.config.validation import declared

        node = OmegaConf.select(cfg, key, default=None)
        toy_backbone = bool(declared(cfg, "backbone", "toy", False))
        check_smoke_flags(node, error, key, toy_backbone)
        try:
            check_clip_tag_weights(node)
        except (MissingWeights, ValueError) as exc:
            raise error(f"{key}: {exc}") from None

    def __repr__(self) -> str:
        return (f"ClipTags(model={self.model_name!r}, tags={len(self.vocabulary)}, top_k={self.top_k}, "
                f"min_score={self.min_score}, score={self.score!r}, image={self.image!r}, "
                f"random_weights={self.random_weights})")

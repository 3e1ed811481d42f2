"""Reading a pretrained tiny prior folder (``make pretrain-tiny``, :mod:`sr_lab.pretrain.tiny`).

A folder holds ``unet.safetensors``, ``vae.safetensors``, ``card.json`` (recipe, quality, sha256 of every
file) and ``samples.png``. :func:`load_tiny_prior` reads the weights with ``safetensors`` only (no pickle,
no code execution) after checking each file's sha256 against the card.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["CARD_FORMAT", "DEFAULT_PRIOR_DIR", "TinyPriorError", "WEIGHT_FILES", "file_sha256", "load_tiny_prior"]

CARD_FORMAT = "sr_lab.tiny_prior/1"
#: where ``make pretrain-tiny`` writes by default
DEFAULT_PRIOR_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_prior"
WEIGHT_FILES = ("unet.safetensors", "vae.safetensors")


class TinyPriorError(RuntimeError):
    """A tiny prior folder that is missing, incomplete or altered."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_tiny_prior(folder: str | Path = DEFAULT_PRIOR_DIR) -> tuple[dict, dict, dict]:
    """``(unet_state, vae_state, card)`` of a tiny prior folder.

    Every weight file must be listed in ``card.json`` with its sha256 and match it; a missing file, an
    unlisted one or a hash mismatch raises :class:`TinyPriorError` naming the file. The VAE's latent
    scaling factor is ``card["scaling_factor"]`` (``vae.register_to_config(scaling_factor=...)`` before
    building a :class:`~sr_lab.models.backbone.Backbone`); the text encoder is ``build_tiny(card["seed"])``'s.
    """
    from safetensors.torch import load_file

    root = Path(folder).expanduser()
    card_path = root / "card.json"
    if not card_path.is_file():
        raise TinyPriorError(f"{root}: no card.json (not a tiny prior folder; make one with `make pretrain-tiny`)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TinyPriorError(f"{card_path}: unreadable card ({exc})") from exc
    if card.get("format") != CARD_FORMAT:
        raise TinyPriorError(f"{card_path}: format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    files = card.get("files", {})
    states = []
    for name in WEIGHT_FILES:
        path = root / name
        expected = files.get(name, {}).get("sha256")
        if expected is None:
            raise TinyPriorError(f"{card_path}: no sha256 recorded for {name}")
        if not path.is_file():
            raise TinyPriorError(f"{path}: missing (the card lists it)")
        actual = file_sha256(path)
        if actual != expected:
            raise TinyPriorError(f"{path}: sha256 mismatch (card {expected[:16]}..., file {actual[:16]}...): "
                                 f"the file was modified or is corrupt; rebuild it with `make pretrain-tiny`")
        states.append(load_file(str(path)))
    return states[0], states[1], card

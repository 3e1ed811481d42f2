"""Read a trained stage back: its resolved config and its trainable tensors.

A stage is referenced by

* an export folder ``<run>/export`` (``config.yaml`` + ``trainable.safetensors``, what ``sr-train``
  writes at the end of a run),
* the ``trainable.safetensors`` file inside one, or
* a Lightning checkpoint ``*.ckpt`` written by an sr_lab module (``state_dict`` holds the trainable
  tensors, ``sr_lab.config`` the resolved run config).

Used by the stages that build on a frozen stage 1 (``stablesr_latents``, ``ccsr_stage2``): they rebuild
the stage-1 adapter from the stage's *own* stored config (so the adapter settings always match the
weights) on the current backbone, and load its weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["StageFiles", "read_stage", "load_frozen_adapter", "describe_stage_path"]


def describe_stage_path(path: str | Path) -> str | None:
    """``None`` if ``path`` looks like a readable stage, else a one-line reason."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        missing = [n for n in ("config.yaml", "trainable.safetensors") if not (p / n).is_file()]
        return f"{p} lacks {', '.join(missing)} (expected an sr-train export folder)" if missing else None
    if p.is_file():
        if p.suffix == ".ckpt":
            return None
        if p.suffix == ".safetensors":
            return None if (p.parent / "config.yaml").is_file() else f"{p.parent} has no config.yaml next to {p.name}"
        return f"{p} is neither an export folder, a .safetensors export nor a .ckpt checkpoint"
    return f"{p} does not exist"


class StageFiles:
    """``config`` (DictConfig of the stage's resolved run config) and ``state`` (trainable tensors)."""

    def __init__(self, config: DictConfig, state: dict[str, torch.Tensor], source: Path):
        self.config, self.state, self.source = config, state, source

    def sub_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix stripped (e.g. ``adapter``)."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.state.items() if k.startswith(p)}


def read_stage(path: str | Path) -> StageFiles:
    """Read an export folder, its ``trainable.safetensors`` or an sr_lab ``.ckpt`` (see module doc)."""
    reason = describe_stage_path(path)
    if reason:
        raise FileNotFoundError(f"stage {path}: {reason}")
    p = Path(str(path)).expanduser().resolve()
    if p.suffix == ".ckpt":
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        cfg = (ckpt.get("sr_lab") or {}).get("config")
        if cfg is None:
            raise ValueError(f"stage {p}: checkpoint has no sr_lab config (not written by sr-train?)")
        return StageFiles(OmegaConf.create(cfg), dict(ckpt["state_dict"]), p)
    from safetensors.torch import load_file

    weights = p if p.suffix == ".safetensors" else p / "trainable.safetensors"
    cfg = OmegaConf.load(weights.parent / "config.yaml")
    return StageFiles(cfg, load_file(str(weights)), p)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def load_frozen_adapter(path: str | Path, backbone: nn.Module) -> tuple[nn.Module, str, StageFiles]:
    """Rebuild the adapter of the diffusion stage at ``path`` on ``backbone``'s UNet, load its weights,
    freeze it. Returns ``(adapter, prompt, stage_files)``; ``prompt`` is the stage's training prompt."""
    from hydra.utils import instantiate

    stage = read_stage(path)
    mcfg = stage.config.get("module")
    if mcfg is None or mcfg.get("adapter") is None:
        raise ValueError(f"stage {path}: its config has no module.adapter (not a diffusion adapter stage)")
    ours, theirs = getattr(backbone, "name", "?"), _backbone_name(stage.config)
    if theirs and ours != theirs:
        log.warning("stage %s was trained on backbone %s, loading it on %s", path, theirs, ours)
    factory: Any = instantiate(mcfg.adapter)
    adapter = factory(backbone.unet) if not isinstance(factory, nn.Module) else factory
    state = stage.sub_state("adapter")
    expected = {n for n, _ in adapter.named_parameters()}
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"stage {path}: lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    result = adapter.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"stage {path}: unexpected adapter tensors, e.g. {result.unexpected_keys[:3]}")
    return _freeze(adapter), str(mcfg.get("prompt", "") or ""), stage


def _backbone_name(cfg: DictConfig) -> str | None:
    target = str(OmegaConf.select(cfg, "backbone._target_", default="") or "")
    if target.endswith("build_tiny"):
        return "tiny"
    if target.endswith("load_pretrained"):
        return str(OmegaConf.select(cfg, "backbone.name", default="sd21_base"))
    return None

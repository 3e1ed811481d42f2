"""Load a trained stage for inference from what ``sr_lab.train`` writes.

A *source* is either

* an export folder ``<run>/export/`` with ``config.yaml`` (the full resolved Hydra config) and
  ``trainable.safetensors`` (the trainable tensors, keys = LightningModule state_dict names), the
  ``trainable.safetensors`` file itself, or a run folder that contains ``export/``; or
* a Lightning checkpoint ``<run>/checkpoints/*.ckpt`` (``state_dict`` = trainable tensors,
  ``sr_lab.config`` = the resolved config), read with ``weights_only=True``.

The stage is rebuilt with one ``hydra.utils.instantiate(cfg.module)`` (the module config pulls the
backbone, adapter, loss and sampler in; the frozen backbone comes from its own source), the stored
tensors are loaded strictly (each must exist in the module with the same shape, and every trainable
tensor of the module must be stored), and the module is put in eval mode without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["StageLoadError", "StageSource", "read_stage_source", "build_stage", "load_stage"]


class StageLoadError(RuntimeError):
    """A checkpoint/export that cannot be used (one line naming the file)."""


@dataclass
class StageSource:
    path: Path                       # the file the tensors come from
    config: DictConfig               # the stored, resolved training config
    state: dict[str, torch.Tensor]   # the stored trainable tensors


def _resolve_folder(p: Path) -> Path:
    if not (p / "config.yaml").exists() and (p / "export").is_dir():
        return p / "export"  # a run folder
    return p


def read_stage_source(source: str | Path) -> StageSource:
    """Read config + tensors of an export folder, run folder or ``.ckpt`` (no model is built)."""
    p = Path(str(source)).expanduser()
    if not p.exists():
        raise StageLoadError(f"checkpoint {source} does not exist (give an export folder with config.yaml + "
                             f"trainable.safetensors, a run folder, or a .ckpt file)")
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent  # the trainable.safetensors inside an export folder
    if p.is_dir():
        p = _resolve_folder(p)
        cfg_file, weights = p / "config.yaml", p / "trainable.safetensors"
        missing = [f.name for f in (cfg_file, weights) if not f.is_file()]
        if missing:
            raise StageLoadError(f"checkpoint folder {p} lacks {' and '.join(missing)} (written by sr_lab.train "
                                 f"to <run>/export/)")
        from safetensors.torch import load_file

        try:
            cfg = OmegaConf.load(cfg_file)
            state = load_file(str(weights))
        except Exception as exc:  # corrupt yaml/safetensors
            raise StageLoadError(f"cannot read {weights if cfg_file.exists() else cfg_file}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return StageSource(weights, cfg, state)
    if p.suffix != ".ckpt":
        raise StageLoadError(f"checkpoint {p} is neither an export/run folder, a trainable.safetensors "
                             f"nor a .ckpt file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StageLoadError(f"cannot read checkpoint {p}: {type(exc).__name__}: {exc}") from exc
    config = (ckpt.get("sr_lab") or {}).get("config") if isinstance(ckpt, dict) else None
    if not config or "state_dict" not in ckpt:
        raise StageLoadError(f"checkpoint {p} has no sr_lab config/state_dict (not written by sr_lab.train?)")
    return StageSource(p, OmegaConf.create(config), dict(ckpt["state_dict"]))


def build_stage(src: StageSource, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Instantiate ``src.config.module`` and load ``src.state`` strictly; eval mode, no grad."""
    import hydra

    if "module" not in src.config:
        raise StageLoadError(f"{src.path}: stored config has no 'module' section")
    module = hydra.utils.instantiate(src.config.module)
    own = module.state_dict()
    unknown = sorted(set(src.state) - set(own))
    if unknown:
        raise StageLoadError(f"{src.path}: {len(unknown)} stored tensors do not exist in "
                             f"{type(module).__name__}, e.g. {unknown[:3]} (written by another stage or adapter?)")
    bad = [k for k, v in src.state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise StageLoadError(f"{src.path}: tensor {k} has shape {tuple(src.state[k].shape)}, the module expects "
                             f"{tuple(own[k].shape)} ({len(bad)} mismatches)")
    if hasattr(module, "trainable_state_keys"):
        lacking = sorted(set(module.trainable_state_keys()) - set(src.state))
        if lacking:
            raise StageLoadError(f"{src.path}: lacks {len(lacking)} trainable tensors of {type(module).__name__}, "
                                 f"e.g. {lacking[:3]}")
    module.load_state_dict(src.state, strict=False)
    module.eval()
    module.requires_grad_(False)
    module.to(device=torch.device(device))
    if dtype is not None:
        module.to(dtype=dtype)
    return module


def load_stage(source: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, DictConfig]:
    """(stage module in eval mode, its stored training config) from an export folder, run folder or
    ``.ckpt``. Raises :class:`StageLoadError` with one line naming the file when it cannot."""
    src = read_stage_source(source)
    return build_stage(src, device, dtype), src.config

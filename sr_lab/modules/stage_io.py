"""The stage layer: read a trained stage from any of the places sr_lab writes one, rebuild it safely.

A stage is referenced (``checkpoint=``, ``decoder_checkpoint=``, ``stage1=``, an AddSR teacher) by

* a run folder ``<run>`` (its ``export/`` is used),
* an export folder ``<run>/export`` (``config.yaml`` + ``trainable.safetensors``, what ``sr-train``
  writes at the end of a run) or the ``trainable.safetensors`` file inside one, or
* a Lightning checkpoint ``*.ckpt`` written by an sr_lab module (``state_dict`` = the trainable tensors,
  ``sr_lab.config`` = the resolved run config), read with ``weights_only=True``.

EMA weights (``ema.decay``, :mod:`sr_lab.ema`) are used when the source has them and ``ema=True`` (the
default): an export folder's ``trainable_ema.safetensors`` (same keys as ``trainable.safetensors``), a
checkpoint's EMA callback state (``callbacks[EMA_STATE_KEY]``). A named ``.safetensors`` file is used as
named. :attr:`StageSource.ema` says which weights were read, :attr:`StageSource.path` the file.

:func:`read_stage_source` reads config + tensors (no model is built) and names the file that is wrong
when one is. :func:`build_stage` rebuilds the stage with one instantiate of its stored ``module`` config
— optionally on a given, shared frozen backbone (chained stages: StableSR's latent records, CCSR stage
2, a teacher and a student on one backbone) — and restores every tensor the stage trained (branches,
LoRA, decoders, discriminator): a stored tensor the module lacks, a shape mismatch, or a trainable tensor
the file lacks is a one-line :class:`StageLoadError`. ``trainable=True`` returns it ready to train
(exactly the stored tensors get ``requires_grad``: a student initialised from a teacher is one call).

The stored config is untrusted input: before anything is instantiated, every ``_target_`` of the nodes
that are built (``module``, and the stored ``sampler`` that ``sr-infer`` falls back on) must be an
allow-listed sr_lab class or function (:mod:`sr_lab.config.safe_instantiate`); a crafted config (e.g.
``module._target_: torch.load`` on a pickle) is refused with one line naming the target, and runs nothing.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sr_lab.config.safe_instantiate import UnsafeTarget, check_targets, safe_instantiate

log = logging.getLogger(__name__)

__all__ = ["EMA_FILE", "EMA_STATE_KEY", "StageLoadError", "StageSource", "describe_stage_path",
           "unreadable_stage_files", "read_stage_source",
           "build_stage", "load_stage", "load_frozen_stage", "stored_config_file"]

EMA_FILE = "trainable_ema.safetensors"  # the EMA weights next to trainable.safetensors in an export
EMA_STATE_KEY = "sr_lab.EMA"            # the EMA callback's state key in a Lightning checkpoint

HOW = "give a run folder, an export folder (config.yaml + trainable.safetensors), its trainable.safetensors or a .ckpt"


class StageLoadError(RuntimeError):
    """A checkpoint/export that cannot be used (one line naming the file)."""


@dataclass
class StageSource:
    path: Path                       # the file the tensors come from
    config: DictConfig               # the stored, resolved training config
    state: dict[str, torch.Tensor]   # the stored trainable tensors
    ema: bool = False                # the tensors are the EMA weights (trainable_ema / the ckpt's EMA state)

    @property
    def config_file(self) -> Path:
        """The file the stored config comes from (an export's ``config.yaml``, else the ``.ckpt``)."""
        return stored_config_file(self.path)

    def sub_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix stripped."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.state.items() if k.startswith(p)}


def _resolve(source: str | Path) -> Path:
    """The folder (export) or file a source names; a run folder resolves to its ``export/``."""
    p = Path(str(source)).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent
    if p.is_dir() and not (p / "config.yaml").exists() and (p / "export").is_dir():
        return p / "export"
    return p


def stored_config_file(weights: str | Path) -> Path:
    """Where the config of the stage whose tensors are in ``weights`` is stored: the ``config.yaml`` next to
    a ``.safetensors`` file, else the checkpoint itself (errors about the config name this file)."""
    p = Path(weights)
    return p.parent / "config.yaml" if p.suffix == ".safetensors" else p


def describe_stage_path(path: str | Path) -> str | None:
    """``None`` if ``path`` looks like a readable stage (no file is parsed), else a one-line reason."""
    p = _resolve(path)
    if not p.exists():
        return f"{path} does not exist ({HOW})"
    if p.is_dir():
        named = Path(str(path)).expanduser()
        if named.is_file() and named.suffix == ".safetensors":  # read with the config.yaml of its folder
            if not (p / "config.yaml").is_file():
                return (f"{named}: its folder {p} lacks config.yaml (a .safetensors file is read as part of an "
                        f"export; {HOW})")
            return None
        missing = [n for n in ("config.yaml", "trainable.safetensors") if not (p / n).is_file()]
        return f"{p} lacks {' and '.join(missing)} ({HOW})" if missing else None
    if p.suffix != ".ckpt":
        return f"{p} is neither a run/export folder, a trainable.safetensors nor a .ckpt file"
    return None


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def unreadable_stage_files(source: str | Path) -> str | None:
    """``None`` if the stage files at ``source`` (which :func:`describe_stage_path` accepted) can be
    opened, else one line naming the file that is wrong. Cheap: no tensor is loaded — an export's
    ``config.yaml`` is parsed and its weights file's safetensors header read; a ``.ckpt`` must be a
    readable PyTorch zip archive."""
    p = _resolve(source)
    if p.is_dir():
        cfg_file, weights = p / "config.yaml", p / "trainable.safetensors"
        named = Path(str(source)).expanduser()
        if named.is_file() and named.suffix == ".safetensors":
            weights = named
        elif (p / EMA_FILE).is_file():  # what load_frozen_stage reads (ema=True)
            weights = p / EMA_FILE
        try:
            cfg = OmegaConf.load(cfg_file)
        except Exception as exc:  # noqa: BLE001 - unparsable yaml
            return f"{cfg_file} cannot be read: {_short(exc)}"
        if not isinstance(cfg, DictConfig) or "module" not in cfg:
            return f"{cfg_file} is not a stored stage config (no module section)"
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - corrupt / truncated header
            return f"{weights} cannot be read: {_short(exc)}"
        return None
    try:
        with zipfile.ZipFile(p) as z:
            z.namelist()
    except Exception as exc:  # noqa: BLE001 - not a zip (torch.save) archive, or truncated
        return f"{p} cannot be read as a PyTorch checkpoint: {_short(exc)}"
    return None


# the stored nodes that are built: the stage module (build_stage) and the sampler that sr-infer takes
# from the stored config when none is chosen (sr_lab/inference/run.py)
_BUILT_NODES = ("module", "sampler")


def _check_stored_targets(src: StageSource) -> StageSource:
    """Refuse a stored config whose built nodes name a non-allow-listed ``_target_`` (one line)."""
    for key in _BUILT_NODES:
        if key not in src.config:
            continue
        try:
            check_targets(src.config[key], "stored config", key=key)
        except UnsafeTarget as exc:
            raise StageLoadError(f"{src.config_file}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - e.g. the node itself does not resolve
            raise StageLoadError(f"{src.config_file}: stored config refuses {key} (cannot be resolved: "
                                 f"{type(exc).__name__})") from exc
    return src


def read_stage_source(source: str | Path, ema: bool = True) -> StageSource:
    """Config + tensors of a run folder, export folder, ``trainable.safetensors`` or ``.ckpt`` (no model
    is built); the stored config's built nodes are checked against the allow-list. ``ema``: take the EMA
    weights where the source has them (``trainable_ema.safetensors``, a checkpoint's EMA state); a named
    ``trainable.safetensors`` / ``trainable_ema.safetensors`` file is read as named."""
    reason = describe_stage_path(source)
    if reason:
        raise StageLoadError(f"checkpoint {reason}")
    p = _resolve(source)
    if p.is_dir():
        from safetensors.torch import load_file

        cfg_file, weights = p / "config.yaml", p / "trainable.safetensors"
        named = Path(str(source)).expanduser()
        if named.is_file() and named.name in (weights.name, EMA_FILE):
            weights = named
        elif ema and (p / EMA_FILE).is_file():
            weights = p / EMA_FILE
        try:
            cfg = OmegaConf.load(cfg_file)
        except Exception as exc:  # noqa: BLE001 - unparsable yaml
            raise StageLoadError(f"cannot read {cfg_file}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]}") from exc
        if not isinstance(cfg, DictConfig):
            raise StageLoadError(f"cannot read {cfg_file}: not a mapping of config keys")
        try:
            state = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001 - corrupt / truncated safetensors
            raise StageLoadError(f"cannot read {weights}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]}") from exc
        return _check_stored_targets(StageSource(weights, cfg, state, ema=weights.name == EMA_FILE))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise StageLoadError(f"cannot read checkpoint {p}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}") from exc
    config = (ckpt.get("sr_lab") or {}).get("config") if isinstance(ckpt, dict) else None
    if not config or "state_dict" not in ckpt:
        raise StageLoadError(f"checkpoint {p} has no sr_lab config/state_dict (not written by sr_lab.train?)")
    state = dict(ckpt["state_dict"])
    averaged = ((ckpt.get("callbacks") or {}).get(EMA_STATE_KEY) or {}).get("ema") if ema else None
    if averaged:  # the EMA callback's state: the same trainable keys
        state.update({k: v.to(state[k].dtype) for k, v in averaged.items() if k in state})
    return _check_stored_targets(StageSource(p, OmegaConf.create(config), state, ema=bool(averaged)))


def build_stage(src: StageSource, device: str | torch.device | None = "cpu", dtype: torch.dtype | None = None,
                *, backbone: nn.Module | None = None, trainable: bool = False) -> nn.Module:
    """Instantiate ``src.config.module`` (on ``backbone`` if given, else on the backbone its config
    names) and restore ``src.state`` strictly. Frozen and in eval mode unless ``trainable``: then exactly
    the stored tensors train. ``device=None`` leaves the module where it was built."""
    if "module" not in src.config:
        raise StageLoadError(f"{src.config_file}: stored config has no 'module' section")
    if backbone is not None:
        ours, theirs = getattr(backbone, "name", "?"), _backbone_name(src.config)
        if theirs and ours != theirs:
            log.warning("stage %s was trained on backbone %s, loading it on %s", src.path, theirs, ours)
    try:
        kwargs = {"backbone": backbone} if backbone is not None else {}
        module = safe_instantiate(src.config.module, where="stored config", **kwargs)
    except UnsafeTarget as exc:
        raise StageLoadError(f"{src.config_file}: {exc}") from exc
    own = module.state_dict()
    # tensors of parts a stage builds only to train (AddSR's discriminator heads) are skipped when the
    # rebuilt module does not hold those parts
    skip = tuple(getattr(module, "training_only_prefixes", ()))
    state = {k: v for k, v in src.state.items() if k in own or not k.startswith(skip)} if skip else src.state
    src = replace(src, state=state)
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
    if trainable:
        for name, p in module.named_parameters():
            p.requires_grad_(name in src.state)
    else:
        module.eval()
        module.requires_grad_(False)
    if device is not None:
        module.to(device=torch.device(device))
    if dtype is not None:
        module.to(dtype=dtype)
    return module


def load_stage(source: str | Path, device: str | torch.device | None = "cpu", dtype: torch.dtype | None = None,
               *, backbone: nn.Module | None = None, trainable: bool = False,
               ema: bool = True) -> tuple[nn.Module, DictConfig]:
    """(stage module, its stored training config) from a run folder, export folder, safetensors or
    ``.ckpt`` (its EMA weights where it has them, unless ``ema=False``). Raises :class:`StageLoadError`
    with one line naming the file when it cannot."""
    src = read_stage_source(source, ema=ema)
    return build_stage(src, device, dtype, backbone=backbone, trainable=trainable), src.config


def load_frozen_stage(source: str | Path, backbone: nn.Module) -> nn.Module:
    """The trained stage at ``source`` rebuilt frozen on the shared ``backbone`` (chained stages)."""
    return load_stage(source, device=None, backbone=backbone)[0]


def _backbone_name(cfg: DictConfig) -> str | None:
    """The stage's backbone: its config's ``backbone.name``, else the name its builder declares
    (:func:`~sr_lab.models.backbone.backbone_builder`); None when the builder declares none. The stored
    config is untrusted: a builder outside the allow-list of :mod:`sr_lab.config.safe_instantiate` is not
    even imported (None)."""
    from sr_lab.config.safe_instantiate import UnsafeTarget, check_targets
    from sr_lab.config.validation import declared

    try:
        check_targets({"_target_": str(OmegaConf.select(cfg, "backbone._target_", default="") or "")},
                      key="backbone")
    except UnsafeTarget:
        return None
    default = declared(cfg, "backbone", "backbone_name")
    if default is None:
        return None
    return str(OmegaConf.select(cfg, "backbone.name", default=default))

"""Run inference with N seeds from inside ``sr-eval`` (the ``infer`` node = ``conf/infer.yaml``).

``conf/eval.yaml`` includes ``conf/infer.yaml`` as its node ``infer`` (defaults entry
``infer@infer``), so every inference knob is an eval override (``infer.seeds=[0,1,2]``,
``infer.sampler.t_max=0.5``, ``infer.cfg_scale=3``, ``infer.color_fix=wavelet``, a sampler option
with ``sampler@infer.sampler=ddim``) and Hydra multirun sweeps over them. :func:`infer_config`
turns the node into the standalone config :func:`sr_lab.inference.run.run_inference` expects:
``input`` = the eval ``lr_dir``, ``output_dir`` = ``<eval output>/infer``, the node's own
``hydra`` block dropped, and every other interpolation resolved against the eval config (so sweep
recipes can compute knobs, e.g. ``${variants.${variant}.t_max}``).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["infer_config", "run_inference_for_eval", "executed_steps"]


def infer_config(cfg: DictConfig, output_dir: str | Path) -> DictConfig:
    """The standalone inference config of an eval config (module docstring)."""
    full = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    node = full.infer
    if "hydra" in node:
        del node["hydra"]
    node.output_dir = str(output_dir)
    node.input = str(cfg.lr_dir) if cfg.get("lr_dir") else node.get("input", "???")
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))


def run_inference_for_eval(cfg: DictConfig, out_dir: Path) -> tuple[Path, dict]:
    """Run inference into ``out_dir/infer``; returns (that folder, its run.json)."""
    from sr_lab.inference.run import run_inference

    icfg = infer_config(cfg, out_dir / "infer")
    path = Path(run_inference(icfg))
    meta_file = path / "run.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return path, meta


def executed_steps(sampler: dict, num_timesteps: int = 1000) -> int | None:
    """Number of denoising steps a sampler config executes, as the sampler declares it (CCSR Table 5 "S":
    the DDPM steps after the one-step prediction at T); ``None`` if it cannot be derived."""
    from sr_lab.diffusion.samplers.registry import sampler_executed_steps

    if not sampler or "_target_" not in sampler:
        return None
    try:
        return sampler_executed_steps(sampler, num_timesteps)
    except (TypeError, ValueError, ImportError, AttributeError):
        return None


def model_calls(sampler: dict, num_timesteps: int = 1000) -> int | None:
    """Denoiser evaluations per image and seed: the length of the sampler's timestep list."""
    from sr_lab.diffusion.samplers import sampler_timesteps

    try:
        return len(sampler_timesteps(sampler, num_timesteps))
    except (TypeError, ValueError, ImportError, AttributeError, KeyError):
        return None


def num_timesteps_of(checkpoint: str | Path) -> int:
    """T of a checkpoint's training config (export folder / run folder); 1000 if it cannot be read."""
    p = Path(str(checkpoint))
    for cand in (p / "config.yaml", p / "export" / "config.yaml"):
        if cand.is_file():
            try:
                c = OmegaConf.load(cand)
                t = OmegaConf.select(c, "schedule.num_timesteps") or OmegaConf.select(c, "backbone.num_train_timesteps")
            except Exception:  # noqa: BLE001 - a broken config is reported (naming it) by the stage loader
                return 1000
            if t:
                return int(t)
    return 1000

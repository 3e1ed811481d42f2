"""Send an evaluation to the configured loggers: scalars, and the LR | SR … | HR image table.

The logger group is the training one (``conf/logger``: ``csv``, ``wandb``, ``csv_wandb``), built
by :func:`sr_lab.train.build_loggers` (W&B ``offline: auto``). For W&B, runs of one sweep share a
group (:func:`wandb_group`) and a job is named after its overrides. The embedded CSV logger gets
``metrics.csv`` plus the table PNG under ``<log_dir>/images/``. Loggers are always finished
(``wandb.finish()`` included) by :func:`sr_lab.train.finish_loggers`, also on failure — the caller
does that in a ``finally``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from sr_lab.train import build_loggers

from .image_table import save_png

log = logging.getLogger(__name__)

__all__ = ["wandb_group", "task_overrides", "knob_overrides", "job_name", "build_eval_loggers", "log_scalars", "log_table"]


def _hydra_cfg():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # not inside a Hydra app
        return None


def wandb_group(cfg: DictConfig) -> str:
    """``wandb_group`` if set; in a multirun the sweep folder (one group per sweep); else ``task_name``."""
    if cfg.get("wandb_group"):
        return str(cfg.wandb_group)
    from hydra.types import RunMode

    hc = _hydra_cfg()
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return f"{cfg.get('task_name', 'eval')}/{Path(str(hc.sweep.dir)).name}"
    return str(cfg.get("task_name", "eval"))


#: overrides that say where data and outputs are, not which variant a job is (left out of job names)
_NOT_KNOBS = ("hydra", "paths.", "hr_dir", "lr_dir", "sr_dir", "run_inference", "infer.checkpoint",
              "infer.decoder_checkpoint", "infer.seeds", "infer.progress", "infer.device", "infer.batch_size",
              "infer.seed_batch", "metrics.", "report.", "logger", "wandb_group", "task_name", "collect.", "sweep=")


def task_overrides() -> list[str]:
    """All command-line overrides of this job (empty outside a Hydra app)."""
    hc = _hydra_cfg()
    return list(hc.overrides.task) if hc is not None else []


def knob_overrides() -> list[str]:
    """The job's command-line overrides that change the method (e.g. ``infer.sampler.t_max=0.5``)."""
    hc = _hydra_cfg()
    if hc is None:
        return []
    return [o for o in hc.overrides.task if not o.lstrip("+~").startswith(_NOT_KNOBS)]


def job_name(cfg: DictConfig) -> str | None:
    """Name of a multirun job: its knob overrides (e.g. ``infer.sampler.t_max=0.5 infer.sampler.t_min=0.2``);
    None for a single run."""
    from hydra.types import RunMode

    hc = _hydra_cfg()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    return " ".join(knob_overrides()) or None


def _is_wandb_class(target) -> bool:
    """``target`` names lightning's :class:`WandbLogger` or a subclass (imported, not built)."""
    import hydra.utils

    try:
        cls = hydra.utils.get_class(str(target))
    except Exception:  # noqa: BLE001 - unset or not importable: instantiating it reports that
        return False
    return issubclass(cls, WandbLogger)


def build_eval_loggers(cfg: DictConfig) -> list:
    """Instantiate ``cfg.logger`` with the W&B group/name of this evaluation."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is not None and _is_wandb_class(lcfg.get("_target_")):
            with open_dict(lcfg):
                lcfg.group = wandb_group(cfg)
                lcfg.name = lcfg.get("name") or job_name(cfg)
    loggers = build_loggers(cfg)
    for lg in loggers:  # start the W&B run now, so that a failing evaluation still ends as a finished run
        if isinstance(lg, WandbLogger):
            _ = lg.experiment
    return loggers


def log_scalars(loggers: list, scalars: dict[str, float]) -> None:
    clean = {k: float(v) for k, v in scalars.items() if v is not None and np.isfinite(v)}
    for lg in loggers:
        try:
            lg.log_metrics(clean, step=0)
            lg.save()
        except Exception as exc:  # one failing logger must not lose the evaluation
            log.warning("logger %s: could not log metrics: %s", type(lg).__name__, exc)


def log_table(loggers: list, png: np.ndarray | None, rows: list, columns: list[str], key: str = "eval/lr_sr_hr") -> list[Path]:
    """PNG to the CSV logger's ``images/`` folder; ``wandb.Table`` (image | LR | SR … | HR) + the PNG to W&B."""
    written = []
    if png is None:
        return written
    for lg in loggers:
        name = type(lg).__name__
        try:
            if isinstance(lg, CSVLogger):
                written.append(save_png(png, Path(lg.log_dir) / "images" / f"{key.replace('/', '_')}.png"))
            elif isinstance(lg, WandbLogger):
                import wandb

                blank = np.full((8, 8, 3), 255, np.uint8)
                data = [[k, *[wandb.Image(c if c is not None else blank) for c in cells]] for k, cells in rows]
                lg.log_table(key=f"{key}_table", columns=["image", *columns], data=data)
                lg.log_image(key=key, images=[png])
        except Exception as exc:
            log.warning("logger %s: could not log the image table: %s", name, exc)
    return written

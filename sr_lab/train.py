"""``sr-train`` / ``make train EXP=...``: compose, validate, build, fit, export.

Order matters: the config is validated and the data folders are probed before any model is built,
so a wrong value or an empty folder fails in seconds. The task wrapper always finishes the loggers
(``wandb.finish()`` included), also when training raises.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sr_lab.config.validation import ConfigError, validate_config

log = logging.getLogger("sr_lab.train")

ROOT = Path(os.environ.get("SR_LAB_ROOT", Path(__file__).resolve().parents[1]))
CONF_DIR = Path(os.environ.get("SR_LAB_CONF", ROOT / "conf"))


def _wandb_offline(setting: Any) -> bool:
    if setting is not True and setting is not False and str(setting).lower() not in ("auto", "none", "null"):
        return str(setting).lower() in ("1", "true", "yes")
    if isinstance(setting, bool):
        return setting
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def build_loggers(cfg: DictConfig) -> list:
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        try:  # the logger's class (imported, not built); a bad target fails in instantiate below
            cls = hydra.utils.get_class(lcfg["_target_"])
        except Exception:  # noqa: BLE001
            cls = None
        if isinstance(cls, type) and issubclass(cls, WandbLogger):
            lcfg["offline"] = _wandb_offline(lcfg.get("offline", "auto"))
            if lcfg["offline"]:
                os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(hydra.utils.instantiate(lcfg))
    return loggers


def finish_loggers(loggers: list, status: str) -> None:
    for lg in loggers:
        try:
            lg.finalize(status)
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("logger %s finalize failed: %s", type(lg).__name__, exc)
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)


def export_trainable(module, out_dir: Path, cfg: DictConfig, ema: dict | None = None) -> Path:
    """Write the trainable weights as safetensors plus the resolved config next to them; with ``ema``
    (:meth:`sr_lab.ema.EMA.export_state`) also their EMA as ``trainable_ema.safetensors`` (same keys)."""
    from safetensors.torch import save_file

    from sr_lab.modules.stage_io import EMA_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    keep = module.trainable_state_keys()
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in keep}
    path = out_dir / "trainable.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"sr_lab_task": str(cfg.task_name)})
    os.replace(tmp, path)
    ema_path = out_dir / EMA_FILE
    if ema is not None:
        tmp = ema_path.with_suffix(".tmp")
        save_file({k: ema[k] for k in state}, str(tmp), metadata={"sr_lab_task": str(cfg.task_name), "ema": "true"})
        os.replace(tmp, ema_path)
    else:  # never leave a stale EMA of an earlier run in this folder (sr-infer would prefer it)
        ema_path.unlink(missing_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    return path


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one stage from a composed config; returns the final logged metrics."""
    validate_config(cfg)
    for name in ("lightning.pytorch", "lightning.fabric"):  # Hydra already prints to the console
        logging.getLogger(name).propagate = False
    # expected here: the frozen backbone stays in eval mode; checkpoints are taken after optimizer steps
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inst = hydra.utils.instantiate

    # cheap components first: degradation and data (probes the folders), then the trainer
    degradation = inst(cfg.degradation)
    datamodule = inst(cfg.data, degradation=degradation)
    datamodule.setup("fit")

    loggers = build_loggers(cfg)
    status = "failed"
    try:
        from lightning.pytorch import seed_everything
        from lightning.pytorch.callbacks import ModelCheckpoint

        from sr_lab.utils.checkpoint_io import AtomicCheckpointIO

        seed_everything(int(cfg.seed), workers=True)
        callbacks = [inst(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        ema_cb = None
        if OmegaConf.select(cfg, "ema.decay") is not None and cfg.get("run_mode", "fit") == "fit":
            from sr_lab.ema import EMA

            ema_cb = EMA(float(cfg.ema.decay), use_for_validation=bool(cfg.ema.get("use_for_validation", True)))
            callbacks.append(ema_cb)
        trainer = inst(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                       plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir), _convert_="object")
        world = trainer.world_size
        per_step = int(cfg.data.batch_size) * world
        if cfg.train.total_batch_size % per_step:
            raise ConfigError(f"train.total_batch_size={cfg.train.total_batch_size} is not a multiple of "
                              f"data.batch_size x world size = {cfg.data.batch_size} x {world}")
        fit = cfg.get("run_mode", "fit") == "fit"
        # micro-batches per iteration (a predict loop does not accumulate)
        accumulate = cfg.train.total_batch_size // per_step if fit else 1

        # the stage: one instantiate; the module config pulls backbone/adapter/loss/sampler in
        from sr_lab.modules.protocol import TrainableStage, missing_members

        module = inst(cfg.module)
        if not isinstance(module, TrainableStage):
            lacks = ", ".join(missing_members(module)) or "a member that does not resolve"
            raise ConfigError(f"module._target_={OmegaConf.select(cfg, 'module._target_')} builds "
                              f"{type(module).__name__}, not an sr_lab stage (sr_lab.modules.protocol."
                              f"TrainableStage): it lacks {lacks}")
        module.configure_run(accumulate, OmegaConf.to_container(cfg, resolve=True))  # config: stored in checkpoints
        steps_per_iter = module.optimizer_steps_per_iteration
        trainer.fit_loop.epoch_loop.max_steps = int(cfg.train.iterations) * steps_per_iter
        trainer.val_check_interval = int(cfg.train.val_every) * accumulate  # in batches
        trainer.check_val_every_n_epoch = None
        trainer.log_every_n_steps = int(cfg.train.log_every) * accumulate
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb._every_n_train_steps = int(cfg.train.ckpt_every) * steps_per_iter
        log.info("task=%s module=%s trainable=%.2fM params accumulate=%d world=%d", cfg.task_name,
                 type(module).__name__, sum(p.numel() for p in module.trainable_parameters()) / 1e6,
                 accumulate, world)
        if fit:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        else:  # run_mode=predict: the stage's predict_step writes its outputs (e.g. latent records)
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if trainer.is_global_zero:
            if cfg.train.export_weights and fit:
                path = export_trainable(module, out_dir / "export", cfg,
                                        ema=ema_cb.export_state(module) if ema_cb is not None else None)
                log.info("trainable weights: %s", path)
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        status = "success"
        return metrics
    finally:
        finish_loggers(loggers, status)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

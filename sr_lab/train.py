"""``sr-train`` / ``make train EXP=...``: compose, validate, build, fit, export.

Order matters: the config is validated and the data folders are probed before any model is built,
so a wrong value or an empty folder fails in seconds (``trainer=ddp`` on a machine without a GPU
too: one line naming the CPU recipe). The task wrapper always finishes the loggers (``wandb.finish()``
included), also when training raises. A config error (or a stage file that cannot be used) is one line,
printed once on stderr and written to ``train.log`` (:mod:`sr_lab.utils.cli`), exit code 2.

Progress (``train.progress``, :mod:`sr_lab.progress`): a bar over ``k / train.iterations`` on a terminal,
plain log lines every ``train.log_every`` iterations otherwise.

Step axis: every row the loggers get (``metrics.csv``, W&B) is on Lightning's ``global_step``, the axis of
the checkpoint names (``stepNNNNNNN.ckpt``) and image grids (``*_stepNNNNNNN.png``); it counts
``module.optimizer_steps_per_iteration`` per iteration (2 in the alternate mode). Lightning's own default
for a row without a step is its count of stepped batches (micro-batches here), which no file name uses.

Resume in one run folder (:mod:`sr_lab.resume`): ``ckpt_path=<run>/checkpoints/<x>.ckpt`` continues in
``<run>`` (checkpoints, image grids, ``train.log`` and one ``metrics.csv`` history); ``ckpt_path=last`` /
``auto`` resumes the newest complete checkpoint of the run folder, as BasicSR's ``auto_resume``.
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
from sr_lab.resume import (
    checkpoint_global_step,
    continue_csv_history,
    csv_resume_version,
    resolve_ckpt_path,
    resume_overrides,
)

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


def build_loggers(cfg: DictConfig, resume: bool = False) -> list:
    """The configured loggers; with ``resume`` a CSV logger without a pinned ``version`` continues the newest
    ``version_N`` that holds a ``metrics.csv`` (instead of starting ``version_N+1``)."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        try:  # the logger's class (imported, not built); a bad target fails in instantiate below
            cls = hydra.utils.get_class(lcfg["_target_"])
        except Exception:  # noqa: BLE001
            cls = None
        if resume and isinstance(cls, type) and issubclass(cls, CSVLogger) and lcfg.get("version") is None:
            version = csv_resume_version(lcfg.get("save_dir", "."), lcfg.get("name", "lightning_logs"))
            if version is not None:
                lcfg["version"] = version
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
    from sr_lab.modules.stage_io import EMA_FILE
    from sr_lab.utils.atomic import atomic_omegaconf_save, atomic_safetensors_save

    out_dir.mkdir(parents=True, exist_ok=True)
    keep = module.trainable_state_keys()
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in keep}
    path = out_dir / "trainable.safetensors"
    atomic_safetensors_save(state, path, metadata={"sr_lab_task": str(cfg.task_name)})
    ema_path = out_dir / EMA_FILE
    if ema is not None:
        atomic_safetensors_save({k: ema[k] for k in state}, ema_path,
                                metadata={"sr_lab_task": str(cfg.task_name), "ema": "true"})
    else:  # never leave a stale EMA of an earlier run in this folder (sr-infer would prefer it)
        ema_path.unlink(missing_ok=True)
    atomic_omegaconf_save(cfg, out_dir / "config.yaml", resolve=True)
    return path


def run(cfg: DictConfig) -> dict[str, float]:
    """Train one stage from a composed config; returns the final logged metrics."""
    resolve_ckpt_path(cfg)  # ckpt_path=last|auto -> a file, before validation checks that it is one
    validate_config(cfg)
    check_accelerator(cfg)  # trainer=ddp without a GPU: one line, before anything is built
    progress = progress_mode(cfg)
    for name in ("lightning.pytorch", "lightning.fabric"):  # Hydra already prints to the console
        logging.getLogger(name).propagate = False
    # expected here: the frozen backbone stays in eval mode; checkpoints are taken after optimizer steps
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from sr_lab.utils.atomic import atomic_write_text, remove_stale_temps
    remove_stale_temps(out_dir, recursive=True)  # temporary files of a killed run (checkpoints, export, images)
    inst = hydra.utils.instantiate

    # cheap components first: degradation and data (probes the folders), then the trainer
    degradation = inst(cfg.degradation)
    datamodule = inst(cfg.data, degradation=degradation)
    datamodule.setup("fit")

    ckpt = cfg.get("ckpt_path") if cfg.get("run_mode", "fit") == "fit" else None
    resume_step = None
    if ckpt:
        try:  # cheap (mmap): only the step is read; an unreadable file is Lightning's to report below
            resume_step = checkpoint_global_step(ckpt)
            log.info("resuming from %s (global step %d) in %s", ckpt, resume_step, out_dir)
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        except Exception as exc:  # noqa: BLE001
            log.debug("ckpt_path=%s: no step read (%s)", ckpt, exc)
    loggers = build_loggers(cfg, resume=resume_step is not None)
    status = "failed"
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if resume_step is not None and rank_zero_only.rank == 0:
            continue_csv_history(loggers, resume_step)
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
        progress_kwargs = add_progress(callbacks, cfg, progress)
        trainer = inst(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                       plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir), _convert_="object",
                       **progress_kwargs)
        log_on_global_step(trainer)
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
        apply_speed_switches(cfg, module, trainer)
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
            atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
            if "val/psnr_y" in metrics:
                bicubic = metrics.get("val/psnr_y_bicubic")
                log.info("last validation: PSNR-Y %.2f dB%s (%s)", metrics["val/psnr_y"],
                         f" vs bicubic {bicubic:.2f} dB" if bicubic is not None else "", out_dir / "metrics.json")
        status = "success"
        return metrics
    finally:
        finish_loggers(loggers, status)


# --- speed ---------------------------------------------------------------------------------------------


def apply_speed_switches(cfg: DictConfig, module, trainer) -> None:
    """``speed:`` (:mod:`sr_lab.models.speed`) on the built stage, before Lightning wraps it: frozen dtype,
    channels_last, SDPA now; ``torch.compile`` after the strategy has placed (and wrapped) the model
    (:class:`sr_lab.callbacks.CompileStage`, ``on_fit_start`` / ``on_predict_start``)."""
    from sr_lab.models.speed import SpeedConfig, apply_speed

    try:
        speed = SpeedConfig.from_config(cfg.get("speed"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from lightning.pytorch.strategies import FSDPStrategy

    sharded = isinstance(trainer.strategy, FSDPStrategy)
    report = apply_speed(module, speed, precision=str(OmegaConf.select(cfg, "trainer.precision", default="32")),
                         compile=False, sharded=sharded)
    log.info("speed: %s", report.summary())
    if speed.compile:
        from sr_lab.callbacks import CompileStage

        trainer.callbacks.append(CompileStage(speed))


# --- progress ------------------------------------------------------------------------------------------


def progress_mode(cfg: DictConfig) -> str:
    """``train.progress`` (auto | bar | log | none) -> bar | log | none; see :mod:`sr_lab.progress`."""
    from sr_lab.progress import resolve_mode

    try:
        return resolve_mode(OmegaConf.select(cfg, "train.progress", default="auto"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def add_progress(callbacks: list, cfg: DictConfig, mode: str) -> dict[str, Any]:
    """Append the progress callbacks for ``mode``; returns the Trainer keywords that go with them.
    A progress bar already in ``callbacks`` (the user's) is kept as is; ``trainer.enable_progress_bar=false``
    turns the bar off."""
    from lightning.pytorch.callbacks import ProgressBar

    from sr_lab.progress import ProgressLog, iteration_progress_bar

    iterations = int(cfg.train.iterations)
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return {}
    if mode == "log":
        callbacks.append(ProgressLog(iterations, int(cfg.train.log_every)))
    if mode == "bar" and OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True) is not False:
        callbacks.append(iteration_progress_bar(iterations))
        return {}
    return {"enable_progress_bar": False}  # no cursor codes in a log file


def log_on_global_step(trainer) -> None:
    """Send every logged row on ``trainer.global_step`` (see the module docstring): Lightning passes
    ``step=None`` for rows logged through ``self.log`` (training, validation, callbacks' epoch-end values)
    and fills in its stepped-batch count, a different axis from the checkpoint and image names."""
    connector = getattr(trainer, "_logger_connector", None)
    original = getattr(connector, "log_metrics", None)
    if original is None:  # pragma: no cover - a Lightning without this hook: keep its axis
        log.warning("metrics keep Lightning's default step axis (no _logger_connector.log_metrics)")
        return

    def log_metrics(metrics, step=None):
        if step is None and "step" not in metrics:
            step = trainer.global_step
        return original(metrics, step)

    connector.log_metrics = log_metrics


# --- accelerator ---------------------------------------------------------------------------------------


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer on a machine where torch sees none: one line (Lightning would fail deep inside a
    traceback after the data and model are built: "No supported gpu backend found!")."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu")).lower()
    if accelerator not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return  # Apple silicon: Lightning's "gpu" is MPS
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    strategy = str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy or "").lower()
    why = f"trainer.accelerator={accelerator} but torch sees no GPU (torch.cuda.is_available() is False)"
    if "fsdp" in strategy:
        raise ConfigError(f"trainer=fsdp needs GPUs: {why}; on CPU processes use trainer=ddp "
                          "trainer.accelerator=cpu trainer.devices=2")
    if "ddp" in strategy:
        raise ConfigError(f"trainer=ddp runs on GPUs: {why}; DDP on CPU processes: trainer=ddp "
                          "trainer.accelerator=cpu trainer.devices=2")
    raise ConfigError(f"{why}; on this machine use trainer=cpu")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from sr_lab.modules.stage_io import StageLoadError
    from sr_lab.utils.cli import report_cli_error

    try:
        run(cfg)
    except (ConfigError, StageLoadError) as exc:  # a bad value, or a stage file that cannot be used
        report_cli_error(log, exc)  # one line, once, on stderr (and in <run>/train.log)
        sys.exit(2)


def main() -> None:
    extra = resume_overrides(sys.argv[1:])
    if extra:  # Hydra reads sys.argv; added last, so a DDP child's own hydra.run.dir=... still wins there
        sys.argv = [*sys.argv, *extra]
    _hydra_main()


if __name__ == "__main__":
    main()

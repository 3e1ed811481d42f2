"""Config checks for the chained stages (StableSR latents / CFW, CCSR stage 2) and ``run_mode``.

Called by :func:`sr_lab.config.validation.validate_config`; every failure is a one-line
:class:`~sr_lab.config.validation.ConfigError` naming the key, raised before any model is built:

* ``run_mode`` is ``fit`` or ``predict`` (a predict stage cannot resume from ``ckpt_path``: it resumes
  by skipping the shards it already wrote);
* ``stage1`` (and an AddSR ``teacher``) — required (and must be an export folder, its
  ``trainable.safetensors`` or a ``.ckpt``) when the module reads it; the files are probed without
  loading any tensor (the config parses, the safetensors header / the checkpoint's zip directory reads),
  and the error names the file that is wrong;
* decoder stages: ``module.decoder.w`` / ``train_w`` in [0, 1], ``module.disc_start`` >= 0,
  ``module.disc_weight`` >= 0; the LPIPS weights exist, or ``perceptual.allow_random_init`` is set on
  a toy backbone (its builder declares ``toy``: ``tiny``, ``tiny_random``; never with a real one);
* the data module's own keys: its class's ``validate_config(cfg, error)`` classmethod, e.g. latent
  records (:mod:`sr_lab.data.records`): ``records.shard_size`` a multiple of ``data.batch_size``; the
  CFW stage's ``records.dir`` holds shards.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from sr_lab.config.validation import declared

RUN_MODES = ("fit", "predict")


def _raw(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _mentions(container: Any, needle: str) -> bool:
    if isinstance(container, dict):
        return any(_mentions(v, needle) for v in container.values())
    if isinstance(container, list):
        return any(_mentions(v, needle) for v in container)
    return isinstance(container, str) and needle in container


def _toy_backbone(cfg: DictConfig) -> bool:
    """The backbone builder declares ``toy`` (toy backbones such as ``tiny``, ``tiny_random``)."""
    return bool(declared(cfg, "backbone", "toy", False))


def is_records_data(cfg: DictConfig) -> bool:
    """The data module declares ``reads_latent_records`` (it reads latent records, e.g. the CFW stage's)."""
    return bool(declared(cfg, "data", "reads_latent_records", False))


def needs_hr_folders(cfg: DictConfig) -> bool:
    """The data module declares ``needs_hr_folders`` (default True): ``data.hr_dirs`` or the embedded
    sample photos are probed before any model is built."""
    return bool(declared(cfg, "data", "needs_hr_folders", True))


def validate_stage_keys(cfg: DictConfig, error: type[Exception]) -> None:
    mode = OmegaConf.select(cfg, "run_mode", default="fit")
    if mode not in RUN_MODES:
        raise error(f"run_mode={mode} must be one of {list(RUN_MODES)}")
    if mode == "predict" and OmegaConf.select(cfg, "ckpt_path", default=None) is not None:
        raise error("ckpt_path is not used by run_mode=predict (it resumes by skipping the shards already written)")

    module = _raw(cfg, "module") or {}
    for key, what in (("stage1", "the trained stage-1 run"), ("teacher", "the trained teacher stage (AddSR)")):
        if not _mentions(module, "${" + key + "}"):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if value in (None, "", "???"):
            raise error(f"{key} is required: the run folder, export folder (or .ckpt) of {what}, "
                        f"e.g. {key}=outputs/<task>/<date>")
        from sr_lab.modules.stage_io import describe_stage_path, unreadable_stage_files

        reason = describe_stage_path(value) or unreadable_stage_files(value)
        if reason:
            raise error(f"{key}={value}: {reason}")

    decoder = module.get("decoder") if isinstance(module, dict) else None
    if isinstance(decoder, dict):
        for key in ("w", "train_w"):
            v = OmegaConf.select(cfg, f"module.decoder.{key}", default=None)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                raise error(f"module.decoder.{key}={v} must be in [0, 1]")
        start = OmegaConf.select(cfg, "module.disc_start", default=0)
        if not isinstance(start, int) or start < 0:
            raise error(f"module.disc_start={start} must be an integer >= 0 (iterations)")
        dw = OmegaConf.select(cfg, "module.disc_weight", default=0.0)
        if not isinstance(dw, (int, float)) or dw < 0:
            raise error(f"module.disc_weight={dw} must be >= 0")
        _check_perceptual(cfg, error)

    check_data = declared(cfg, "data", "validate_config")
    if check_data is not None:  # the data module's own keys (e.g. latent records: records.*, data.records_dir)
        check_data(cfg, error)


def _check_perceptual(cfg: DictConfig, error: type[Exception]) -> None:
    if not OmegaConf.select(cfg, "module.perceptual._target_", default=None):
        return
    if float(OmegaConf.select(cfg, "module.perceptual_weight", default=1.0) or 0.0) <= 0:
        return
    allow = bool(OmegaConf.select(cfg, "module.perceptual.allow_random_init", default=False))
    if allow:
        if not _toy_backbone(cfg):
            raise error("perceptual.allow_random_init=true is only for smoke runs on backbone=tiny; put the "
                        "LPIPS VGG16 weights (vgg16-397923af.pth) in $SR_LAB_WEIGHTS or the torch hub cache")
        return
    from sr_lab.losses.perceptual import check_lpips_weights
    from sr_lab.utils.weights import MissingWeights

    folder = OmegaConf.select(cfg, "module.perceptual.weights_dir", default=None)
    try:
        check_lpips_weights(folder)
    except MissingWeights as exc:
        hint = " (or perceptual.allow_random_init=true for a smoke run on backbone=tiny)" if _toy_backbone(cfg) else ""
        raise error(f"perceptual: {exc}{hint}") from None

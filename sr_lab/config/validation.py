"""Validate a composed training config before any model is built.

Every check raises :class:`ConfigError` with one line that names the offending key, e.g.
``schedule.t_min=0.7 must be smaller than schedule.t_max=0.6667``. Component classes validate their
own arguments again at construction (degradation probabilities, timesteps); this pass exists so a
mistake costs seconds, not a model load.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PRECISIONS = {"32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64", "64-true", "transformer-engine"}


class ConfigError(ValueError):
    """A user-facing configuration mistake (one line, names the key)."""


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _target(cfg: DictConfig, key: str) -> str:
    return str(_get(cfg, f"{key}._target_", "") or "")


def _check_fractions(cfg: DictConfig, group: str) -> None:
    t_max, t_min = _get(cfg, f"{group}.t_max"), _get(cfg, f"{group}.t_min")
    for name, v in (("t_max", t_max), ("t_min", t_min)):
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{group}.{name}={v} must be a fraction of T in [0, 1]")
    if t_max is not None and t_min is not None and not float(t_min) < float(t_max):
        raise ConfigError(f"{group}.t_min={t_min} must be smaller than {group}.t_max={t_max}")


def _largest_sample_side() -> tuple[int, int]:
    """(largest min-side over the scikit-image sample photos, number of photos)."""
    from sr_lab.data import find_images, sample_image_dir
    from sr_lab.data.images import ImageReadError, probe_image

    best, n = 0, 0
    for f in find_images(sample_image_dir()):
        try:
            w, h = probe_image(f)
        except ImageReadError:
            continue
        n += 1
        best = max(best, min(w, h))
    return best, n


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first invalid value."""
    up = _get(cfg, "upscale")
    if not isinstance(up, int) or up < 1:
        raise ConfigError(f"upscale={up} must be a positive integer")
    crop = _get(cfg, "data.crop_size")
    multiple = 8 * up // math.gcd(8, up)
    if not isinstance(crop, int) or crop <= 0 or crop % multiple:
        raise ConfigError(f"data.crop_size={crop} must be a positive multiple of {multiple} "
                          f"(VAE factor 8 and upscale {up})")
    bs = _get(cfg, "data.batch_size")
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"data.batch_size={bs} must be a positive integer")
    tbs = _get(cfg, "train.total_batch_size")
    if not isinstance(tbs, int) or tbs < bs or tbs % bs:
        raise ConfigError(f"train.total_batch_size={tbs} must be a positive multiple of data.batch_size={bs}")
    for key in ("train.iterations", "train.val_every", "train.ckpt_every", "train.log_every"):
        v = _get(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v} must be a positive integer")

    _check_fractions(cfg, "schedule")
    _check_fractions(cfg, "sampler")
    steps = _get(cfg, "sampler.steps")
    T = _get(cfg, "schedule.num_timesteps", 1000)
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= T):
        raise ConfigError(f"sampler.steps={steps} must be an integer in [1, {T}]")
    if _get(cfg, "sampler.t_max") is not None and steps is not None:
        if round(steps * float(cfg.sampler.t_max)) - round(steps * float(cfg.sampler.t_min)) < 1:
            raise ConfigError(f"sampler.t_max/t_min={cfg.sampler.t_max}/{cfg.sampler.t_min} leave no step "
                              f"out of sampler.steps={steps}")
    if _target(cfg, "loss").endswith("CCSRNUTL") and not _target(cfg, "schedule").endswith("CCSRNonUniformTimesteps"):
        raise ConfigError("loss=ccsr_nutl needs schedule=ccsr_nonuniform (it trains at t_max)")

    lr = _get(cfg, "optim.lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0")
    if _get(cfg, "optim.mode") not in ("alternate", "combined"):
        raise ConfigError(f"optim.mode={_get(cfg, 'optim.mode')} must be 'alternate' or 'combined'")
    betas = _get(cfg, "optim.betas")
    if betas is None or len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1)")
    prec = str(_get(cfg, "trainer.precision"))
    if prec not in PRECISIONS:
        raise ConfigError(f"trainer.precision={prec} must be one of {sorted(PRECISIONS)}")

    if _target(cfg, "backbone").endswith("load_pretrained"):
        from sr_lab.models.backbone import looks_like_local_path, missing_subfolders

        path = str(_get(cfg, "backbone.path"))
        if looks_like_local_path(path):
            if not Path(path).expanduser().is_dir():
                raise ConfigError(f"backbone.path={path} does not exist (a local SD 2.1-base diffusers "
                                  f"folder or a hub id such as stabilityai/stable-diffusion-2-1-base)")
            missing = missing_subfolders(path)
            if missing:
                raise ConfigError(f"backbone.path={path} lacks subfolder(s) {missing} of a diffusers SD checkpoint")

    from sr_lab.config.stages import is_records_data, validate_stage_keys

    validate_stage_keys(cfg, ConfigError)  # run_mode, stage1, decoder-GAN and latent-record keys
    dirs = _get(cfg, "data.hr_dirs")
    if is_records_data(cfg):
        pass  # latent records (stablesr_cfw): checked by validate_stage_keys, no HR folder to probe
    elif dirs is not None:
        for d in [dirs] if isinstance(dirs, str) else list(dirs):
            if not Path(str(d)).expanduser().is_dir():
                raise ConfigError(f"data.hr_dirs: folder {d} does not exist")
    else:
        largest, n = _largest_sample_side()
        if crop > largest:
            raise ConfigError(f"data.crop_size={crop} is larger than every embedded sample photo "
                              f"(largest short side {largest} px over {n} photos); use <= {largest // multiple * multiple}")
    val_dirs = _get(cfg, "data.val_dirs")
    if val_dirs is not None:
        for d in [val_dirs] if isinstance(val_dirs, str) else list(val_dirs):
            if not Path(str(d)).expanduser().is_dir():
                raise ConfigError(f"data.val_dirs: folder {d} does not exist")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt} is not a file")

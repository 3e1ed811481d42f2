"""Validate a composed training config before any model is built.

Every check raises :class:`ConfigError` with one line that names the offending key, e.g.
``schedule.t_min=0.7 must be smaller than schedule.t_max=0.6667``. Component classes validate their
own arguments again at construction (degradation probabilities, timesteps); this pass exists so a
mistake costs seconds, not a model load.

Checks that belong to one component are declared by that component, never chosen here by its
``_target_`` string: :func:`target_object` imports the class or function a ``_target_`` names (cheap:
nothing is built) and the check reads what it declares —

* a loss class: ``required_schedule`` (the schedule class it needs; ``None``: any) and
  ``required_schedule_message`` (the error when the configured schedule is not a subclass of it);
* a backbone builder: ``validate_config(cfg, error)`` (e.g. the local-path checks of
  :func:`~sr_lab.models.backbone.load_pretrained`), ``toy``, ``backbone_name``;
* a data module class: ``needs_hr_folders``, ``reads_latent_records`` and a
  ``validate_config(cfg, error)`` classmethod (see :mod:`sr_lab.config.stages`).

Every ``validate_config(cfg, error)`` receives the whole composed config and raises ``error`` with one
line that names the key.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

PRECISIONS = {"32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64", "64-true", "transformer-engine"}


class ConfigError(ValueError):
    """A user-facing configuration mistake (one line, names the key)."""


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _target(cfg: DictConfig, key: str) -> str:
    return str(_get(cfg, f"{key}._target_", "") or "")


def target_object(cfg: DictConfig, key: str) -> Any:
    """The class or function named by ``<key>._target_``, imported but not called (no model is built).

    None when ``key`` has no ``_target_`` or it cannot be imported: such a component declares nothing,
    and instantiating it reports the bad target.
    """
    target = _target(cfg, key)
    if not target:
        return None
    try:
        return hydra.utils.get_object(target)
    except Exception:  # noqa: BLE001 - ImportError / ValueError from hydra's locate, or the import itself
        return None


def declared(cfg: DictConfig, key: str, attribute: str, default: Any = None) -> Any:
    """What the component at ``key`` declares as ``attribute`` (``default`` if nothing)."""
    return getattr(target_object(cfg, key), attribute, default)


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
    _check_loss_schedule(cfg)

    lr = _get(cfg, "optim.lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0")
    if _get(cfg, "optim.mode") not in ("alternate", "combined"):
        raise ConfigError(f"optim.mode={_get(cfg, 'optim.mode')} must be 'alternate' or 'combined'")
    betas = _get(cfg, "optim.betas")
    if betas is None or len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1)")
    decay = _get(cfg, "ema.decay")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1):
        raise ConfigError(f"ema.decay={decay} must be a number in (0, 1), e.g. 0.99 (or null: no EMA)")
    if not isinstance(_get(cfg, "ema.use_for_validation", True), bool):
        raise ConfigError(f"ema.use_for_validation={_get(cfg, 'ema.use_for_validation')} must be true or false")
    prec = str(_get(cfg, "trainer.precision"))
    if prec not in PRECISIONS:
        raise ConfigError(f"trainer.precision={prec} must be one of {sorted(PRECISIONS)}")
    strategy = _get(cfg, "trainer.strategy")
    strategy = _get(cfg, "trainer.strategy._target_", "") if isinstance(strategy, DictConfig) else strategy
    check_speed_config(cfg, "trainer.precision", sharded="fsdp" in str(strategy or "").lower(),
                       training=_get(cfg, "run_mode", "fit") == "fit")

    check_backbone = declared(cfg, "backbone", "validate_config")
    if check_backbone is not None:  # e.g. load_pretrained: a local backbone.path is a full diffusers folder
        check_backbone(cfg, ConfigError)

    from sr_lab.config.stages import needs_hr_folders, validate_stage_keys

    validate_stage_keys(cfg, ConfigError)  # run_mode, stage1, decoder-GAN and the data module's own keys
    for key in ("prompt", "discriminator", "degradation"):  # components declare their own checks (weights, steps)
        check = declared(cfg, key, "validate_config") if _get(cfg, key) is not None else None
        if check is not None:
            check(cfg, ConfigError)
    branches = _get(cfg, "adapter.branches")
    for name in (branches.keys() if isinstance(branches, DictConfig) else ()):
        key = f"adapter.branches.{name}"  # control branches check their own keys (ClearSR's window, ranks, CLIP)
        check = declared(cfg, key, "validate_config") if _get(cfg, key) is not None else None
        if check is not None:
            check(cfg, ConfigError, key)
    dirs = _get(cfg, "data.hr_dirs")
    if not needs_hr_folders(cfg):
        pass  # e.g. latent records (stablesr_cfw): checked by the data module, no HR folder to probe
    elif dirs is not None:
        _check_image_folders("data.hr_dirs", dirs, crop)
    else:
        largest, n = _largest_sample_side()
        if crop > largest:
            raise ConfigError(f"data.crop_size={crop} is larger than every embedded sample photo "
                              f"(largest short side {largest} px over {n} photos); use <= {largest // multiple * multiple}")
    val_dirs = _get(cfg, "data.val_dirs")
    if val_dirs is not None:
        _check_image_folders("data.val_dirs", val_dirs, crop)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt} is not a file")


def check_speed_config(cfg: DictConfig, precision_key: str, sharded: bool = False, training: bool = False) -> None:
    """The ``speed:`` block (:mod:`sr_lab.models.speed`), against the run's precision at ``precision_key``
    (``trainer.precision`` / inference ``precision``), FSDP (``sharded``) and a backward pass (``training``);
    absent = the defaults."""
    from sr_lab.models.speed import speed_config_problem

    speed = _get(cfg, "speed")
    if speed is None:
        return
    if not isinstance(speed, DictConfig):
        raise ConfigError(f"speed={speed} must be a mapping of switches (conf/train.yaml speed:)")
    problem = speed_config_problem(OmegaConf.to_container(speed, resolve=True), _get(cfg, precision_key, "32"),
                                   sharded, precision_key=precision_key, training=training)
    if problem:
        raise ConfigError(problem)


def _check_image_folders(key: str, dirs: Any, crop: int) -> None:
    """Each folder of ``key`` exists and holds at least one image the data module can train on (listed,
    filtered and decoded as :mod:`sr_lab.data` does: :func:`sr_lab.data.folder.check_hr_folder`)."""
    from sr_lab.data.folder import check_hr_folder

    for d in [dirs] if isinstance(dirs, str) else list(dirs):
        if not Path(str(d)).expanduser().is_dir():
            raise ConfigError(f"{key}: folder {d} does not exist")
        found = check_hr_folder(str(d), crop)
        if found.usable is None:
            raise ConfigError(f"{key}: no readable image of at least {crop} px in {d} ({found.describe()})")


def _check_loss_schedule(cfg: DictConfig) -> None:
    """The loss's declared ``required_schedule``: the configured schedule class must be a subclass."""
    loss = target_object(cfg, "loss")
    required = getattr(loss, "required_schedule", None)
    if required is None:
        return
    schedule = target_object(cfg, "schedule")
    if isinstance(schedule, type) and issubclass(schedule, required):
        return
    message = getattr(loss, "required_schedule_message", None)
    raise ConfigError(message or f"loss._target_={_target(cfg, 'loss')} needs a schedule of type "
                                 f"{required.__module__}.{required.__qualname__}, "
                                 f"not schedule._target_={_target(cfg, 'schedule') or None}")

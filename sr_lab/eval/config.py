"""Validate a composed ``conf/eval.yaml`` before any metric network or model is built.

Every check raises :class:`~sr_lab.config.validation.ConfigError` with one line naming the key,
e.g. ``metrics.names: unknown metric 'psnrr' (known: psnr, ssim, ...)`` or ``sr_dir=/x does not
exist``. With ``run_inference=true`` the ``infer`` node is checked by the inference validator too
(:func:`sr_lab.inference.run.validate_infer_config`, keys reported with the ``infer.`` prefix).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sr_lab.config.validation import ConfigError

from .metrics import MANIQA_CHECKPOINTS, METRICS

__all__ = ["validate_eval_config", "metric_names", "reference_metrics", "EvalInputError", "NO_REFERENCE"]

FID_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
IMPLS = ("pyiqa", "sr_lab")


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg_int(cfg: DictConfig, key: str) -> int:
    v = _get(cfg, key)
    if not (_int(v) and v >= 0):
        raise ConfigError(f"{key}={v} must be an integer >= 0")
    return v


def _pos_int(cfg: DictConfig, key: str) -> int:
    v = _get(cfg, key)
    if not (_int(v) and v >= 1):
        raise ConfigError(f"{key}={v} must be a positive integer")
    return v


def _dir(cfg: DictConfig, key: str, required: bool = False) -> Path | None:
    v = _get(cfg, key)
    if v in (None, ""):
        if required:
            raise ConfigError(f"{key} is required ({key}=<folder>)")
        return None
    p = Path(str(v)).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}={v} does not exist (or is not a folder)")
    return p


class EvalInputError(ConfigError):
    """Nothing to score (no SR image pairs with an HR image, or no SR image at all): exit 2."""
    kind = "input error"


#: the metrics that need no HR image
NO_REFERENCE = tuple(n for n, m in METRICS.items() if m.kind == "nr")


def reference_metrics(names: list[str]) -> list[str]:
    """The requested metrics that need SR/HR pairs (full-reference per image, and the set-level FID)."""
    return [n for n in names if n in METRICS and METRICS[n].kind in ("fr", "set")]


def metric_names(cfg: DictConfig) -> list[str]:
    """``metrics.names`` as a list (a single string is one metric)."""
    names = _get(cfg, "metrics.names")
    if isinstance(names, str):
        return [names]
    return [str(n) for n in (names or [])]


def _check_metrics(cfg: DictConfig) -> None:
    names = metric_names(cfg)
    if not names:
        raise ConfigError("metrics.names must list at least one metric")
    for n in names:
        if n not in METRICS:
            raise ConfigError(f"metrics.names: unknown metric {n!r} (known: {', '.join(METRICS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"metrics.names={names} has duplicates")
    _nonneg_int(cfg, "metrics.crop_border")
    if not isinstance(_get(cfg, "metrics.crop_all"), bool):
        raise ConfigError(f"metrics.crop_all={_get(cfg, 'metrics.crop_all')} must be true or false")
    if _get(cfg, "metrics.psnr_ssim_impl") not in IMPLS:
        raise ConfigError(f"metrics.psnr_ssim_impl={_get(cfg, 'metrics.psnr_ssim_impl')} must be one of {list(IMPLS)}")
    if _get(cfg, "metrics.maniqa_checkpoint") not in MANIQA_CHECKPOINTS:
        raise ConfigError(f"metrics.maniqa_checkpoint={_get(cfg, 'metrics.maniqa_checkpoint')} must be one of "
                          f"{list(MANIQA_CHECKPOINTS)}")
    _dir(cfg, "metrics.weights_dir")
    dev = str(_get(cfg, "metrics.device"))
    if dev not in ("auto", "cpu", "mps", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"metrics.device={dev} must be auto, cpu, cuda, cuda:N or mps")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"metrics.device={dev} but CUDA is not available on this machine")
    _pos_int(cfg, "metrics.fid.batch_size")
    _nonneg_int(cfg, "metrics.fid.num_workers")
    if _get(cfg, "metrics.fid.mode") not in FID_MODES:
        raise ConfigError(f"metrics.fid.mode={_get(cfg, 'metrics.fid.mode')} must be one of {list(FID_MODES)}")


def _check_collect(cfg: DictConfig) -> None:
    names = _get(cfg, "collect.metrics") or []
    for n in ([names] if isinstance(names, str) else names):
        if n not in METRICS:
            raise ConfigError(f"collect.metrics: unknown metric {n!r} (known: {', '.join(METRICS)})")
    if _get(cfg, "collect.pd_x") not in METRICS:
        raise ConfigError(f"collect.pd_x={_get(cfg, 'collect.pd_x')} must be a metric ({', '.join(METRICS)})")
    if _get(cfg, "collect.pd_y") != "auto" and _get(cfg, "collect.pd_y") not in METRICS:
        raise ConfigError(f"collect.pd_y={_get(cfg, 'collect.pd_y')} must be auto or a metric ({', '.join(METRICS)})")


def _check_inference(cfg: DictConfig) -> None:
    if _get(cfg, "infer") is None:
        raise ConfigError("run_inference=true needs the infer node (conf/infer.yaml) in the eval config")
    _dir(cfg, "lr_dir", required=True)
    from sr_lab.inference.run import validate_infer_config

    from .inference import infer_config

    try:
        validate_infer_config(infer_config(cfg, output_dir="<eval output>/infer"))
    except ConfigError as exc:
        raise ConfigError(f"infer.{exc}") from None


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first invalid value (module docstring)."""
    up = _get(cfg, "upscale")
    if not (_int(up) and up >= 1):
        raise ConfigError(f"upscale={up} must be a positive integer")
    _check_metrics(cfg)
    _check_collect(cfg)
    _nonneg_int(cfg, "stability.crop_border")
    _nonneg_int(cfg, "report.table_images")
    if _pos_int(cfg, "report.cell_height") < 16:
        raise ConfigError(f"report.cell_height={_get(cfg, 'report.cell_height')} must be >= 16")
    _dir(cfg, "hr_dir")
    _dir(cfg, "lr_dir")
    run_inf = _get(cfg, "run_inference")
    if not isinstance(run_inf, bool):
        raise ConfigError(f"run_inference={run_inf} must be true or false")
    if run_inf:
        if _get(cfg, "sr_dir") not in (None, ""):
            raise ConfigError("sr_dir must be null with run_inference=true (the SR runs are the inference output)")
        _check_inference(cfg)
    else:
        _dir(cfg, "sr_dir", required=True)
    ref = reference_metrics(metric_names(cfg))
    if ref and _get(cfg, "hr_dir") in (None, ""):  # only no-reference metrics run without HR images
        raise ConfigError(f"hr_dir is required: metrics.names lists {', '.join(ref)}, which need SR/HR pairs "
                          f"(give hr_dir=<HR folder>, or list only no-reference metrics: {', '.join(NO_REFERENCE)})")

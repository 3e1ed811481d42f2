"""``sr-make-testset`` / ``make testset``: build a synthetic paired test set from HR photos.

    make testset ARGS="hr_dirs=/data/DIV2K_valid_HR crops_per_image=30 out_dir=/data/DIV2K-val-StableSR"
    make testset ARGS="degradation=bsrgan out_dir=/data/DIV2K-val-BSRGAN"

Degradations: ``degradation=stablesr`` (default) is the Real-ESRGAN pipeline with the StableSR
settings (``conf/degradation/stablesr.yaml``; StableSR paper 001 Sec. 4.1: 3k LR-HR pairs from
DIV2K validation, LR 128×128, HR 512×512, i.e. 30 random 512 crops per image); ``degradation=bsrgan``
the BSRGAN pipeline (spec §2, :mod:`sr_lab.degradation.bsrgan`); any other option of the
``degradation`` group works too. The LR stays at 1/upscale size (``degradation.resize_lr_to_hr`` is
forced off) and the saved HR is the original crop (``hr_target=original``; ``degradation`` saves
the pipeline's returned HR, e.g. the USM-sharpened one).

Reproducibility: the crop of pair (i, j) (image i, crop j) comes from
``make_generator(seed, "testset-crop", i, j)`` and its degradation from
``make_generator(seed, "testset-degrade", i, j, device)``, so a pair does not depend on the other
images, and the same seed, inputs and device give identical files. Output: ``HR/<name>.png``,
``LR/<name>.png`` (same names, so they pair by stem) and ``manifest.json`` (seed, the resolved
degradation config, every pair's source, crop box, sizes, derived seeds and drawn per-image choices
(Real-ESRGAN) or op trace (``{"trace": deg.last_traces[0]}`` for any degradation that keeps a
``last_traces`` list, e.g. BSRGAN), skipped inputs, versions).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sr_lab.config.validation import ConfigError
from sr_lab.train import CONF_DIR
from sr_lab.utils.seeding import derive_seed, make_generator

log = logging.getLogger("sr_lab.testset")

__all__ = ["validate_testset_config", "make_testset", "main"]

CROPS = ("random", "center")
HR_TARGETS = ("original", "degradation")


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_upscale_and_seed(cfg: DictConfig) -> int:
    """Raise :class:`ConfigError` unless ``upscale`` is a positive int and ``seed`` an int; return ``upscale``
    (shared by the CLIs that degrade sample crops: sr-make-testset, sr-degradation-sheet)."""
    up = _get(cfg, "upscale")
    if not (_int(up) and up >= 1):
        raise ConfigError(f"upscale={up} must be a positive integer")
    if not _int(_get(cfg, "seed")):
        raise ConfigError(f"seed={_get(cfg, 'seed')} must be an integer")
    return up


def validate_testset_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key) on the first invalid value."""
    up = check_upscale_and_seed(cfg)
    crop = _get(cfg, "crop_size")
    if crop is not None and not (_int(crop) and crop > 0 and crop % up == 0):
        raise ConfigError(f"crop_size={crop} must be null or a positive multiple of upscale={up}")
    if _get(cfg, "crop") not in CROPS:
        raise ConfigError(f"crop={_get(cfg, 'crop')} must be one of {list(CROPS)}")
    n = _get(cfg, "crops_per_image")
    if not (_int(n) and n >= 1):
        raise ConfigError(f"crops_per_image={n} must be a positive integer")
    if crop is None and n != 1:
        raise ConfigError(f"crops_per_image={n} needs crop_size (whole images give one pair each)")
    mi = _get(cfg, "max_images")
    if mi is not None and not (_int(mi) and mi >= 1):
        raise ConfigError(f"max_images={mi} must be null or a positive integer")
    if _get(cfg, "hr_target") not in HR_TARGETS:
        raise ConfigError(f"hr_target={_get(cfg, 'hr_target')} must be one of {list(HR_TARGETS)}")
    dirs = _get(cfg, "hr_dirs")
    for d in ([dirs] if isinstance(dirs, str) else list(dirs or [])):
        if not Path(str(d)).expanduser().exists():
            raise ConfigError(f"hr_dirs: {d} does not exist")
    dev = str(_get(cfg, "device"))
    if dev not in ("auto", "cpu") and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev} must be auto, cpu, cuda or cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev} but CUDA is not available on this machine")
    if not str(_get(cfg, "out_dir") or "").strip():
        raise ConfigError("out_dir is required")


def _sources(cfg: DictConfig) -> list[str]:
    from sr_lab.data import find_images, sample_image_dir

    dirs = _get(cfg, "hr_dirs")
    files = find_images(dirs if dirs else sample_image_dir())
    if not files:
        raise ConfigError(f"hr_dirs={dirs} holds no image")
    return files[: cfg.max_images] if cfg.get("max_images") else files


def _names(files: list[str]) -> list[str]:
    """Output stems: the source stems, made unique with a numeric suffix where two sources share one."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        stem = Path(f).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def _crop_box(h: int, w: int, size: int, mode: str, g: torch.Generator) -> tuple[int, int]:
    if mode == "center":
        return (h - size) // 2, (w - size) // 2
    top = int(torch.randint(0, h - size + 1, (), generator=g))
    left = int(torch.randint(0, w - size + 1, (), generator=g))
    return top, left


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _degrade(deg, hr: torch.Tensor, g: torch.Generator) -> tuple[dict, dict]:
    """Run the degradation on one (1, 3, H, W) image; also return what it drew (for the manifest).

    Real-ESRGAN: the drawn per-image choices. Any other degradation ``deg(hr, generator)`` that keeps a
    ``last_traces`` attribute (a list, one JSON-able entry per image of its last call: BSRGAN's op trace,
    or any module that offers one) gets ``{"trace": last_traces[0]}``; one without records nothing."""
    from sr_lab.degradation import RealESRGANDegradation

    if isinstance(deg, RealESRGANDegradation):
        params = deg.sample_params(1, g)
        out = deg.degrade(hr, params, g)
        drawn = {"choices": _jsonable(params.choices[0]),
                 "kernel1": _jsonable(params.kernel1_params), "kernel2": _jsonable(params.kernel2_params),
                 "sinc": _jsonable(params.sinc_params),
                 **{k: float(getattr(params, k)[0]) for k in ("sigma1", "gray1", "poisson_scale1", "jpeg_quality1",
                                                               "sigma2", "gray2", "poisson_scale2", "jpeg_quality2")}}
        return out, drawn
    if hasattr(deg, "last_traces"):  # not a trace of an earlier call, should this one not set it
        try:
            deg.last_traces = []
        except AttributeError:  # a read-only property: the module keeps it current itself
            pass
    out = deg(hr, g)
    traces = getattr(deg, "last_traces", None)
    if isinstance(traces, (list, tuple)) and len(traces) == hr.shape[0]:
        return out, {"trace": _jsonable(traces[0])}
    return out, {}


def _save(arr01: torch.Tensor, path: Path) -> None:
    from sr_lab.utils.atomic import atomic_save_image

    a = (arr01[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    atomic_save_image(path, a, format="PNG")


def make_testset(cfg: DictConfig) -> Path:
    """Build the test set described by ``cfg`` (``conf/testset.yaml``); returns the output folder."""
    import sr_lab
    from sr_lab.data.images import ImageReadError, read_rgb_uint8

    validate_testset_config(cfg)
    files = _sources(cfg)
    out = Path(str(cfg.out_dir)).expanduser()
    from sr_lab.utils.atomic import remove_stale_temps
    for d in (out, out / "HR", out / "LR"):  # temporary files of a killed run
        remove_stale_temps(d)
    device = torch.device("cuda" if str(cfg.device) == "auto" and torch.cuda.is_available() else
                          ("cpu" if str(cfg.device) == "auto" else str(cfg.device)))
    forced = {}
    if "resize_lr_to_hr" in cfg.degradation:  # LR at 1/upscale size; only where the degradation has the option
        with open_dict(cfg.degradation):
            cfg.degradation.resize_lr_to_hr = False
        forced["resize_lr_to_hr"] = False
    try:
        deg = hydra.utils.instantiate(cfg.degradation).to(device)
    except Exception as exc:  # the degradation classes validate their arguments (ValueError naming it)
        raise ConfigError(f"degradation: {exc.__cause__ or exc}") from None
    if hasattr(deg, "resize_lr_to_hr"):
        deg.resize_lr_to_hr = False
        forced["resize_lr_to_hr"] = False
    up, size, seed = int(cfg.upscale), cfg.get("crop_size"), int(cfg.seed)
    pairs, skipped = [], []
    for i, (src, stem) in enumerate(zip(files, _names(files))):
        try:
            arr, note = read_rgb_uint8(src)
        except ImageReadError as exc:
            log.warning("skipping %s: %s", src, exc.reason)
            skipped.append({"source": src, "reason": exc.reason})
            continue
        h, w = arr.shape[:2]
        if size is not None and (h < size or w < size):
            log.warning("skipping %s: %dx%d is smaller than crop_size=%d", src, w, h, size)
            skipped.append({"source": src, "reason": f"{w}x{h} smaller than crop_size={size}"})
            continue
        img = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float() / 255.0
        for j in range(int(cfg.crops_per_image)):
            if size is not None:
                top, left = _crop_box(h, w, size, str(cfg.crop), make_generator(seed, "testset-crop", i, j))
                hr = img[..., top : top + size, left : left + size]
            else:
                top, left = 0, 0
                hr = img[..., : h - h % up, : w - w % up]
            g = make_generator(seed, "testset-degrade", i, j, device=device)
            with torch.no_grad():
                res, drawn = _degrade(deg, hr.to(device), g)
            target = res["hr"] if str(cfg.hr_target) == "degradation" else hr
            name = stem if int(cfg.crops_per_image) == 1 else f"{stem}_{j:02d}"
            _save(target, out / "HR" / f"{name}.png")
            _save(res["lr"], out / "LR" / f"{name}.png")
            pairs.append({"name": name, "source": src, "source_note": note, "crop_box": [top, left],
                          "hr_size": list(target.shape[-2:]), "lr_size": list(res["lr"].shape[-2:]),
                          "crop_seed": derive_seed(seed, "testset-crop", i, j),
                          "degrade_seed": derive_seed(seed, "testset-degrade", i, j), "drawn": drawn})
    manifest = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "seed": seed, "upscale": up, "crop_size": size, "crop": str(cfg.crop),
        "crops_per_image": int(cfg.crops_per_image), "hr_target": str(cfg.hr_target),
        "degradation": OmegaConf.to_container(cfg.degradation, resolve=True),
        "degradation_forced": forced,
        "device": str(device), "versions": {"sr_lab": sr_lab.__version__, "torch": torch.__version__},
        "hr_dirs": OmegaConf.to_container(cfg.hr_dirs) if OmegaConf.is_config(cfg.get("hr_dirs")) else cfg.get("hr_dirs"),
        "pairs": pairs, "skipped": skipped,
    }
    from sr_lab.utils.atomic import atomic_write_text

    atomic_write_text(out / "manifest.json", json.dumps(_jsonable(manifest), indent=2))
    log.info("wrote %d HR/LR pair(s) to %s (%d input(s) skipped)", len(pairs), out, len(skipped))
    if not pairs:
        raise ConfigError(f"no pair written: every input was skipped ({len(skipped)}), see the log")
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="testset")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        make_testset(cfg)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

"""``sr-infer`` / ``make infer``: super-resolve a file or folder of images with a trained stage.

    make infer ARGS="checkpoint=outputs/ccsr_stage1/<date>/export input=/data/lr output_dir=/tmp/sr"
    python -m sr_lab.inference.run checkpoint=... input=... seeds=[0,1,2] sampler=ddim sampler.steps=50

Output layout (a contract the evaluation code relies on):

* ``<output_dir>/seed_<seed>/<input stem>.png`` for every seed and every readable input (for a folder
  input, sub-folders are mirrored: ``seed_0/<sub>/<stem>.png``);
* ``<output_dir>/run.json``: the full resolved config, the effective sampler, seeds, sr_lab version,
  device, per-image inputs/outputs/sizes/seconds, skipped inputs, total timings.

The config is validated before any model is built (one line naming the key, ``ConfigError``); odd
inputs (grayscale, RGBA, palette, 16-bit) are converted by :func:`sr_lab.data.images.read_rgb_uint8`,
unreadable/truncated ones are skipped with a warning and listed at the end (``skipped`` in run.json).
Before any tensor is read: the stage kinds (``checkpoint=`` denoises, ``decoder_checkpoint=`` decodes,
from the stored configs), ``output_dir`` and every ``seed_<k>/`` (created and probe-written; for the CLI
``output_dir`` is probed before Hydra opens its log file there) and a single input file (decoded).
Every such failure — and a folder none of whose images could be read — is one line on stderr
(``config error:`` / ``input error:`` / ``output error:`` / ``checkpoint error:``) and exit status 2.
Progress: :mod:`sr_lab.inference.progress`. :func:`run_inference` is the in-process entry point.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sr_lab.utils.cli import error_kind, report_cli_error  # noqa: F401 - re-exported
from sr_lab.config.validation import ConfigError
from sr_lab.inference.color_fix import METHODS as COLOR_FIX_METHODS
from sr_lab.inference.progress import MODES as PROGRESS_MODES
from sr_lab.inference.stage import StageLoadError
from sr_lab.train import CONF_DIR
from sr_lab.utils.device import device_name

log = logging.getLogger("sr_lab.infer")

STARTS = ("noise", "lr")
PRECISIONS = ("32", "bf16")
SAMPLER_KNOBS = ("steps", "eta", "t_max", "t_min")


class InferInputError(ConfigError):
    """No input can be read (a single unreadable file, or a folder of only unreadable ones): exit 2."""
    kind = "input error"


class OutputDirError(ConfigError):
    """``output_dir`` (or a ``seed_<k>/`` folder in it) cannot be created or written: exit 2."""
    kind = "output error"


def check_writable_dir(path: str | Path, what: str | None = None) -> Path:
    """Create ``path`` (with its parents) and write + remove a small temporary file in it; a folder that
    cannot be created or written is an :class:`OutputDirError` starting with ``what`` (default
    ``output_dir=<path>``) and saying why."""
    import os
    import tempfile

    what = what or f"output_dir={path}"
    p = Path(str(path)).expanduser()
    blocker = next((a for a in (p, *p.parents) if a.exists() or a.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        why = "is not a folder" if blocker == p else f"cannot be created: {blocker} is not a folder"
        raise OutputDirError(f"{what} {why}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sr-infer-probe.", suffix=".tmp", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(p) else ""
        raise OutputDirError(f"{what} cannot be created or written: {reason}{where}") from None
    return p


def prepare_output_dirs(output_dir: str | Path, seeds: list[int]) -> Path:
    """``output_dir`` and every ``seed_<k>/`` in it, created and probe-written before any model is loaded
    (an unwritable folder must not lose the sampled images at the end of the run)."""
    out = check_writable_dir(output_dir)
    for seed in seeds:
        check_writable_dir(out / f"seed_{seed}", f"seed folder {out / f'seed_{seed}'} (output_dir={output_dir})")
    return out


# -- validation (no model is built here) ----------------------------------------------------------
def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require_path(cfg: DictConfig, key: str) -> Path:
    if OmegaConf.is_missing(cfg, key) or _get(cfg, key) in (None, ""):
        raise ConfigError(f"{key} is required ({key}=...)")
    p = Path(str(_get(cfg, key))).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}={_get(cfg, key)} does not exist")
    return p


def _check_sampler_values(sampler: dict, num_timesteps: int | None = None) -> None:
    for key in ("steps", "grid", "first"):
        v = sampler.get(key)
        if v is not None and not (_is_int(v) and v >= 1 and (num_timesteps is None or v <= num_timesteps)):
            bound = f"[1, {num_timesteps}]" if num_timesteps else ">= 1"
            raise ConfigError(f"sampler.{key}={v} must be an integer in {bound}")
    ts = sampler.get("timesteps")
    if ts is not None and not (isinstance(ts, (list, tuple)) and ts and all(_is_int(t) for t in ts)):
        raise ConfigError(f"sampler.timesteps={ts} must be a non-empty list of integers (descending)")
    steps = sampler.get("grid") if sampler.get("grid") is not None else sampler.get("steps")
    eta = sampler.get("eta")
    if eta is not None and not (_is_num(eta) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta} must be a number >= 0")
    for name in ("t_max", "t_min"):
        v = sampler.get(name)
        if v is not None and not (_is_num(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"sampler.{name}={v} must be a fraction of T in [0, 1]")
    t_max, t_min = sampler.get("t_max"), sampler.get("t_min")
    if t_max is not None and t_min is not None and not t_min < t_max:
        raise ConfigError(f"sampler.t_min={t_min} must be smaller than sampler.t_max={t_max}")
    if t_max is not None and t_min is not None and _is_int(steps):
        if round(steps * t_max) - round(steps * t_min) < 1:
            key = "grid" if sampler.get("grid") is not None else "steps"
            raise ConfigError(f"sampler.t_max/t_min={t_max}/{t_min} leave no step out of sampler.{key}={steps}")


def validate_infer_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key) on the first invalid value."""
    _require_path(cfg, "checkpoint")
    if _get(cfg, "decoder_checkpoint") is not None:
        _require_path(cfg, "decoder_checkpoint")
    w = _get(cfg, "decoder_w")
    if w is not None and not (_is_num(w) and 0.0 <= w <= 1.0):
        raise ConfigError(f"decoder_w={w} must be a number in [0, 1]")
    _require_path(cfg, "input")
    if not str(_get(cfg, "output_dir") or "").strip():
        raise ConfigError("output_dir is required")
    up = _get(cfg, "upscale")
    if up is not None and not (_is_int(up) and up >= 1):
        raise ConfigError(f"upscale={up} must be a positive integer (or null for the checkpoint's)")
    if _get(cfg, "start") is not None and _get(cfg, "start") not in STARTS:
        raise ConfigError(f"start={_get(cfg, 'start')} must be null (the stage's own) or one of {list(STARTS)}")
    seeds = _get(cfg, "seeds")
    seeds = [seeds] if _is_int(seeds) else seeds
    if not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds={_get(cfg, 'seeds')} must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={list(seeds)} has duplicates")
    for key in ("batch_size",):
        v = _get(cfg, key)
        if not (_is_int(v) and v >= 1):
            raise ConfigError(f"{key}={v} must be a positive integer")
    sb = _get(cfg, "seed_batch")
    if sb is not None and not (_is_int(sb) and sb >= 1):
        raise ConfigError(f"seed_batch={sb} must be a positive integer or null (all seeds at once)")
    if str(_get(cfg, "precision")) not in PRECISIONS:
        raise ConfigError(f"precision={_get(cfg, 'precision')} must be one of {list(PRECISIONS)}")
    from sr_lab.config.validation import check_speed_config

    check_speed_config(cfg, "precision")
    dev = str(_get(cfg, "device"))
    if dev not in ("auto", "cpu") and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev} must be auto, cpu, cuda or cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev} but CUDA is not available on this machine")
    if _get(cfg, "color_fix") not in COLOR_FIX_METHODS:
        raise ConfigError(f"color_fix={_get(cfg, 'color_fix')} must be one of {list(COLOR_FIX_METHODS)}")
    lv = _get(cfg, "wavelet_levels", 5)
    if not (_is_int(lv) and lv >= 1):
        raise ConfigError(f"wavelet_levels={lv} must be a positive integer")
    s = _get(cfg, "cfg_scale")
    if not (_is_num(s) and s >= 0):
        raise ConfigError(f"cfg_scale={s} must be a number >= 0 (1 = no guidance)")
    if not isinstance(_get(cfg, "negative_prompt", ""), str):
        raise ConfigError(f"negative_prompt={_get(cfg, 'negative_prompt')} must be a string")
    for group in ("tile", "vae_tile"):
        size, overlap = _get(cfg, f"{group}.size"), _get(cfg, f"{group}.overlap")
        if not (_is_int(size) and size >= 1):
            raise ConfigError(f"{group}.size={size} must be a positive integer")
        if not (_is_int(overlap) and 0 <= overlap < size):
            raise ConfigError(f"{group}.overlap={overlap} must be an integer in [0, {group}.size={size})")
        if group == "vae_tile":
            for k, v in (("size", size), ("overlap", overlap)):
                if v % 8:
                    raise ConfigError(f"vae_tile.{k}={v} must be a multiple of the VAE factor 8")
    prog = _get(cfg, "progress", True)
    if not any(prog is m or (isinstance(m, str) and prog == m) for m in PROGRESS_MODES):
        raise ConfigError(f"progress={prog} must be true / auto (a bar on a terminal, log lines otherwise), false / "
                          f"none, bar or log")
    tb = _get(cfg, "tile.batch", 1)
    if not (_is_int(tb) and tb >= 1):
        raise ConfigError(f"tile.batch={tb} must be a positive integer")
    sampler = _get(cfg, "sampler")
    _check_sampler_values(OmegaConf.to_container(sampler, resolve=True) if sampler is not None else {})


# -- inputs and outputs -----------------------------------------------------------------------------
def list_inputs(source: str | Path) -> list[tuple[Path, str]]:
    """(image path, output name relative to a seed folder, without suffix) for a file or folder."""
    from sr_lab.data import find_images

    root = Path(str(source)).expanduser()
    files = [Path(p) for p in find_images(root)]
    if root.is_file():
        if not files:
            raise ConfigError(f"input={source} is not an image file (png/jpg/jpeg/webp/bmp/tif/tiff)")
        return [(root, root.stem)]
    if not files:
        raise ConfigError(f"input={source} holds no image (png/jpg/jpeg/webp/bmp/tif/tiff, searched recursively)")
    out, seen = [], {}
    for f in files:
        name = f.relative_to(root).with_suffix("").as_posix()
        if name in seen:
            raise ConfigError(f"input={source}: {seen[name].name} and {f.name} would both be written as {name}.png")
        seen[name] = f
        out.append((f, name))
    return out


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)




def effective_sampler_config(infer_sampler: Any, stage_cfg: DictConfig) -> dict:
    """The sampler to use: a chosen sampler option (has ``_target_``) replaces the checkpoint's; plain
    knobs (non-null) are merged onto the checkpoint's own sampler config, and a knob node without
    ``_target_`` (``sampler.hook.alpha=0.03``) onto the checkpoint's node of that name (its hook)."""
    chosen = OmegaConf.to_container(infer_sampler, resolve=True) if infer_sampler is not None else {}
    chosen = {k: v for k, v in (chosen or {}).items() if v is not None}
    for k, v in list(chosen.items()):  # a knob node (the hook's): its null entries set nothing
        if isinstance(v, dict):
            chosen[k] = v = {kk: vv for kk, vv in v.items() if vv is not None}
            if not v:
                del chosen[k]
    if "_target_" in chosen:
        return chosen
    own = OmegaConf.select(stage_cfg, "sampler") or OmegaConf.select(stage_cfg, "module.sampler")
    if own is None:
        raise ConfigError("the checkpoint's config has no sampler; choose one with sampler=<option>")
    base = OmegaConf.to_container(own, resolve=True)
    for key, value in chosen.items():
        if isinstance(value, dict) and "_target_" not in value:  # e.g. sampler.hook.alpha=0.03: tune the stage's hook
            if not isinstance(base.get(key), dict):
                raise ConfigError(f"sampler.{key}.{next(iter(value))}: the checkpoint's sampler has no {key} node to "
                                  f"tune; give a whole one (e.g. +hook@sampler.hook=lsa)")
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def check_sampler_against_stage(sampler_cfg: dict, stage_cfg: DictConfig) -> list[int]:
    """Knob names exist in the sampler function; the sampler's own ``timesteps`` accepts the values for
    the stage's T. Returns the exact timesteps the sampler will evaluate."""
    from sr_lab.diffusion.samplers import sampler_timesteps

    fn = hydra.utils.get_method(sampler_cfg["_target_"])
    params = inspect.signature(fn).parameters
    knobs = [k for k in sampler_cfg if not k.startswith("_")]
    accepted = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in ("generator", "callback")]
    for k in knobs:
        if k not in params:
            raise ConfigError(f"sampler.{k} is not a knob of {sampler_cfg['_target_']} (knobs: {', '.join(accepted)})")
    T = OmegaConf.select(stage_cfg, "schedule.num_timesteps", default=None) or \
        OmegaConf.select(stage_cfg, "backbone.num_train_timesteps", default=None) or 1000
    _check_sampler_values(sampler_cfg, int(T))
    try:
        return sampler_timesteps(sampler_cfg, int(T))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def stage_capabilities(stage_cfg: DictConfig) -> frozenset:
    """What a stored stage can do, as its module class declares (``capabilities``): ``denoise`` (a
    diffusion stage: ``prepare`` / ``denoise`` / ``decode_latent``), ``decoder`` (a trained latent decoder:
    StableSR CFW, CCSR stage 2). The target was allow-listed when the source was read."""
    target = OmegaConf.select(stage_cfg, "module._target_", default=None)
    if not target:
        return frozenset()
    try:
        cls = hydra.utils.get_class(str(target))
    except Exception:  # noqa: BLE001 - reported when the stage is built
        return frozenset()
    return frozenset(getattr(cls, "capabilities", ()))


def peek_stage_config(source: Any) -> DictConfig | None:
    """The stored config of an export folder, read alone (no tensor is loaded), when its ``module`` target
    is allow-listed; ``None`` for a ``.ckpt`` (its config comes with its tensors) or anything
    :func:`~sr_lab.modules.stage_io.read_stage_source` will report."""
    from sr_lab.config.safe_instantiate import check_targets
    from sr_lab.modules.stage_io import _resolve, describe_stage_path

    if source in (None, "") or describe_stage_path(source):
        return None
    p = _resolve(source)
    if not p.is_dir():
        return None
    try:
        stored = OmegaConf.load(p / "config.yaml")
        if not isinstance(stored, DictConfig) or "module" not in stored:
            return None
        check_targets(stored.module, "stored config", key="module")
    except Exception:  # noqa: BLE001 - reported by read_stage_source, naming the file
        return None
    return stored


def _check_stage_kinds(cfg: DictConfig, stage_cfg: DictConfig | None, dec_cfg: DictConfig | None,
                       sources: tuple = (None, None)) -> None:
    """``checkpoint=`` takes a stage that denoises, ``decoder_checkpoint=`` one with a trained decoder (one
    line each, from the stored configs; ``None``: not known yet). ``sources``: the read
    :class:`StageSource` s, whose config file is named when it has no module."""
    for key, stored, src in (("checkpoint", stage_cfg, sources[0]), ("decoder_checkpoint", dec_cfg, sources[1])):
        if stored is not None and src is not None and not OmegaConf.select(stored, "module._target_", default=None):
            raise StageLoadError(f"{src.config_file}: stored config has no module._target_ ({key}= takes the "
                                 f"export of an sr_lab stage)")
    if stage_cfg is not None:
        caps = stage_capabilities(stage_cfg)
        task = stage_cfg.get("task_name", "?")
        if "denoise" not in caps:
            hint = " (a decoder stage: give it as decoder_checkpoint=)" if "decoder" in caps else ""
            raise ConfigError(f"checkpoint={cfg.checkpoint} is a {task} stage that does not denoise{hint}; "
                              f"checkpoint= takes a diffusion stage (e.g. ccsr_stage1, stablesr_stage1)")
    if dec_cfg is not None and "decoder" not in stage_capabilities(dec_cfg):
        hint = " (a diffusion stage: give it as checkpoint=)" if "denoise" in stage_capabilities(dec_cfg) else ""
        raise ConfigError(f"decoder_checkpoint={cfg.decoder_checkpoint} is a {dec_cfg.get('task_name', '?')} "
                          f"stage without a trained decoder{hint}; decoder_checkpoint= takes a decoder stage "
                          f"(stablesr_cfw, ccsr_stage2) and checkpoint= the diffusion stage")


def _stored_config_error(src, exc: Exception) -> StageLoadError:
    return StageLoadError(f"{src.config_file}: stored config does not resolve ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})")


def to_uint8(img01: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> H x W x 3 uint8."""
    return (img01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _save_png(array: np.ndarray, path: Path) -> None:
    from sr_lab.utils.atomic import atomic_save_image

    atomic_save_image(path, array, format="PNG")


# -- the run ------------------------------------------------------------------------------------------
def run_inference(cfg: DictConfig) -> Path:
    """Validate, load the stage(s), super-resolve every input for every seed; returns the output dir.

    Everything that can fail cheaply fails before any tensor is read: the config, the inputs, the kinds
    of the stages (from their stored configs), the output folders (created and probe-written), a
    single input file (decoded)."""
    from omegaconf.errors import OmegaConfBaseException

    import sr_lab
    from sr_lab.data.images import ImageReadError, read_rgb_uint8
    from sr_lab.inference.pipeline import SRPipeline, TileSettings, VAETileSettings
    from sr_lab.inference.progress import InferenceProgress
    from sr_lab.inference.stage import build_stage, read_stage_source

    t_start = time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    validate_infer_config(cfg)
    inputs = list_inputs(cfg.input)
    seeds = [int(s) for s in ([cfg.seeds] if _is_int(cfg.seeds) else cfg.seeds)]
    ema = cfg.get("ema", True)
    if not isinstance(ema, bool):
        raise ConfigError(f"ema={ema} must be true (EMA weights when the stage has them) or false (raw)")
    has_decoder = cfg.get("decoder_checkpoint") not in (None, "")
    _check_stage_kinds(cfg, peek_stage_config(cfg.checkpoint),
                       peek_stage_config(cfg.decoder_checkpoint) if has_decoder else None)
    preread: dict[Path, tuple[np.ndarray, str | None]] = {}
    if len(inputs) == 1 and Path(str(cfg.input)).expanduser().is_file():  # nothing to skip to: fail now
        try:
            preread[inputs[0][0]] = read_rgb_uint8(inputs[0][0])
        except ImageReadError as exc:
            raise InferInputError(f"input={cfg.input} cannot be read: {exc.reason}") from None
    out_dir = prepare_output_dirs(cfg.output_dir, seeds)
    src = read_stage_source(cfg.checkpoint, ema=ema)
    dec_src = read_stage_source(cfg.decoder_checkpoint, ema=ema) if has_decoder else None
    _check_stage_kinds(cfg, src.config, dec_src.config if dec_src is not None else None, (src, dec_src))
    try:
        sampler_cfg = effective_sampler_config(cfg.get("sampler"), src.config)
        timesteps = check_sampler_against_stage(sampler_cfg, src.config)
        upscale = int(cfg.upscale if cfg.get("upscale") is not None else (src.config.get("upscale") or 4))
    except OmegaConfBaseException as exc:
        raise _stored_config_error(src, exc) from None
    device = resolve_device(str(cfg.device))
    from sr_lab.utils.atomic import atomic_write_text, remove_stale_temps
    for d in [out_dir, *out_dir.glob("seed_*")]:  # temporary files of a killed run (run.json, seed_*/ images)
        remove_stale_temps(d, recursive=d != out_dir)

    # models
    stage = build_stage(src, device)
    decoder = build_stage(dec_src, device) if dec_src is not None else None
    sampler = hydra.utils.instantiate(sampler_cfg)
    pipe = SRPipeline(
        stage, sampler, decoder_stage=decoder, decoder_w=cfg.get("decoder_w"), upscale=upscale,
        start=None if cfg.get("start") is None else str(cfg.start), cfg_scale=float(cfg.cfg_scale), negative_prompt=str(cfg.negative_prompt),
        prompt=cfg.get("prompt"), color_fix=str(cfg.color_fix), wavelet_levels=int(cfg.get("wavelet_levels", 5)),
        tile=TileSettings(bool(cfg.tile.enabled), int(cfg.tile.size), int(cfg.tile.overlap),
                          int(cfg.tile.get("batch", 4))),
        vae_tile=VAETileSettings(bool(cfg.vae_tile.enabled), int(cfg.vae_tile.size), int(cfg.vae_tile.overlap)),
        precision=str(cfg.precision), seed_batch=cfg.get("seed_batch"), speed=cfg.get("speed"))
    if pipe.speed_report is not None:
        log.info("speed: %s", pipe.speed_report.summary())
    load_s = time.perf_counter() - t_start
    log.info("stage %s (%s) on %s; sampler %s; %d inputs x %d seeds -> %s", src.path, type(stage).__name__,
             device, sampler_cfg, len(inputs), len(seeds), out_dir)

    records: list[dict] = []
    skipped: list[dict] = []
    batch: list[tuple[Path, str, np.ndarray, str | None]] = []
    index = {path: i for i, (path, _) in enumerate(inputs)}
    progress = pipe.progress = InferenceProgress(len(inputs), seeds, len(timesteps), cfg.get("progress", True),
                                                 logger=log)

    def flush() -> None:
        if not batch:
            return
        lr = torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1) for _, _, a, _ in batch]).float() / 255.0
        first, last = index[batch[0][0]], index[batch[-1][0]]
        progress.set_images(first, last - first + 1, len(inputs))
        t0 = time.perf_counter()
        sr = pipe(lr, seeds)  # (S, B, 3, H, W)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_image = (time.perf_counter() - t0) / len(batch)
        for j, (path, name, arr, note) in enumerate(batch):
            outs = {}
            for k, seed in enumerate(seeds):
                rel = Path(f"seed_{seed}") / f"{name}.png"
                _save_png(to_uint8(sr[k, j]), out_dir / rel)
                outs[str(seed)] = rel.as_posix()
            records.append({"input": str(path), "outputs": outs, "lr_size": [arr.shape[0], arr.shape[1]],
                            "sr_size": [int(sr.shape[-2]), int(sr.shape[-1])], "seconds": round(per_image, 4),
                            "note": note})
        batch.clear()

    t_inf = time.perf_counter()
    try:
        for path, name in inputs:
            try:
                arr, note = preread.pop(path) if path in preread else read_rgb_uint8(path)
            except ImageReadError as exc:
                log.warning("skipping %s: %s", path, exc.reason)
                skipped.append({"input": str(path), "reason": exc.reason})
                progress.skip(1)
                continue
            if note:
                log.info("%s: %s", path, note)
            if batch and (batch[0][2].shape != arr.shape or len(batch) >= int(cfg.batch_size)):
                flush()
            batch.append((path, name, arr, note))
        flush()
    finally:
        progress.close()
    inference_s = time.perf_counter() - t_inf
    if not records:
        raise InferInputError(f"input={cfg.input}: none of its {len(skipped)} image(s) could be read "
                              f"(first: {skipped[0]['input']}: {skipped[0]['reason']})")

    if skipped:
        log.warning("skipped %d unreadable input(s): %s", len(skipped), ", ".join(s["input"] for s in skipped))
    sidecar = {
        "sr_lab_version": sr_lab.__version__,
        "torch_version": torch.__version__,
        "started": started,
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "checkpoint": {"path": str(src.path), "task_name": src.config.get("task_name"),
                       "stage": str(OmegaConf.select(src.config, "module._target_"))},
        "ema": src.ema,  # the EMA weights were used (ema=true and the stage has them)
        "decoder_checkpoint": None if dec_src is None else {"path": str(dec_src.path),
                                                            "task_name": dec_src.config.get("task_name")},
        "sampler": sampler_cfg,
        "timesteps": timesteps,
        "model_calls_per_image": len(timesteps),  # per seed; CFG doubles the rows, tiling multiplies them
        "upscale": upscale,
        "seeds": seeds,
        "device": {"type": device.type, "name": device_name(device)},
        "images": records,
        "skipped": skipped,
        "timings": {"load_s": round(load_s, 3), "inference_s": round(inference_s, 3),
                    "total_s": round(time.perf_counter() - t_start, 3),
                    "per_image_s": round(inference_s / len(records), 4) if records else None},
    }
    atomic_write_text(out_dir / "run.json", json.dumps(sidecar, indent=2))
    log.info("wrote %d image(s) x %d seed(s) to %s (%.1f s)", len(records), len(seeds), out_dir,
             sidecar["timings"]["total_s"])
    return out_dir


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="infer")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_inference(cfg)
    except (ConfigError, StageLoadError) as exc:
        report_cli_error(log, exc)
        sys.exit(2)


def _override(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=`` / ``+key=`` / ``++key=`` override on the command line (quotes removed)."""
    for arg in reversed(argv):
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                value = arg[len(prefix):]
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                return value
    return None


def _static_prefix(path: str) -> str:
    """The folder part of ``path`` before its first interpolation (``outputs/infer/${now:...}`` ->
    ``outputs/infer``); the path itself when it has none."""
    if "${" not in path:
        return path
    head = path[:path.index("${")]
    return head[:head.rfind("/") + 1] if "/" in head else "."


def check_run_dir_before_hydra(argv: list[str], config_name: str, keys: tuple[str, ...]) -> None:
    """Hydra creates its run folder and opens its log file there before any code of ours runs, so an
    unwritable ``output_dir`` would be a Hydra traceback: probe the folder the command line names (the
    first of ``keys`` that is set, else the config's default, up to its first interpolation) and raise
    :class:`OutputDirError`. Skipped when Hydra flags are given (``--help``, ``--cfg``, ``-m`` …)."""
    if any(a.startswith("-") for a in argv):
        return
    for key in keys:
        value = _override(argv, key)
        if value is not None:
            break
    else:
        key = keys[-1]
        try:
            value = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml"),
                                           resolve=False)
            for part in key.split("."):
                value = value[part]
        except Exception:  # noqa: BLE001 - the config itself is Hydra's to report
            return
    if not isinstance(value, str) or not value.strip() or value.strip() in ("null", "???"):
        return
    check_writable_dir(_static_prefix(value), f"{key}={value}")


def main() -> None:
    try:
        check_run_dir_before_hydra(sys.argv[1:], "infer", ("hydra.run.dir", "output_dir"))
    except OutputDirError as exc:
        print(f"{error_kind(exc)}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()

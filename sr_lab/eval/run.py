"""``sr-eval`` / ``make eval``: score SR folders (or run inference with N seeds first) against HR.

    make eval ARGS="sr_dir=<SR folder or folder of seed_<k>/> hr_dir=<HR folder>"
    make eval ARGS="run_inference=true infer.checkpoint=<run>/export infer.seeds=[0,1,2] lr_dir=<LR> hr_dir=<HR>"
    sr-eval -m run_inference=true ... infer.sampler.t_max=0.5,0.6667,0.8 infer.sampler.t_min=0.2,0.3333

Order: validate the whole config (one line naming the key) -> loggers -> [inference] -> metrics
(unavailable ones reported, never fatal) -> scoring -> reports (``per_image.csv``,
``per_image_std.csv``, ``summary.json``, ``summary.md``, ``lr_sr_hr.png``) -> loggers. Loggers are
finished in a ``finally`` (W&B too) whatever happens. :func:`run_eval` is the in-process entry.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sr_lab.config.validation import ConfigError
from sr_lab.train import CONF_DIR, finish_loggers

from .config import EvalInputError, metric_names, reference_metrics, validate_eval_config
from .image_table import save_png, table_cells, table_columns, table_png
from .loggers import build_eval_loggers, job_name, log_scalars, log_table, task_overrides
from .metrics import build_metrics
from .report import write_reports
from .score import discover_runs, score_runs

log = logging.getLogger("sr_lab.eval")

__all__ = ["run_eval", "main"]


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _resolved(cfg: DictConfig) -> dict:
    """The eval config as a plain dict (the infer node's own ``hydra`` block left out)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if c.get("infer") is not None and "hydra" in c.infer:
        del c.infer["hydra"]
    return OmegaConf.to_container(c, resolve=True, throw_on_missing=False)


def _versions() -> dict:
    import sr_lab

    out = {"sr_lab": sr_lab.__version__, "torch": torch.__version__}
    try:
        import pyiqa

        out["pyiqa"] = pyiqa.__version__
    except Exception:
        out["pyiqa"] = None
    return out


def _inference_extra(cfg: DictConfig, meta: dict, path: Path) -> dict:
    from .inference import executed_steps, model_calls, num_timesteps_of

    sampler = meta.get("sampler") or {}
    T = num_timesteps_of(cfg.infer.checkpoint)
    return {"inference": {"output_dir": str(path), "seeds": meta.get("seeds"), "timings": meta.get("timings"),
                          "device": meta.get("device"), "checkpoint": meta.get("checkpoint")},
            "sampler": sampler, "num_timesteps": T, "executed_steps": executed_steps(sampler, T),
            "model_calls": model_calls(sampler, T)}


def _scalars(summary: dict) -> dict[str, float]:
    out: dict[str, float] = {"eval/n_runs": summary["n_runs"], "eval/n_images": summary["n_images_all_runs"]}
    for name, m in summary["metrics"].items():
        if m.get("available") and m.get("mean") is not None:
            out[f"eval/{name}"] = m["mean"]
            if m.get("g_std") is not None:
                out[f"eval/{name}_gstd"] = m["g_std"]
    if summary["stability"].get("l_std") is not None:
        out["eval/l_std"] = summary["stability"]["l_std"]
    return out


def _base_extra(cfg: DictConfig) -> dict:
    """What the summary records about this job besides the scores."""
    return {"created": _dt.datetime.now().isoformat(timespec="seconds"), "versions": _versions(),
            "label": cfg.get("variant") or job_name(cfg) or cfg.get("task_name"),
            "variant": cfg.get("variant"), "overrides": task_overrides(),
            "hr_dir": cfg.get("hr_dir"), "lr_dir": cfg.get("lr_dir"),
            "crop_border": int(cfg.metrics.crop_border), "crop_all": bool(cfg.metrics.crop_all),
            "psnr_ssim_impl": str(cfg.metrics.psnr_ssim_impl)}


def _sr_root(cfg: DictConfig, out_dir: Path, extra: dict) -> Path:
    """The folder of SR runs: ``sr_dir``, or the output of inference run now (``run_inference``)."""
    if not cfg.run_inference:
        return Path(str(cfg.sr_dir)).expanduser()
    from sr_lab.data.samples import find_images

    from .inference import run_inference_for_eval

    # the SR images will be named after the LR inputs: check that those pair with HR before sampling
    _check_pairs({str(cfg.lr_dir): find_images(cfg.lr_dir, recursive=False)}, cfg.get("hr_dir"), metric_names(cfg),
                 "LR")

    sr_root, meta = run_inference_for_eval(cfg, out_dir)
    extra.update(_inference_extra(cfg, meta, sr_root))
    return sr_root


def _check_pairs(sr_files: dict[str, list[str]], hr_dir: str | None, names: list[str], what: str) -> None:
    """Before any metric network is built (or any inference run): with reference metrics requested, some
    file of ``sr_files`` (folder -> its images) must pair with an HR image by stem."""
    from sr_lab.data.paired import pair_files
    from sr_lab.data.samples import find_images

    ref = reference_metrics(names)
    if not ref or not hr_dir:
        return
    hr_files = find_images(hr_dir, recursive=False)
    if not any(pair_files(hr_files, files).pairs for files in sr_files.values()):
        folders = ", ".join(sr_files) or "(none)"
        n = sum(len(f) for f in sr_files.values())
        raise EvalInputError(f"no {what} image in {folders} ({n} file(s)) pairs with an HR image in {hr_dir} "
                             f"({len(hr_files)} file(s)); files pair by stem (_HR/_LR/_x4 suffixes tolerated): "
                             f"{', '.join(ref)} need SR/HR pairs")


def _check_scored(result, sr_root: Path, hr_dir: str | None) -> None:
    """After scoring: at least one image was scored, else every metric would be n/a."""
    if result.rows:
        return
    if hr_dir:
        raise EvalInputError(f"nothing scored: no SR image in {sr_root} pairs with an HR image in {hr_dir} of the "
                             f"same size (see the warnings above)")
    raise EvalInputError(f"nothing scored: no SR image in {sr_root}")


def _score(cfg: DictConfig, sr_root: Path, names: list[str]):
    from sr_lab.data.samples import find_images

    runs = discover_runs(sr_root)
    _check_pairs({str(r.sr_dir): find_images(r.sr_dir, recursive=False) for r in runs}, cfg.get("hr_dir"), names,
                 "SR")
    log.info("scoring %d run(s) in %s against %s: %s", len(runs), sr_root, cfg.get("hr_dir"), ", ".join(names))
    metrics, cross, unavailable = build_metrics(
        names, device=resolve_device(str(cfg.metrics.device)), weights_dir=cfg.metrics.get("weights_dir"),
        maniqa_checkpoint=str(cfg.metrics.maniqa_checkpoint), psnr_ssim_impl=str(cfg.metrics.psnr_ssim_impl))
    fid_opts = {k: cfg.metrics.fid[k] for k in ("batch_size", "num_workers", "mode")}
    result = score_runs(runs, cfg.get("hr_dir"), metrics, cross, unavailable, crop_border=int(cfg.metrics.crop_border),
                        crop_all=bool(cfg.metrics.crop_all), fid_opts=fid_opts,
                        l_std_crop=int(cfg.stability.crop_border))
    _check_scored(result, sr_root, cfg.get("hr_dir"))
    return result


def _publish(cfg: DictConfig, result, summary: dict, out_dir: Path, loggers: list) -> None:
    """The LR | SR … | HR table (PNG next to the reports) and everything the loggers get."""
    rows = table_cells(result, cfg.get("lr_dir"), int(cfg.report.table_images), int(cfg.report.cell_height))
    png = table_png(rows, columns=table_columns(result))
    if png is not None:
        save_png(png, out_dir / "lr_sr_hr.png")
    log_scalars(loggers, _scalars(summary))
    log_table(loggers, png, rows, table_columns(result))


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate as configured (module docstring); returns the summary dict (also in ``summary.json``)."""
    validate_eval_config(cfg)
    out_dir = Path(str(cfg.paths.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    names = metric_names(cfg)
    loggers = build_eval_loggers(cfg)
    status = "failed"
    try:
        extra = _base_extra(cfg)
        result = _score(cfg, _sr_root(cfg, out_dir, extra), names)
        extra["config"] = _resolved(cfg)
        summary = write_reports(result, out_dir, names, extra, title=str(extra["label"] or ""))
        _publish(cfg, result, summary, out_dir, loggers)
        log.info("evaluation written to %s\n%s", out_dir, (out_dir / "summary.md").read_text())
        status = "success"
        return summary
    finally:
        finish_loggers(loggers, status)


def _record_failed_job(cfg: DictConfig, kind: str, exc: Exception) -> None:
    """In a multirun, a job with a bad value is recorded (``failed.json``, shown by sr-collect) and the
    sweep goes on with the other jobs instead of stopping."""
    out = Path(str(cfg.paths.output_dir))
    from sr_lab.utils.atomic import atomic_write_text

    atomic_write_text(out / "failed.json", json.dumps({"error": f"{kind}: {exc}", "variant": cfg.get("variant"),
                                                       "overrides": task_overrides()}, indent=2))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sr_lab.utils.cli import error_kind, report_cli_error
    from sr_lab.inference.stage import StageLoadError

    try:
        run_eval(cfg)
    except (ConfigError, StageLoadError) as exc:
        kind = error_kind(exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s: %s", kind, exc)
            _record_failed_job(cfg, kind, exc)
            return
        report_cli_error(log, exc)  # once on stderr (and in the job's log file)
        sys.exit(2)


def main() -> None:
    from sr_lab.inference.run import OutputDirError, check_run_dir_before_hydra
    from sr_lab.utils.cli import error_kind

    try:
        check_run_dir_before_hydra(sys.argv[1:], "eval", ("hydra.run.dir",))
    except OutputDirError as exc:
        print(f"{error_kind(exc)}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()

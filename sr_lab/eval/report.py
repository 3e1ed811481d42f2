"""Evaluation reports: per-image CSV, summary JSON, and a markdown table in the papers' layout.

Files written by :func:`write_reports` into the evaluation folder:

* ``per_image.csv`` — one row per (image, run): image key, run, SR and HR paths, every reported
  metric, and ``psnr_<impl>``/``ssim_<impl>`` for the PSNR/SSIM cross-check implementation
  (``psnr_sr_lab`` when pyiqa's value is reported, ``psnr_pyiqa`` otherwise).
* ``per_image_std.csv`` — one row per image scored in every run: population std over runs of every
  per-image metric (its mean over images is the G-STD) and the image's L-STD term.
* ``summary.json`` — config, runs, pairing report, per-metric mean / G-STD / per-run means (or
  the reason a metric is unavailable), FID per run, L-STD, the PSNR/SSIM cross-check, messages.
* ``summary.md`` — metric rows with "↑/↓" markers (CCSR Table 1 style: ``↑ PSNR``, columns
  ``Mean`` and ``G-STD ↓``), an ``L-STD ↓`` row, and notes (reported PSNR/SSIM implementation,
  N runs, M images, unavailable metrics, pairing problems).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sr_lab.utils.atomic import atomic_write_text

from .metrics import METRICS
from .score import EvalResult

__all__ = ["summary_dict", "markdown_table", "write_reports", "fmt"]


def fmt(v: Any, decimals: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return f"{v:.{decimals}f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def summary_dict(result: EvalResult, names: list[str], extra: dict | None = None) -> dict:
    """The summary as a JSON-ready dict (non-finite floats -> null)."""
    out = {
        "runs": {r.name: str(r.sr_dir) for r in result.runs},
        "n_runs": len(result.runs),
        "n_images_all_runs": len(result.common_images),
        "metrics": {n: result.metric_summary(n) for n in names},
        "stability": result.stability,
        "psnr_ssim_crosscheck": result.crosscheck,
        "pairing": {run: rep.to_dict() for run, rep in result.pairing.items()},
        "unavailable": result.unavailable,
        "messages": result.messages,
        **(extra or {}),
    }
    return _json_safe(out)


def markdown_table(summary: dict, title: str = "") -> str:
    """Metric rows (↑/↓), columns Mean and G-STD ↓, then L-STD ↓ and notes."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| Metric | Mean | G-STD ↓ |", "|---|---:|---:|"]
    for name, m in summary["metrics"].items():
        spec = METRICS[name]
        label = f"{spec.arrow} {spec.label}"
        if not m.get("available"):
            lines.append(f"| {label} | n/a | n/a |")
            continue
        gs = "–" if spec.kind == "set" else fmt(m.get("g_std"), 4)
        lines.append(f"| {label} | {fmt(m.get('mean'), spec.decimals)} | {gs} |")
    lstd = summary.get("stability", {}).get("l_std")
    lines.append(f"| L-STD ↓ | {fmt(lstd, 4)} | |")
    lines += ["", f"N = {summary['n_runs']} run(s), M = {summary['n_images_all_runs']} image(s) scored in every run. "
              "G-STD: mean over images of the population std over runs (CCSR Eq. 4); L-STD: mean per-pixel std "
              "over runs, RGB [0, 1], 4-px border crop (CCSR Sec. 4.2). FID is folder-level: no G-STD."]
    cc = summary.get("psnr_ssim_crosscheck", {})
    for n in ("psnr", "ssim"):
        if n in summary["metrics"] and summary["metrics"][n].get("available"):
            src = summary["metrics"][n].get("source", "")
            note = f"- {n.upper()}: reported {src}"
            if n in cc and cc[n].get("max_abs_diff") is not None:
                note += f"; cross-check {cc[n]['cross_check']}: max |Δ| = {cc[n]['max_abs_diff']:.2e}"
                if cc[n].get("max_abs_diff_eps_corrected") is not None:
                    note += f" ({cc[n]['max_abs_diff_eps_corrected']:.2e} after removing pyiqa's MSE eps)"
            lines.append(note)
    for n, reason in summary.get("unavailable", {}).items():
        lines.append(f"- {n}: {reason}")
    problems = sum(len(p["only_first"]) + len(p["only_second"]) + len(p["duplicates"]) + len(p["size_mismatches"])
                   for p in summary.get("pairing", {}).values())
    if problems:
        lines.append(f"- pairing: {problems} file(s) not scored (missing partner, duplicate key or size "
                     f"mismatch) — listed in summary.json and per run in the log")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, f.getvalue())


def write_reports(result: EvalResult, out_dir: str | Path, names: list[str], extra: dict | None = None,
                  title: str = "") -> dict:
    """Write the four report files (module docstring) into ``out_dir``; returns the summary dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "per_image.csv", result.rows)
    _write_csv(out / "per_image_std.csv", result.std_rows)
    summary = summary_dict(result, names, extra)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=False))
    atomic_write_text(out / "summary.md", markdown_table(summary, title))
    return summary

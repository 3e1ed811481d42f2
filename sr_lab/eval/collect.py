"""Collect the jobs of an evaluation sweep into a table and a perception-distortion plot.

``sr-collect <sweep dir>`` / ``make collect DIR=<sweep dir>``, and automatically at the end of an
``sr-eval`` multirun (Hydra callback :class:`CollectOnMultirunEnd`). Reads every
``<sweep dir>/*/summary.json`` and writes into the sweep folder:

* ``collected.md`` — one row per job in the layout of CCSR Table 5 (paper 000): ``Indices`` (the
  job's ``variant``, e.g. A1 … CCSR, or its overrides), ``(t_max, t_min, S)`` when the job ran the
  truncated sampler (t as a fraction of T, S = executed steps), then ``<METRIC>/G-STD`` cells
  (``mean/G-STD``) for ``collect.metrics`` and ``L-STD``; "n/a" for unavailable metrics.
* ``collected.json`` — the same numbers, machine-readable.
* ``perception_distortion.png`` — every job as a point (x = distortion metric, default PSNR;
  y = perception metric, default the first available of MUSIQ, CLIPIQA, MANIQA, NIQE, LPIPS, DISTS,
  SSIM) with G-STD error bars, labelled by row name; axis labels carry ↑/↓. Drawn with matplotlib
  (Agg) when installed, otherwise with PIL.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from sr_lab.utils.atomic import atomic_save_image, atomic_write, atomic_write_text

from .metrics import METRICS
from .report import fmt

log = logging.getLogger(__name__)

__all__ = ["load_jobs", "collect_rows", "table_markdown", "pd_axes", "plot_pd", "collect", "CollectOnMultirunEnd", "main"]

PD_Y_ORDER = ("musiq", "clipiqa", "maniqa", "niqe", "lpips", "dists", "ssim")


def _job_num(p: Path) -> tuple[int, str]:
    name = p.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def load_jobs(sweep_dir: str | Path) -> list[dict]:
    """Summaries of ``<sweep_dir>/*/summary.json`` (or ``<sweep_dir>/summary.json``) in job order; a job
    that stopped on a bad value has ``failed.json`` instead (kept, with its ``error``)."""
    root = Path(sweep_dir)
    files = sorted([*root.glob("*/summary.json"), *root.glob("*/failed.json")], key=_job_num)
    if not files and (root / "summary.json").is_file():
        files = [root / "summary.json"]
    jobs = []
    for f in files:
        s = json.loads(f.read_text())
        s["_dir"] = str(f.parent)
        jobs.append(s)
    return jobs


def t_fraction(v: float | None) -> str:
    """0.6667 -> '2T/3', 0.5 -> 'T/2', 1 -> 'T' (denominators up to 10), else '0.xxT'."""
    if v is None:
        return "?"
    f = Fraction(float(v)).limit_denominator(10)
    if abs(float(f) - float(v)) > 5e-4:
        return f"{float(v):.3g}T"
    if f == 0:
        return "0"
    num = "" if f.numerator == 1 else str(f.numerator)
    return f"{num}T" if f.denominator == 1 else f"{num}T/{f.denominator}"


def _label(job: dict, i: int, varying: set[str] | None = None) -> str:
    """The job's ``variant``, else its overrides that differ between the jobs of the sweep."""
    if job.get("variant"):
        return str(job["variant"])
    ov = [o for o in job.get("overrides") or [] if varying is None or o in varying]
    return " ".join(ov) or str(job.get("label") or f"job {i}")


def _varying(jobs: list[dict]) -> set[str] | None:
    """Override tokens not shared by every job (the swept values); None for a single job."""
    if len(jobs) < 2:
        return None
    sets = [set(j.get("overrides") or []) for j in jobs]
    return set.union(*sets) - set.intersection(*sets)


def _sampler_cell(job: dict) -> str | None:
    s = job.get("sampler") or {}
    if s.get("t_max") is None or s.get("t_min") is None:
        return None
    steps = job.get("executed_steps")
    return f"({t_fraction(s['t_max'])}, {t_fraction(s['t_min'])}, {steps if steps is not None else '?'})"


def collect_rows(jobs: list[dict], metrics: list[str]) -> list[dict]:
    """One dict per job: label, sampler cell, per-metric mean / G-STD (None if unavailable), L-STD."""
    rows = []
    varying = _varying(jobs)
    for i, job in enumerate(jobs):
        row: dict[str, Any] = {"label": _label(job, i, varying), "dir": job.get("_dir"), "sampler": _sampler_cell(job),
                               "l_std": (job.get("stability") or {}).get("l_std"), "metrics": {},
                               "error": job.get("error")}
        for name in metrics:
            m = (job.get("metrics") or {}).get(name) or {}
            row["metrics"][name] = {"mean": m.get("mean") if m.get("available") else None,
                                    "g_std": m.get("g_std") if m.get("available") else None,
                                    "reason": None if m.get("available") else m.get("reason", "not computed")}
        rows.append(row)
    return rows


def table_markdown(rows: list[dict], metrics: list[str], title: str | None = None) -> str:
    """CCSR Table 5 layout: Indices | (t_max, t_min, S) | METRIC/G-STD … | L-STD."""
    with_sampler = any(r["sampler"] for r in rows)
    head = ["Indices"] + (["(t_max, t_min, S)"] if with_sampler else [])
    head += [f"{METRICS[n].arrow} {METRICS[n].label}/G-STD ↓" if METRICS[n].kind != "set" else f"{METRICS[n].arrow} {METRICS[n].label}"
             for n in metrics] + ["L-STD ↓"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                      "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + ([r["sampler"] or ""] if with_sampler else [])
        for n in metrics:
            m = r["metrics"][n]
            if m["mean"] is None:
                cells.append("n/a")
            elif METRICS[n].kind == "set":
                cells.append(fmt(m["mean"], METRICS[n].decimals))
            else:
                cells.append(f"{fmt(m['mean'], METRICS[n].decimals)}/{fmt(m['g_std'], 4)}")
        cells.append(fmt(r["l_std"], 4))
        if r.get("error"):
            cells[len(cells) - len(metrics) - 1:] = ["failed"] * (len(metrics) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"- {n}: {m['reason']}" for r in rows for n, m in r["metrics"].items()
                    if m["reason"] and not r.get("error")})
    notes += [f"- {r['label']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _available(jobs: list[dict], name: str) -> bool:
    return any(((j.get("metrics") or {}).get(name) or {}).get("available") and
               (j["metrics"][name].get("mean") is not None) for j in jobs)


def pd_axes(jobs: list[dict], x: str = "psnr", y: str = "auto") -> tuple[str, str | None]:
    """Resolve the perception-distortion axes (``y='auto'``: first available of :data:`PD_Y_ORDER`)."""
    if y == "auto":
        y = next((n for n in PD_Y_ORDER if n != x and _available(jobs, n)), None)
    return x, y


def _points(jobs: list[dict], x: str, y: str) -> list[tuple[str, float, float, float, float]]:
    pts = []
    varying = _varying(jobs)
    for i, j in enumerate(jobs):
        mx, my = (j.get("metrics") or {}).get(x) or {}, (j.get("metrics") or {}).get(y) or {}
        if mx.get("mean") is None or my.get("mean") is None:
            continue
        if not (math.isfinite(mx["mean"]) and math.isfinite(my["mean"])):
            continue
        pts.append((_short(_label(j, i, varying)), mx["mean"], my["mean"], mx.get("g_std") or 0.0, my.get("g_std") or 0.0))
    return pts


def _axis_label(name: str) -> str:
    s = METRICS[name]
    return f"{s.label} {s.arrow}"


def _short(label: str) -> str:
    """Plot label: ``infer.sampler.t_max=0.5 infer.sampler.t_min=0.2`` -> ``t_max=0.5 t_min=0.2``."""
    return " ".join(tok.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + tok.split("=", 1)[1] if "=" in tok else tok
                    for tok in label.split())


def _y_title(y: str) -> str:
    return _axis_label(y) + (" (no perceptual metric available)" if y == "ssim" else " (perception)")


def _plot_matplotlib(pts, x: str, y: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for lab, px, py, ex, ey in pts:
        ax.errorbar(px, py, xerr=ex, yerr=ey, fmt="o", capsize=3)
        ax.annotate(lab, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(_axis_label(x) + " (distortion)")
    ax.set_ylabel(_y_title(y))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _plot_pil(pts, x: str, y: str, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 640, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [p[1] for p in pts]
    ys = [p[2] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (w - 2 * m) / ((x1 - x0) or 1.0)
    sy = (h - 2 * m) / ((y1 - y0) or 1.0)
    d.rectangle([m, m, w - m, h - m], outline="black")
    for lab, px, py, _, _ in pts:
        cx, cy = m + (px - x0) * sx, h - m - (py - y0) * sy
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(31, 119, 180))
        d.text((cx + 6, cy - 12), lab, fill="black")
    d.text((m, h - m + 20), f"{_axis_label(x)} (distortion): {x0:.4g} .. {x1:.4g}", fill="black")
    d.text((5, 5), f"{_y_title(y)}: {y0:.4g} .. {y1:.4g}   {title}", fill="black")
    atomic_save_image(path, img, format="PNG")


def plot_pd(jobs: list[dict], path: str | Path, x: str = "psnr", y: str = "auto", title: str = "") -> Path | None:
    """Perception-distortion plot of the jobs; None (with a log line) if an axis has no value."""
    x, y = pd_axes(jobs, x, y)
    if y is None or not _available(jobs, x):
        log.warning("perception-distortion plot skipped: no available metric for the %s axis",
                    "perception" if y is None else "distortion")
        return None
    pts = _points(jobs, x, y)
    if not pts:
        return None
    path = Path(path)
    title = title or f"{len(pts)} runs"
    try:
        _plot_matplotlib(pts, x, y, path, title)
    except ImportError:
        _plot_pil(pts, x, y, path, title)
    return path


def collect(sweep_dir: str | Path, metrics: list[str] | None = None, pd_x: str = "psnr", pd_y: str = "auto",
            title: str | None = None) -> dict:
    """Write ``collected.md``, ``collected.json`` and ``perception_distortion.png`` into ``sweep_dir``."""
    root = Path(sweep_dir)
    jobs = load_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no */summary.json under {root} (is it an sr-eval output or multirun folder?)")
    metrics = list(metrics or ["psnr", "lpips", "musiq"])
    for n in metrics + [pd_x] + ([] if pd_y == "auto" else [pd_y]):
        if n not in METRICS:
            raise ValueError(f"collect: unknown metric {n!r} (known: {', '.join(METRICS)})")
    rows = collect_rows(jobs, metrics)
    md = table_markdown(rows, metrics, title)
    atomic_write_text(root / "collected.md", md)
    x, y = pd_axes(jobs, pd_x, pd_y)
    plot = plot_pd(jobs, root / "perception_distortion.png", pd_x, pd_y, title or "")
    out = {"sweep_dir": str(root), "metrics": metrics, "rows": rows, "pd_axes": [x, y],
           "plot": str(plot) if plot else None}
    atomic_write_text(root / "collected.json", json.dumps(out, indent=2))
    log.info("collected %d job(s) of %s:\n%s", len(rows), root, md)
    return out


try:  # Hydra >= 1.1 callback API
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class CollectOnMultirunEnd(_Callback):
    """Hydra callback: collect the sweep folder when a multirun ends (``collect`` node of the eval config)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        c = config.get("collect") or {}
        try:
            collect(sweep_dir, list(c.get("metrics") or []) or None, str(c.get("pd_x") or "psnr"),
                    str(c.get("pd_y") or "auto"), c.get("title"))
        except Exception as exc:  # collecting must never hide the jobs' own results
            log.warning("collecting %s failed: %s", sweep_dir, exc)


def main(argv: list[str] | None = None) -> None:
    """``sr-collect <sweep dir> [--metrics psnr,lpips,musiq] [--x psnr] [--y auto] [--title ...]``."""
    p = argparse.ArgumentParser(prog="sr-collect", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--metrics", default="psnr,lpips,musiq", help="comma-separated table columns")
    p.add_argument("--x", default="psnr", help="distortion axis of the plot")
    p.add_argument("--y", default="auto", help="perception axis of the plot (auto: first available)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = collect(a.sweep_dir, [m for m in a.metrics.split(",") if m], a.x, a.y, a.title)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sr-collect: {exc}")
        raise SystemExit(2) from None
    if out["plot"]:
        print(f"plot: {out['plot']}")


if __name__ == "__main__":
    main()

"""Score SR runs against an HR folder: pairing, per-image metrics, set metrics, stability.

A *run* is one folder of SR images (one seed). :func:`discover_runs` turns an SR folder into runs:
its ``seed_<k>/`` sub-folders (the layout ``sr-infer`` writes: ``<output_dir>/seed_<k>/<stem>.png``),
or the folder itself. Every run is paired with the HR folder by :func:`sr_lab.data.paired.pair_key`
(so ``Canon_001_LR4.png`` -> ``Canon_001_HR.png``) and sizes must agree; missing partners,
duplicate keys and size mismatches are listed in the report and logged, never silently dropped.

Set value of a metric = mean over runs of the mean over that run's images (the papers average the
N = 10 runs; spec §4.1 "set-level number = mean of per-image values"). Stability (CCSR Sec. 4.2):
G-STD over the images present in *every* run; L-STD on the SR images of those images (same size in
every run). FID is folder-level (GT folder vs SR folder, restricted to the scored pairs); it has no
G-STD (CCSR Table 1 note) — its population std over runs is recorded instead.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sr_lab.data.images import read_rgb_uint8
from sr_lab.data.paired import PairReport, check_sizes, pair_files, pair_key
from sr_lab.data.samples import find_images

from .metrics import METRICS, Metric
from .stability import L_STD_CROP, g_std_from_scores, l_std_image

log = logging.getLogger(__name__)

__all__ = ["Run", "discover_runs", "load_image", "EvalResult", "score_runs"]

_SEED_DIR = re.compile(r"^seed_(-?\d+)$")
_PYIQA_PSNR_EPS = 1e-8  # pyiqa psnr: 10 log10(1 / (mse + 1e-8)) on the [0, 1] scale


@dataclass(frozen=True)
class Run:
    name: str
    sr_dir: Path


def discover_runs(sr_dir: str | os.PathLike) -> list[Run]:
    """``seed_<k>/`` sub-folders of ``sr_dir`` as runs (sorted by k), else ``sr_dir`` itself as one run."""
    root = Path(sr_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"SR folder {root} does not exist")
    seeds = []
    for d in root.iterdir():
        m = _SEED_DIR.match(d.name)
        if d.is_dir() and m:
            seeds.append((int(m.group(1)), d))
    if seeds:
        return [Run(d.name, d) for _, d in sorted(seeds)]
    return [Run(root.name or "run", root)]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """(1, 3, H, W) float64 RGB in [0, 1] (8-bit decode; grayscale/alpha converted as the data module does)."""
    arr, _ = read_rgb_uint8(path)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].double() / 255.0


def _crop(x: torch.Tensor, b: int) -> torch.Tensor:
    return x[..., b:-b, b:-b] if b > 0 else x


@dataclass
class EvalResult:
    """Everything one evaluation produced (see :mod:`sr_lab.eval.report` for the files)."""

    runs: list[Run]
    metrics: dict[str, Metric]
    unavailable: dict[str, str]
    pairing: dict[str, PairReport] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # one per (image, run)
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric -> image -> run -> v
    set_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> run -> v
    crosscheck: dict[str, dict] = field(default_factory=dict)
    stability: dict = field(default_factory=dict)
    std_rows: list[dict] = field(default_factory=list)  # one per image: per-metric std over runs, l_std
    messages: list[str] = field(default_factory=list)

    @property
    def common_images(self) -> list[str]:
        """Images scored in every run."""
        sets = [set(r["image"] for r in self.rows if r["run"] == run.name) for run in self.runs]
        return sorted(set.intersection(*sets)) if sets else []

    def metric_summary(self, name: str) -> dict:
        """Mean, G-STD, per-run means of a reported metric (or why it is unavailable)."""
        spec = METRICS[name]
        base = {"label": spec.label, "lower_better": spec.lower_better, "kind": spec.kind}
        if name in self.unavailable:
            return {**base, "available": False, "reason": self.unavailable[name]}
        m = self.metrics[name]
        if spec.kind == "set":
            per_run = self.set_scores.get(name, {})
            vals = [v for v in per_run.values() if v is not None and math.isfinite(v)]
            return {**base, "available": bool(vals), "source": m.source, "per_run": per_run,
                    "mean": float(np.mean(vals)) if vals else None,
                    "std_over_runs": float(np.std(vals)) if vals else None, "g_std": None,
                    **({} if vals else {"reason": self.messages_for(name)})}
        per_img = self.scores.get(name, {})
        per_run = {}
        for run in self.runs:
            v = [per_img[k][run.name] for k in per_img if run.name in per_img[k]]
            per_run[run.name] = float(np.mean(v)) if v else None
        run_means = [v for v in per_run.values() if v is not None]
        common = {k: per_img[k] for k in self.common_images if k in per_img}
        gs, _ = g_std_from_scores(common) if common else (None, {})
        return {**base, "available": bool(run_means), "source": m.source, "per_run": per_run,
                "mean": float(np.mean(run_means)) if run_means else None, "g_std": gs,
                "n_images": len(per_img), "n_images_all_runs": len(common)}

    def messages_for(self, name: str) -> str:
        hits = [m for m in self.messages if name in m]
        return hits[-1] if hits else "no value"


def _pair_run(run: Run, hr_files: list[str] | None) -> PairReport:
    sr_files = find_images(run.sr_dir, recursive=False)
    if hr_files is None:  # no-reference only: every SR image is "paired" with nothing (duplicates still reported)
        rep = pair_files([], sr_files)
        rep.pairs = {pair_key(f): ("", f) for f in rep.only_b}
        rep.only_b = []
        return rep
    return check_sizes(pair_files(hr_files, sr_files), scale=1)


def _log_pairing(run: Run, rep: PairReport, result: EvalResult) -> None:
    for line in rep.problems():
        msg = f"[{run.name}] {line}"
        log.warning("%s", msg)
        result.messages.append(msg)
    if not rep.usable:
        msg = f"[{run.name}] no scorable SR/HR pair in {run.sr_dir}"
        log.warning("%s", msg)
        result.messages.append(msg)


def _score_image(sr: torch.Tensor, hr: torch.Tensor | None, metrics: dict[str, Metric], cross: dict[str, Metric],
                 crop_border: int, crop_all: bool) -> tuple[dict[str, float], dict[str, float]]:
    vals, other = {}, {}
    for name, m in metrics.items():
        kind = m.spec.kind
        if kind == "set" or (kind == "fr" and hr is None):
            continue
        b = crop_border if (name in ("psnr", "ssim") or crop_all) else 0
        x, y = _crop(sr, b), (_crop(hr, b) if hr is not None else None)
        vals[name] = float(m.fn(x, y)[0])
        if name in cross:
            other[name] = float(cross[name].fn(x, y)[0])
    return vals, other


def _crosscheck(result: EvalResult, cross: dict[str, Metric]) -> None:
    for name, other in cross.items():
        reported = result.metrics[name]
        col = f"{name}_{other.impl}"
        pairs = [(r[name], r[col]) for r in result.rows if name in r and col in r]
        diffs = [abs(a - b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        entry = {"reported": reported.source, "cross_check": other.source, "column": col, "n": len(pairs),
                 "n_nonfinite": len(pairs) - len(diffs), "max_abs_diff": max(diffs) if diffs else None}
        if name == "psnr":  # remove pyiqa's +1e-8 on the MSE, then both are BasicSR's Y-PSNR
            def corr(p_pyiqa: float) -> float:
                mse = 10 ** (-p_pyiqa / 10) - _PYIQA_PSNR_EPS
                return -10 * math.log10(mse) if mse > 0 else math.inf

            py_first = reported.source.startswith("pyiqa")
            cd = [abs(corr(a) - b) if py_first else abs(a - corr(b)) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
            entry["max_abs_diff_eps_corrected"] = max(cd) if cd else None
            entry["unit"] = "dB"
        else:
            entry["note"] = ("pyiqa SSIM rounds Y to integers (after scaling to 255) and applies a ReLU to the "
                             "contrast-structure map; BasicSR's SSIM does neither, so small differences are expected")
        result.crosscheck[name] = entry


def _set_metric(name: str, m: Metric, run: Run, rep: PairReport, fid_opts: dict, result: EvalResult) -> None:
    usable = rep.usable
    if len(usable) < 2:
        msg = f"[{run.name}] {name}: needs at least 2 scored images, got {len(usable)}"
        log.warning("%s", msg)
        result.messages.append(msg)
        result.set_scores.setdefault(name, {})[run.name] = None
        return
    with tempfile.TemporaryDirectory(prefix="sr_lab_fid_") as tmp:
        hr_d, sr_d = Path(tmp, "hr"), Path(tmp, "sr")
        hr_d.mkdir()
        sr_d.mkdir()
        for k, (hr, sr) in usable.items():  # only the scored pairs, same names on both sides
            os.symlink(Path(hr).resolve(), hr_d / f"{k}{Path(hr).suffix}")
            os.symlink(Path(sr).resolve(), sr_d / f"{k}{Path(sr).suffix}")
        value = m.fn(str(hr_d), str(sr_d), verbose=False, **fid_opts)  # pyiqa passes its own device
    result.set_scores.setdefault(name, {})[run.name] = float(value)


def _stability(result: EvalResult, crop: int) -> None:
    common = result.common_images
    n_runs = len(result.runs)
    excluded = []
    per_image_lstd: dict[str, float] = {}
    by_key = {(r["image"], r["run"]): r["sr_path"] for r in result.rows}
    for k in common:
        imgs = [load_image(by_key[(k, run.name)]) for run in result.runs]
        if len({tuple(i.shape) for i in imgs}) != 1:
            excluded.append(f"{k}: SR sizes differ across runs {[tuple(i.shape[-2:]) for i in imgs]}")
            continue
        try:
            per_image_lstd[k] = l_std_image(torch.cat(imgs), crop)
        except ValueError as exc:
            excluded.append(f"{k}: {exc}")
    all_imgs = sorted({r["image"] for r in result.rows})
    partial = [k for k in all_imgs if k not in common]
    for k in partial:
        excluded.append(f"{k}: not scored in every run (excluded from G-STD/L-STD)")
    for line in excluded:
        result.messages.append(f"stability: {line}")
        log.warning("stability: %s", line)
    result.stability = {"n_runs": n_runs, "n_images": len(per_image_lstd), "crop_border": crop,
                        "l_std": float(np.mean(list(per_image_lstd.values()))) if per_image_lstd else None,
                        "excluded": excluded}
    names = [n for n in result.scores]
    for k in common:
        row = {"image": k}
        for n in names:
            if k in result.scores[n] and len(result.scores[n][k]) == n_runs:
                row[f"{n}_std"] = float(np.std(list(result.scores[n][k].values())))
        row["l_std"] = per_image_lstd.get(k)
        result.std_rows.append(row)


def score_runs(runs: list[Run], hr_dir: str | os.PathLike | None, metrics: dict[str, Metric],
               cross: dict[str, Metric], unavailable: dict[str, str], *, crop_border: int, crop_all: bool = False,
               fid_opts: dict | None = None,
               l_std_crop: int = L_STD_CROP) -> EvalResult:
    """Score every run (see the module docstring); ``metrics``/``cross``/``unavailable`` from
    :func:`sr_lab.eval.metrics.build_metrics`."""
    result = EvalResult(runs=list(runs), metrics=dict(metrics), unavailable=dict(unavailable))
    hr_files = find_images(hr_dir, recursive=False) if hr_dir else None
    if hr_files is None:
        for name, m in list(result.metrics.items()):
            if m.spec.kind in ("fr", "set"):
                result.unavailable[name] = f"metric {name} unavailable: it needs the HR folder (hr_dir is not set)"
                del result.metrics[name]
                cross.pop(name, None)
    for run in runs:
        rep = _pair_run(run, hr_files)
        result.pairing[run.name] = rep
        _log_pairing(run, rep, result)
        for key, (hr_path, sr_path) in rep.usable.items():
            sr = load_image(sr_path)
            hr = load_image(hr_path) if hr_path else None
            vals, other = _score_image(sr, hr, result.metrics, cross, crop_border, crop_all)
            row = {"image": key, "run": run.name, "sr_path": sr_path, "hr_path": hr_path, **vals}
            row.update({f"{n}_{cross[n].impl}": v for n, v in other.items()})
            result.rows.append(row)
            for n, v in vals.items():
                result.scores.setdefault(n, {}).setdefault(key, {})[run.name] = v
        for name, m in result.metrics.items():
            if m.spec.kind == "set":
                _set_metric(name, m, run, rep, fid_opts or {}, result)
    _crosscheck(result, cross)
    _stability(result, l_std_crop)
    return result

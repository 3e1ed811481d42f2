"""Every preset's toy run on the embedded default (``backbone=tiny``, the trained tiny prior; scikit-image photos),
at its default toy schedule, chained as README "StableSR and CCSR, stage by stage" / "AddSR" / "ClearSR" chain
them: what ``make train EXP=<preset>`` reaches, as PSNR-Y of the validation SR next to the bicubic baseline of the
same LR/HR pairs (``metrics.json``: ``val/psnr_y``, ``val/psnr_y_bicubic``).

    python benchmarks/toy_presets.py [--presets ccsr_stage1 ccsr_stage2 ...] [--out DIR] [--threads 1] [--seed 0]
    python benchmarks/toy_presets.py --collect DIR [DIR ...] [--out DIR]   # tabulate finished runs, no training

Each preset is one ``python -m sr_lab.train`` process (one at a time; ``--threads`` torch/OpenMP threads:
one is faster than two on a CPU shared with other jobs). Prints one table (markdown) and writes it with the
numbers as ``<out>/toy_presets.{md,json}`` (default ``benchmarks/results/toy_presets/<date>_<cpu>``). Measured
numbers only: a preset that fails is a row saying so, with its log's last line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: preset -> (extra overrides given the runs folder, presets whose outputs it reads). Order = run order.
CHAIN: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "ccsr_stage1": ([], ()),
    "ccsr_stage2": (["stage1={runs}/ccsr_stage1/export", "perceptual.allow_random_init=true"], ("ccsr_stage1",)),
    "stablesr_stage1": ([], ()),
    "stablesr_latents": (["stage1={runs}/stablesr_stage1/export", "records.dir={runs}/stablesr_records"],
                         ("stablesr_stage1",)),
    "stablesr_cfw": (["records.dir={runs}/stablesr_records", "perceptual.allow_random_init=true"],
                     ("stablesr_latents",)),
    "clearsr": ([], ()),
    "addsr_teacher": ([], ()),
    "addsr": (["teacher={runs}/addsr_teacher"], ("addsr_teacher",)),
}


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:40]


def run_preset(preset: str, runs: Path, seed: int, threads: int, extra: list[str]) -> dict:
    args, _ = CHAIN[preset]
    out = runs / preset
    cmd = [sys.executable, "-m", "sr_lab.train", f"experiment={preset}", f"seed={seed}", "logger=csv",
           "train.progress=log", f"hydra.run.dir={out}", *[a.format(runs=runs) for a in args], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {"preset": preset, "command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "returncode": proc.returncode}
    (runs / f"{preset}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        row["error"] = tail[0][:300]
        return row
    return read_run(row, out, runs)


def read_run(row: dict, out: Path, runs: Path) -> dict:
    """Add the finished run's schedule, metrics and last grid (from ``out``) to ``row``."""
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    stored = out / ".hydra" / "config.yaml"
    if stored.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(stored)
        row["iterations"] = OmegaConf.select(cfg, "train.iterations", default=None)
        row["lr"] = OmegaConf.select(cfg, "optim.lr", default=None)
        row["batch"] = OmegaConf.select(cfg, "train.total_batch_size", default=None)
        row["crop"] = OmegaConf.select(cfg, "data.crop_size", default=None)
    row["metrics"] = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
    grids = sorted((out / "csv").glob("version_*/images/val_lr_sr_hr_step*.png"))
    row["grid"] = str(grids[-1].relative_to(runs)) if grids else None
    return row


def train_log_wall(out: Path) -> float | None:
    """Seconds between the first and last timestamped line of ``<out>/train.log`` (``--collect``)."""
    import re

    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", (out / "train.log").read_text(), re.M) \
        if (out / "train.log").is_file() else []
    if len(stamps) < 2:
        return None
    first, last = (dt.datetime.strptime(x, "%Y-%m-%d %H:%M:%S") for x in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def collect(folders: list[Path]) -> list[dict]:
    """Rows of finished runs under ``<folder>/runs/<preset>/`` (several folders: e.g. two partial sweeps), in
    chain order; a preset without a ``metrics.json`` is left out. Wall time from the run's train.log."""
    rows = []
    for preset in CHAIN:
        for folder in folders:
            out = folder / "runs" / preset
            if (out / "metrics.json").is_file():
                rows.append(read_run({"preset": preset, "returncode": 0, "wall_s": train_log_wall(out) or 0.0},
                                     out, folder / "runs"))
                break
    return rows


def fmt(v, spec=".2f") -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| preset | iterations × batch (crop), lr | wall | val PSNR-Y | bicubic PSNR-Y | SR − bicubic |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("returncode"):
            lines.append(f"| {r['preset']} | failed (exit {r['returncode']}): {r.get('error', '')} | "
                         f"{r['wall_s']:.0f} s | | | |")
            continue
        m = r.get("metrics", {})
        sr, bic = m.get("val/psnr_y"), m.get("val/psnr_y_bicubic")
        sched = f"{r.get('iterations')} × {r.get('batch')} ({r.get('crop')} px), {r.get('lr')}"
        diff = None if sr is None or bic is None else sr - bic
        note = "" if sr is not None else " (no validation: writes latent records)"
        lines.append(f"| {r['preset']} | {sched}{note} | {r['wall_s']:.0f} s | {fmt(sr)} | {fmt(bic)} | "
                     f"{fmt(diff, '+.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(CHAIN), choices=list(CHAIN))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every preset")
    ap.add_argument("--collect", type=Path, nargs="+", default=None,
                    help="no training: tabulate the finished runs of these earlier --out folders")
    args = ap.parse_args(argv)
    if args.collect:
        rows = collect(args.collect)
        md = (f"Collected from {', '.join(str(f) for f in args.collect)} ({machine()}); wall = first to last line "
              f"of each run's train.log\n\n" + table(rows) + "\n")
        print(md)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "toy_presets.md").write_text(md)
            (args.out / "toy_presets.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return rows
    stamp = dt.datetime.now()
    out = args.out or ROOT / "benchmarks" / "results" / "toy_presets" / f"{stamp:%Y-%m-%d_%H%M}_{slug(machine())}"
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    wanted = set(args.presets)
    for p in list(wanted):  # a chained preset needs the ones it reads
        wanted |= set(CHAIN[p][1])
    rows = []
    start = time.perf_counter()
    for preset in (p for p in CHAIN if p in wanted):
        print(f"[toy_presets] {preset} ...", flush=True)
        row = run_preset(preset, runs, args.seed, args.threads, args.override)
        rows.append(row)
        m = row.get("metrics", {})
        print(f"[toy_presets] {preset}: exit {row['returncode']}, {row['wall_s']:.0f} s, "
              f"val/psnr_y {fmt(m.get('val/psnr_y'))} vs bicubic {fmt(m.get('val/psnr_y_bicubic'))}", flush=True)
    total = time.perf_counter() - start
    head = (f"Toy runs of every preset (`python benchmarks/toy_presets.py`), {stamp:%Y-%m-%d %H:%M}, {machine()}, "
            f"CPU, {args.threads} thread(s) per run, seed {args.seed}; total {total / 60:.1f} min")
    md = head + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    (out / "toy_presets.md").write_text(md)
    (out / "toy_presets.json").write_text(json.dumps(
        {"date": stamp.isoformat(timespec="minutes"), "machine": machine(), "threads": args.threads,
         "seed": args.seed, "total_s": round(total, 1), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()

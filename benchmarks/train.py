"""Training throughput of a stage as ``sr-train`` runs it: samples/s, a step-time breakdown, MFU, peak memory.

The stage is built and trained by ``sr_lab.train.run`` itself from the composed Hydra config — the same
groups, overrides and code path as ``sr-train experiment=<name> backbone=... trainer.precision=... data...``
— and a small timing harness is attached to the objects ``run`` builds (``Trainer.fit`` is intercepted for
the call; nothing is re-implemented). Per training iteration (one Lightning ``advance``: one batch; the
benchmark runs without accumulation, ``train.total_batch_size = data.batch_size``) it times:

* ``data``     — from the start of the iteration to the start of the degradation: the DataLoader's next
  batch (the main process's wait: decode + crop with ``data.num_workers=0``, the queue otherwise), Lightning's
  batch hooks and the host-to-device copy;
* ``degrade``  — ``SRDataModule.on_after_batch_transfer`` (the device degradation, the pair pool if on);
* ``vae``      — ``Backbone.encode`` inside the training step (HR latents and the LR condition);
* ``fwd+bwd``  — the rest of ``training_step``: the adapter + UNet forward, the loss and the backward
  pass(es) (CCSR's alternate mode: both loss parts);
* ``optim``    — ``step_optimizer`` (clip, ``optimizer.step``, ``zero_grad``; the DDP all-reduce if any);
* ``log``      — ``self.log`` / ``log_dict`` in the step and Lightning's logger connector after it (metric
  reduction, the CSV logger's writes every ``train.log_every`` iterations);
* ``other``    — what is left of the iteration: Lightning's loop and callback hooks (progress log,
  checkpoint checks).

On CUDA every boundary is a CUDA event in the current stream and the device is synchronised only at the
iteration boundaries (the pieces partition the GPU timeline between them; a piece whose CPU work overlaps
earlier GPU work gets only its own share); on the CPU they are ``time.perf_counter`` stamps. The first
``--warmup`` iterations are not timed (``torch.compile`` and allocator warm-up happen there), then one
iteration runs under ``torch.utils.flop_counter.FlopCounterMode`` (compiled modules eagerly) to count the
FLOPs of a training step (``training_step``: VAE encode, forward, backward — the model's matrix FLOPs,
not the degradation), then ``--steps`` iterations are timed. MFU = FLOPs per step / mean step time / the
device's dense bf16 peak (``benchmarks/flops.py``; ``--peak-tflops`` overrides; on a CPU there is no peak,
MFU "n/a"). Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA, the process's peak
RSS on the CPU (there the line also gives the process CPU time per step: on a shared machine the wall time
inflates with other jobs' load, the CPU time much less).

Defaults: on CUDA the paper-scale step of SD 2.1 (``backbone=sd21_shape``: its exact architecture with
random weights, ``backbone.allow_training=true``), 512 crops, batch 8, ``bf16-mixed``, 20 steps after 5
warm-up; on a CPU a reduced size that runs anywhere (tiny backbone, 64 crops, batch 2, fp32, 3 steps after
1 warm-up). The data are the embedded sample photos unless overridden (e.g. ``data=folder
data.hr_dirs=/data/DIV2K``); extra ``KEY=VALUE`` arguments are Hydra overrides applied last.

Prints one line per experiment, e.g.

    train ccsr_stage1 sd21_shape 512 b8 bf16-mixed cuda (NVIDIA H200): X samples/s, step Y ms (median M) =
    data a | degrade b | vae c | fwd+bwd d | optim e | log f | other g ms, MFU h% (F TFLOP/step, A TFLOP/s),
    peak Z GiB (torch.cuda.max_memory_allocated)

samples/s, the breakdown and MFU use the mean over the timed steps (the throughput); the median is there
for shared machines, where single steps can take several times longer.

Usage: python benchmarks/train.py [--experiment ccsr_stage1 stablesr_stage1] [--backbone tiny|sd21_shape]
       [--crop 512] [--batch 8] [--steps 20] [--warmup 5] [--precision bf16-mixed|32]
       [--compile] [--channels-last] [--workers N] [--peak-tflops T] [--json out.json] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flops.py next to this file

from sr_lab.utils.device import device_name  # noqa: E402

PIECES = ("data", "degrade", "vae", "fwd+bwd", "optim", "log", "other")
EXPERIMENTS = ("ccsr_stage1", "stablesr_stage1")


# --- FLOPs and peaks (benchmarks/flops.py when it is there) --------------------------------------------
try:  # the shared helpers: FlopCounterMode incl. CPU flash attention, the dense peak table
    from flops import device_peak, eager, flop_counter  # noqa: E402
except Exception:  # noqa: BLE001 - missing or changed: a minimal own version
    def flop_counter():
        from torch.utils.flop_counter import FlopCounterMode

        return FlopCounterMode(display=False)

    def eager():
        set_stance = getattr(torch.compiler, "set_stance", None)
        return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()

    def device_peak(device, precision, override=None):
        if override is not None:
            return float(override), "--peak-tflops"
        return None, "no peak table (benchmarks/flops.py missing): pass --peak-tflops"


# --- the timing harness --------------------------------------------------------------------------------
class Clock:
    """Marks on the device timeline: CUDA events (no sync) or ``perf_counter`` stamps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class StepTimer:
    """Wraps the methods ``sr_lab.train.run`` calls on the objects it built and times every iteration.

    Iterations ``< warmup`` are not recorded; iteration ``warmup`` runs under the FLOP counter (if
    ``count_flops``) and is not recorded; the rest are (``records``: one ``{piece: seconds, "step": s}`` each).
    """

    def __init__(self, device: torch.device, warmup: int, count_flops: bool = True):
        self.clock = Clock(device)
        self.device = device
        self.warmup = int(warmup)
        self.count_flops = count_flops
        self.iteration = 0
        self.records: list[dict[str, float]] = []
        self.flops: int | None = None
        self.flops_error: str | None = None
        self.peak_bytes: int | None = None
        self._marks: list[tuple[str, Any, Any, bool]] = []
        self._active: set[str] = set()
        self._counting = False

    # -- installation ---------------------------------------------------------------------------------
    def attach(self, trainer, module, datamodule) -> None:
        loop = trainer.fit_loop.epoch_loop
        loop.advance = self._advance(loop.advance)
        self._wrap(datamodule, "on_after_batch_transfer", "degrade")
        self._wrap(module, "training_step", "step")
        self._wrap(module.backbone, "encode", "vae")
        self._wrap(module, "step_optimizer", "optim")
        self._wrap(module, "log", "log")
        self._wrap(module, "log_dict", "log")
        connector = trainer._logger_connector
        self._wrap(connector, "on_batch_end", "log")
        self._wrap(connector, "update_train_step_metrics", "log")

    def _wrap(self, obj: Any, name: str, piece: str) -> None:
        original = getattr(obj, name)
        timer = self

        def timed(*args, **kwargs):
            if piece in timer._active:  # nested (log_dict -> log): counted once, by the outer call
                return original(*args, **kwargs)
            timer._active.add(piece)
            in_step = "step" in timer._active and piece != "step"
            start = timer.clock.mark()
            try:
                if piece == "step" and timer._counting:
                    return timer._count(original, *args, **kwargs)
                return original(*args, **kwargs)
            finally:
                timer._marks.append((piece, start, timer.clock.mark(), in_step))
                timer._active.discard(piece)

        timed.__wrapped__ = original
        setattr(obj, name, timed)

    def _count(self, fn: Callable, *args, **kwargs):
        try:
            with eager(), flop_counter() as counter:
                out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the counter failed on some op: no MFU, training goes on
            self.flops_error = f"{type(exc).__name__}: {exc}"
            raise
        self.flops = int(counter.get_total_flops())
        return out

    def _advance(self, original: Callable) -> Callable:
        timer = self

        def advance(*args, **kwargs):
            k = timer.iteration
            timer.iteration += 1
            timed = k > timer.warmup or (k == timer.warmup and not timer.count_flops)
            timer._counting = timer.count_flops and k == timer.warmup
            first_timed = k == timer.warmup + (1 if timer.count_flops else 0)
            if first_timed and timer.clock.cuda:
                torch.cuda.reset_peak_memory_stats(timer.device)
            timer._marks = []
            timer.clock.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            start = timer.clock.mark()
            try:
                return original(*args, **kwargs)
            finally:
                end = timer.clock.mark()
                timer.clock.sync()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                timer._counting = False
                if timed:
                    timer.records.append({**timer._breakdown(start, end, wall), "cpu": cpu})
                    if timer.clock.cuda:
                        timer.peak_bytes = int(torch.cuda.max_memory_allocated(timer.device))

        advance.__wrapped__ = original
        return advance

    def _breakdown(self, start, end, wall: float) -> dict[str, float]:
        sec = self.clock.seconds
        step = sec(start, end)
        out = dict.fromkeys(PIECES, 0.0)
        step_time, inner = 0.0, 0.0
        degrade_start = None
        for piece, a, b, in_step in self._marks:
            d = sec(a, b)
            if piece == "step":
                step_time += d
            elif piece == "degrade":
                out["degrade"] += d
                degrade_start = a if degrade_start is None else degrade_start
            else:
                out[piece] += d
                inner += d if in_step else 0.0
        first = degrade_start
        if first is None:  # no degradation call: data runs up to the training step
            first = next((a for p, a, _, _ in self._marks if p == "step"), None)
        out["data"] = sec(start, first) if first is not None else 0.0
        out["fwd+bwd"] = max(step_time - inner, 0.0)
        out["other"] = step - sum(out[p] for p in PIECES if p != "other")
        out["step"] = step
        out["wall"] = wall
        return out


@contextlib.contextmanager
def attached(timer: StepTimer):
    """While active, ``Trainer.fit`` attaches ``timer`` to the trainer, module and datamodule it is given."""
    from lightning.pytorch import Trainer

    original = Trainer.fit

    def fit(self, model, *args, **kwargs):
        datamodule = kwargs.get("datamodule")
        if datamodule is None:
            raise RuntimeError("benchmarks/train.py times SRDataModule stages (fit with a datamodule)")
        timer.attach(self, model, datamodule)
        return original(self, model, *args, **kwargs)

    Trainer.fit = fit
    try:
        yield timer
    finally:
        Trainer.fit = original


# --- composing and running one experiment --------------------------------------------------------------
def overrides_for(experiment: str, *, backbone: str, crop: int, batch: int, precision: str, iterations: int,
                  device: torch.device, workers: int, out_dir: str, compile_: bool, channels_last: bool,
                  extra: list[str], has_speed: dict[str, bool]) -> list[str]:
    """The ``sr-train`` overrides of the benchmark run."""
    ov = [f"experiment={experiment}", f"backbone={backbone}", f"trainer.precision={precision}",
          f"data.crop_size={crop}", f"data.batch_size={batch}", f"train.total_batch_size={batch}",
          f"++data.samples_per_epoch={batch * (iterations + 1)}",  # one data-epoch: every batch fetched in a step
          f"data.num_workers={workers}", f"++data.persistent_workers={str(workers > 0).lower()}",
          f"train.iterations={iterations}", f"train.val_every={iterations + 1}", f"train.ckpt_every={iterations + 1}",
          "train.export_weights=false", "train.progress=log", "logger=csv", f"paths.output_dir={out_dir}"]
    if backbone == "sd21_shape":
        ov += ["backbone.allow_training=true", f"backbone.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
    if device.type == "cuda":
        ov += ["trainer=gpu", "++data.pin_memory=true"]
    for flag, key in ((compile_, "compile"), (channels_last, "channels_last")):
        if flag and has_speed.get(key):
            ov.append(f"speed.{key}=true")
    return ov + list(extra)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sr_lab.train import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="bench_train"):
        return hydra_compose(config_name="train", overrides=overrides)


def speed_keys() -> dict[str, bool]:
    """Which ``speed.*`` switches the config has (``sr_lab/models/speed.py``; absent in older trees)."""
    from omegaconf import OmegaConf

    cfg = compose([])
    return {k: OmegaConf.select(cfg, f"speed.{k}", default=None) is not None for k in ("compile", "channels_last")}


def bench_experiment(experiment: str, *, backbone: str, crop: int, batch: int, precision: str, steps: int,
                     warmup: int, device: torch.device, workers: int = 0, compile_: bool = False,
                     channels_last: bool = False, extra: list[str] = (), peak_tflops: float | None = None,
                     count_flops: bool = True, has_speed: dict[str, bool] | None = None) -> dict[str, Any]:
    """Train ``experiment`` for ``warmup + 1 + steps`` iterations with ``sr_lab.train.run``; the timings."""
    from sr_lab.train import run

    has_speed = speed_keys() if has_speed is None else has_speed
    iterations = warmup + steps + (1 if count_flops else 0)
    timer = StepTimer(device, warmup, count_flops=count_flops)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out_dir:
        ov = overrides_for(experiment, backbone=backbone, crop=crop, batch=batch, precision=precision,
                           iterations=iterations, device=device, workers=workers, out_dir=out_dir, compile_=compile_,
                           channels_last=channels_last, extra=list(extra), has_speed=has_speed)
        cfg = compose(ov)
        try:
            with attached(timer):
                run(cfg)
        except Exception as exc:
            if timer.flops_error:
                raise RuntimeError(f"{experiment}: FLOP counting failed ({timer.flops_error}); rerun with "
                                   "--no-flops") from exc
            raise
    if not timer.records:
        raise RuntimeError(f"{experiment}: no timed iteration (ran {timer.iteration})")
    mean = {k: statistics.fmean(r[k] for r in timer.records) for k in (*PIECES, "step", "wall", "cpu")}
    step = mean["step"]
    prec = "bf16" if str(precision).startswith("bf16") else str(precision)
    peak, peak_src = device_peak(device, prec, peak_tflops)
    flops = timer.flops
    achieved = flops / step / 1e12 if flops else None
    mfu = achieved / peak if achieved is not None and peak else None
    if timer.peak_bytes is not None:
        mem_gib, mem_kind = timer.peak_bytes / 2**30, "torch.cuda.max_memory_allocated"
    else:
        mem_gib, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
    return {
        "experiment": experiment, "backbone": backbone, "crop": crop, "batch": batch, "precision": str(precision),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "steps": len(timer.records), "warmup": warmup, "samples_per_s": batch / step,
        "step_s": step, "step_median_s": statistics.median(r["step"] for r in timer.records),
        "wall_s": mean["wall"], "process_cpu_s": mean["cpu"],
        "breakdown_s": {p: mean[p] for p in PIECES},
        "flops_per_step": flops, "flops_error": timer.flops_error, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": peak_src, "mfu": mfu, "peak_memory_gib": mem_gib,
        "peak_memory_kind": mem_kind, "compile": bool(compile_ and has_speed.get("compile")),
        "channels_last": bool(channels_last and has_speed.get("channels_last")), "overrides": list(extra),
    }


def format_result(r: dict[str, Any]) -> str:
    ms = {k: 1000 * v for k, v in r["breakdown_s"].items()}
    parts = " | ".join(f"{k} {ms[k]:.1f}" for k in PIECES)
    flags = "".join(f" +{k}" for k in ("compile", "channels_last") if r.get(k))
    if r["flops_per_step"]:
        work = f"{r['flops_per_step'] / 1e12:.3g} TFLOP/step, {r['achieved_tflops']:.3g} TFLOP/s"
    else:
        work = f"FLOPs not counted ({r['flops_error'] or 'off'})"
    mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else f"MFU n/a ({r['peak_source']})"
    cpu = f", process CPU time {1000 * r['process_cpu_s']:.1f} ms" if r["device"] == "cpu" else ""
    return (f"train {r['experiment']} {r['backbone']} {r['crop']} b{r['batch']} {r['precision']}{flags} "
            f"{r['device']} ({r['device_name']}): {r['samples_per_s']:.2f} samples/s, "
            f"step {1000 * r['step_s']:.1f} ms (median {1000 * r['step_median_s']:.1f}{cpu}) "
            f"= {parts} ms, {mfu} ({work}), peak {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, benchmark each experiment, print one line each; returns the results."""
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--backbone", choices=["tiny", "sd21_shape"], default=None,
                    help="default: sd21_shape on cuda, tiny on cpu")
    ap.add_argument("--crop", type=int, default=None, help="HR crop (default: 512 on cuda, 64 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: 8 on cuda, 2 on cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed iterations (default: 20 on cuda, 3 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 5 cuda, 1 cpu)")
    ap.add_argument("--precision", default=None, help="trainer.precision (default: bf16-mixed on cuda, 32 on cpu)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: 8 on cuda, 0 on cpu)")
    ap.add_argument("--compile", action="store_true", help="speed.compile=true (if the config has it)")
    ap.add_argument("--channels-last", action="store_true", help="speed.channels_last=true (if the config has it)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting iteration (no MFU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (overrides the table)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied last, e.g. data=folder data.hr_dirs=/x")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    backbone = args.backbone or ("sd21_shape" if on_gpu else "tiny")
    crop = args.crop or (512 if on_gpu else 64)
    batch = args.batch or (8 if on_gpu else 2)
    steps = args.steps if args.steps is not None else (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    precision = args.precision or ("bf16-mixed" if on_gpu else "32")
    workers = args.workers if args.workers is not None else (8 if on_gpu else 0)
    if steps < 1 or warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; quiet them after that

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|callbacks used to create the checkpoint|litlogger).*")
    has_speed = speed_keys()
    for flag, key in ((args.compile, "compile"), (args.channels_last, "channels_last")):
        if flag and not has_speed.get(key):
            print(f"--{key.replace('_', '-')}: skipped, the config has no speed.{key} (sr_lab/models/speed.py)")
    results = []
    for experiment in args.experiment:
        r = bench_experiment(experiment, backbone=backbone, crop=crop, batch=batch, precision=precision, steps=steps,
                             warmup=warmup, device=device, workers=workers, compile_=args.compile,
                             channels_last=args.channels_last, extra=args.overrides, peak_tflops=args.peak_tflops,
                             count_flops=not args.no_flops, has_speed=has_speed)
        print(format_result(r), flush=True)
        results.append(r)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

"""Inference speed of the SR pipeline (sr_lab.inference.SRPipeline), 128 -> 512 (x4) by default.

Prints two lines, e.g.

    inference <stage> 128->512 sampler=ccsr_truncated steps=45 (16 model calls) ... device=cpu (<cpu>) torch=2.x:
        X.XX s/image (process CPU time ...), peak memory Y MiB (process RSS)
    inference seeds N=10 128->512 device=cpu: batched X.X s (Y.YY s/seed), one by one Z.Z s (W.WW s/seed), x1.NN ...

Wall-clock seconds are what a user waits; the process CPU time is printed too because on a shared
machine the wall time also counts other processes.

Default stage: CCSR stage 1 on the tiny random backbone (untrained ControlNet; speed only). Use
``--checkpoint <run>/export`` (or a .ckpt) for a trained stage, e.g. on SD 2.1-base. Runs on CUDA when
available (peak memory = torch.cuda.max_memory_allocated), else CPU (peak memory = the process's
peak resident set size, model weights included).

Usage: python benchmarks/inference.py [--checkpoint PATH] [--sampler ccsr_truncated|ddpm_spaced|ddim]
       [--steps N] [--size 128] [--upscale 4] [--seeds 10] [--iters 2] [--device cuda|cpu] [--precision 32|bf16]
       [--compare [--clearsr-checkpoint PATH]]

``--compare`` prints one row per method's sampler schedule on the same stage, device and run (StableSR
DDPM-200 and DDIM-20, CCSR-15, AddSR-1 and AddSR-4 with its PSR hook): listed timesteps = model calls per
image, s/image, peak memory. On the tiny default stage the rows compare the samplers' cost on one
ControlNet stage (the methods' own branches differ at the real shape). The last row, ClearSR-50, runs
ClearSR's own stage (its branches cost per call: LoRA'd LR encoder, DPM + GSPM, UNet-decoder LoRA, CLIP
image prompt) with the ``clearsr`` sampler (50 spaced DDPM steps + the LSA hook, alpha = beta = 0.01) from
the LR latent: ``--clearsr-checkpoint <clearsr run>/export`` loaded on the benchmark stage's backbone, the
benchmark stage itself when ``--checkpoint`` is a ClearSR stage, else the untrained ClearSR adapter
(conf/adapter/clearsr.yaml, experiment=clearsr) built on the benchmark stage's backbone module. The
previous stage is released first; on CPU the peak RSS is the process's running maximum, so a row's
figure includes the rows before it.
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from sr_lab.utils.device import device_name

ROOT = Path(__file__).resolve().parents[1]




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"


def load_bench_stage(checkpoint: str | None, device: torch.device):
    """(stage, its config, a display name): ``checkpoint`` or the tiny default CCSR stage 1."""
    from sr_lab.inference import load_stage

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if checkpoint:
        stage, cfg = load_stage(checkpoint, device)
        return stage, cfg, str(cfg.get("task_name", Path(checkpoint).name))
    stage, cfg = build_default_stage(device)
    return stage, cfg, "ccsr_stage1(tiny, untrained)"


def compose_train(experiment: str):
    """The training config of ``experiment=<experiment>`` (conf/train.yaml), as ``sr-train`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="bench"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp"])


def build_default_stage(device: torch.device):
    """CCSR stage 1 on the tiny backbone from the training config (random ControlNet)."""
    import hydra

    cfg = compose_train("ccsr_stage1")
    stage = hydra.utils.instantiate(cfg.module).eval().requires_grad_(False).to(device)
    return stage, cfg


def clearsr_bench_stage(checkpoint: str | None, stage, cfg, name: str, device: torch.device):
    """(stage, display name, sampler config) of the ClearSR-50 row (module docstring); the sampler is
    conf/sampler/clearsr.yaml as ``experiment=clearsr`` composes it (50 steps, LSA hook)."""
    import hydra
    from omegaconf import OmegaConf

    from sr_lab.inference import load_stage

    ccfg = compose_train("clearsr")
    scfg = OmegaConf.to_container(ccfg.sampler, resolve=True)
    if checkpoint:
        cstage, c = load_stage(checkpoint, device, backbone=stage.backbone)
        return cstage, str(c.get("task_name", Path(checkpoint).name)), scfg
    if cfg.get("task_name") == "clearsr":
        return stage, name, scfg
    cstage = hydra.utils.instantiate(ccfg.module, backbone=stage.backbone).eval().requires_grad_(False).to(device)
    return cstage, f"clearsr({getattr(stage.backbone, 'name', '?')}, untrained)", scfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="export folder or .ckpt (default: tiny CCSR stage 1)")
    ap.add_argument("--sampler", default=None, help="sampler option in conf/sampler (default: the stage's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--timesteps", default=None, help="explicit list, e.g. 999,749,499,249")
    ap.add_argument("--size", type=int, default=128, help="LR side in pixels")
    ap.add_argument("--upscale", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=10, help="N seeds for the batched vs one-by-one line")
    ap.add_argument("--iters", type=int, default=2, help="timed single-image runs (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="32", choices=["32", "bf16"])
    ap.add_argument("--compare", action="store_true", help="one row per method's sampler on the same stage")
    ap.add_argument("--clearsr-checkpoint", default=None,
                    help="--compare: ClearSR export for the ClearSR-50 row (default: the untrained adapter)")
    args = ap.parse_args()
    if args.compare:
        return compare(args)

    import hydra
    from omegaconf import OmegaConf

    from sr_lab.inference import SRPipeline

    device = torch.device(args.device)
    stage, cfg, name = load_bench_stage(args.checkpoint, device)
    if args.sampler:
        scfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sampler" / f"{args.sampler}.yaml"))
    else:
        scfg = OmegaConf.to_container(cfg.sampler, resolve=True)
    if args.steps is not None:
        scfg["grid" if "grid" in scfg else "steps"] = args.steps
    if args.timesteps:
        scfg["timesteps"] = [int(t) for t in args.timesteps.split(",")]
    sampler = hydra.utils.instantiate(scfg)
    from sr_lab.diffusion.samplers import sampler_timesteps

    declared = len(sampler_timesteps(sampler, stage.backbone.num_timesteps))
    calls = []

    def counting(model, noise, cond, abar, **kw):
        def m(x, t, c):
            calls.append(1)
            return model(x, t, c)
        return sampler(m, noise, cond, abar, **kw)

    pipe = SRPipeline(stage, counting, upscale=args.upscale, precision=args.precision)
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, args.size, args.size, generator=g)
    out_side = args.size * args.upscale
    sname = scfg["_target_"].rsplit(".", 2)[-2]

    pipe(lr, [0])  # warm-up
    calls.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.iters):
        pipe(lr, [i])
    sync(device)
    per_image = (time.perf_counter() - t0) / args.iters
    cpu_per_image = (time.process_time() - c0) / args.iters
    n_calls = len(calls) // args.iters
    mem, mem_kind = peak_memory_mib(device)
    knobs = " ".join(f"{k}={v}" for k, v in scfg.items() if not k.startswith("_") and k != "hook" and v is not None)
    print(f"inference {name} {args.size}->{out_side} sampler={sname} {knobs} ({declared} listed timesteps, "
          f"{n_calls} model calls counted) "
          f"precision={args.precision} device={device.type} ({device_name(device)}) torch={torch.__version__}: "
          f"{per_image:.2f} s/image (process CPU time {cpu_per_image:.2f} s), peak memory {mem:.0f} MiB ({mem_kind})")

    seeds = list(range(args.seeds))
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    batched = pipe(lr, seeds)
    sync(device)
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    single = torch.cat([pipe(lr, [s]) for s in seeds])
    sync(device)
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    diff = float((batched - single).abs().max())
    print(f"inference seeds N={args.seeds} {args.size}->{out_side} device={device.type}: batched {t_batched:.1f} s "
          f"({t_batched / args.seeds:.2f} s/seed), one by one {t_single:.1f} s ({t_single / args.seeds:.2f} s/seed), "
          f"x{t_single / t_batched:.2f} (process CPU time {c_batched:.1f} s vs {c_single:.1f} s); "
          f"max |batched - single| = {diff:.1e}")


COMPARE = [("StableSR DDPM-200", "ddpm_spaced", {"steps": 200}), ("StableSR DDIM-20", "ddim", {"steps": 20}),
           ("CCSR-15", "ccsr_truncated", {"grid": 45}), ("AddSR-1", "addsr", {"first": 1}), ("AddSR-4", "addsr", {})]
# ClearSR (paper 003 Sec. 4.1): its own stage and the `clearsr` sampler (50 spaced DDPM steps + LSA), from the LR latent
CLEARSR_ROW = ("ClearSR-50", "clearsr")


def compare(args) -> None:
    """One row per method schedule, same stage / device / process (a side-by-side comparison), then ClearSR-50."""
    import gc

    import hydra
    from omegaconf import OmegaConf

    device = torch.device(args.device)
    stage, cfg, name = load_bench_stage(args.checkpoint, device)
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for label, option, knobs in COMPARE:
        scfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sampler" / f"{option}.yaml"))
        scfg.update(knobs)
        compare_row(args, device, stage, name, label, option, hydra.utils.instantiate(scfg), lr)

    label, option = CLEARSR_ROW
    cstage, cname, scfg = clearsr_bench_stage(args.clearsr_checkpoint, stage, cfg, name, device)
    if cstage is not stage:  # keep only the backbone (shared) and the ClearSR stage resident
        del stage
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    compare_row(args, device, cstage, cname, label, option, hydra.utils.instantiate(scfg), lr)


def compare_row(args, device: torch.device, stage, name: str, label: str, option: str, sampler, lr) -> None:
    """Time one sampler on one stage (one warm-up, ``args.iters`` timed runs from the LR latent) and print its row."""
    from sr_lab.diffusion.samplers import sampler_timesteps
    from sr_lab.inference import SRPipeline

    calls = len(sampler_timesteps(sampler, stage.backbone.num_timesteps))
    pipe = SRPipeline(stage, sampler, upscale=args.upscale, precision=args.precision, start="lr")
    pipe(lr, [0])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.iters):
        pipe(lr, [i])
    sync(device)
    per_image = (time.perf_counter() - t0) / args.iters
    mem, mem_kind = peak_memory_mib(device)
    print(f"compare {label:17s} {name} {args.size}->{args.size * args.upscale} sampler={option} {calls:3d} model calls "
          f"precision={args.precision} device={device.type} ({device_name(device)}): {per_image:.3f} s/image, "
          f"peak memory {mem:.0f} MiB ({mem_kind})")


if __name__ == "__main__":
    main()

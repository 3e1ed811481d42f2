"""Throughput of the synthetic degradation pipelines (sr_lab.degradation).

Builds a preset from the Hydra config group ``degradation`` exactly as ``sr-train`` does (``degradation=<name>``
composed into the training config, then instantiated), so every YAML preset in ``conf/degradation/`` can be
measured; feeds random HR batches and prints one line, e.g.

    degradation realesrgan batch=16 crop=512 device=cpu (<cpu model>) torch=2.x: X.XX pairs/s (Y ms/batch)

``--vs <preset>``: a second preset on the SAME HR batches, generator seeds and device, interleaved
A B A B with a sync around every call; one line per preset and the ratio of their pairs/s.

``--reference basicsr``: the Real-ESRGAN pipeline built from BasicSR's public functions as a BasicSR user
has it (``benchmarks/basicsr_reference.py``: kernels drawn per sample on the CPU with numpy, as
``RealESRGANDataset.__getitem__``; then ``RealESRGANModel.feed_data`` on the device), interleaved with the
preset on the same HR batches; its pairs/s (kernels + device, and the device part alone — BasicSR draws the
kernels in its DataLoader workers) and the ratio. Needs ``pip install basicsr==1.4.2 --no-deps``; without it
the row is skipped with one line. The reference takes the preset's values for BasicSR's option keys
(kernels, resize, noise, JPEG ranges); it always runs the x4plus flow (USM GT, 8-bit LR at 1/scale).
BasicSR's ``filter2D`` reflect-pads by 10 px, so the reference needs crops of about 70 px or more.

Usage: python benchmarks/degradation.py [--batch 16] [--size 512] [--iters N] [--warmup N]
       [--device cuda|cpu] [--preset <conf/degradation name>] [--per-sample] [--vs <preset>]
       [--reference basicsr] [--list]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # basicsr_reference.py next to this file

from sr_lab.utils.device import device_name  # noqa: E402


def conf_dir() -> Path:
    from sr_lab.train import CONF_DIR

    return Path(CONF_DIR)


def preset_names() -> list[str]:
    """Every option of the config group ``degradation`` (one YAML file each)."""
    return sorted(p.stem for p in (conf_dir() / "degradation").glob("*.yaml"))


def compose_preset(name: str, *, scale: int = 4, per_sample: bool = False, overrides=()):
    """The composed config node ``degradation`` of ``sr-train ... degradation=<name> upscale=<scale>``."""
    from hydra import compose, initialize_config_dir

    ov = [f"degradation={name}", f"upscale={scale}", *overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir()), job_name="bench_degradation"):
        cfg = compose(config_name="train", overrides=ov)
    if per_sample:
        if "per_sample" not in cfg.degradation:
            raise SystemExit(f"--per-sample: degradation={name} has no per_sample option")
        cfg.degradation.per_sample = True
    return cfg.degradation


def build_preset(name: str, *, scale: int = 4, per_sample: bool = False, overrides=()) -> torch.nn.Module:
    """Instantiate ``degradation=<name>`` from the config group, as ``sr_lab.train.run`` does."""
    import hydra

    return hydra.utils.instantiate(compose_preset(name, scale=scale, per_sample=per_sample, overrides=overrides))


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hr_batches(n: int, batch: int, size: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.rand(batch, 3, size, size, generator=g, device=device) for _ in range(n)]


def call_generator(device: torch.device, seed: int, i: int) -> torch.Generator:
    """The generator of call ``i`` (the same for every contender of that call)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)


def time_interleaved(contenders: dict, hrs: list[torch.Tensor], iters: int, warmup: int, device: torch.device,
                     seed: int) -> dict[str, list[float]]:
    """``{name: [seconds per timed call]}``; ``contenders[name](hr, generator) -> seconds`` or ``None``
    (then the call is timed here, synced before and after). Call ``i`` of every contender gets HR batch
    ``i mod len(hrs)`` and :func:`call_generator` ``(i)``; the contenders alternate A B A B."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(warmup + iters):
        hr = hrs[i % len(hrs)]
        for name, fn in contenders.items():
            sync(device)
            t0 = time.perf_counter()
            fn(hr, call_generator(device, seed, i))
            sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def preset_call(deg):
    def run(hr, g):
        deg(hr, g)
    return run


def line(tag: str, batch: int, size: int, device: torch.device, dt: float, extra: str = "") -> str:
    return (f"degradation {tag} batch={batch} crop={size} device={device.type} ({device_name(device)}) "
            f"torch={torch.__version__}: {batch / dt:.2f} pairs/s ({dt * 1000:.0f} ms/batch{extra})")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time the chosen preset (and ``--vs`` / ``--reference``), print the result lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on cuda, 5 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 3 on cuda, 1 on cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="realesrgan", help="an option of conf/degradation/ (see --list)")
    ap.add_argument("--per-sample", action="store_true", help="per-sample draws of the per-batch choices")
    ap.add_argument("--vs", default=None, metavar="PRESET", help="a second preset, interleaved on the same batches")
    ap.add_argument("--reference", choices=["basicsr"], default=None,
                    help="also time BasicSR's Real-ESRGAN pipeline (pip install basicsr==1.4.2 --no-deps)")
    ap.add_argument("--scale", type=int, default=4, help="SR factor (the config's upscale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print the presets of conf/degradation/ and exit")
    args = ap.parse_args(argv)

    names = preset_names()
    if args.list:
        print(" ".join(names))
        return
    for p in (args.preset, args.vs):
        if p is not None and p not in names:
            ap.error(f"unknown preset {p!r}; conf/degradation/ has: {', '.join(names)}")
    device = torch.device(args.device)
    iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)

    tag_a = args.preset + ("+per_sample" if args.per_sample else "")
    contenders = {tag_a: preset_call(build_preset(args.preset, scale=args.scale, per_sample=args.per_sample)
                                     .to(device))}
    if args.vs is not None:
        tag_b = args.vs + ("+per_sample" if args.per_sample else "")
        if tag_b == tag_a:
            tag_b += " (2nd)"
        contenders[tag_b] = preset_call(build_preset(args.vs, scale=args.scale, per_sample=args.per_sample).to(device))

    ref_split: dict[str, list[float]] = {"kernels": [], "device": []}
    ref_version = None
    if args.reference == "basicsr":
        import basicsr_reference as bref

        try:
            opts = bref.preset_options(compose_preset(args.preset, scale=args.scale))
            ref = bref.BasicSRRealESRGAN(device=device, opt={**opts, "scale": args.scale}, seed=args.seed)
            ref_version = ref.version
        except ImportError as exc:
            print(f"reference basicsr: skipped, BasicSR not importable ({exc}); install it for the benchmark "
                  f"with `{bref.INSTALL_HINT}`")
        else:
            def run_ref(hr, g):
                t0 = time.perf_counter()
                kernels = ref.kernels(hr.shape[0])  # BasicSR: in the DataLoader workers, per sample
                t1 = time.perf_counter()
                ref.degrade(hr, kernels)
                sync(device)
                ref_split["kernels"].append(t1 - t0)
                ref_split["device"].append(time.perf_counter() - t1)
            contenders["basicsr"] = run_ref

    hrs = hr_batches(min(iters + warmup, 4), args.batch, args.size, device, args.seed)
    with torch.inference_mode():
        times = time_interleaved(contenders, hrs, iters, warmup, device, args.seed)
    mean = {name: statistics.fmean(ts) for name, ts in times.items()}

    for name in contenders:
        if name == "basicsr":
            continue
        print(line(name, args.batch, args.size, device, mean[name]))
    if args.vs is not None:
        a, b = list(contenders)[:2]
        print(f"degradation vs: {a} {args.batch / mean[a]:.2f} pairs/s, {b} {args.batch / mean[b]:.2f} pairs/s, "
              f"{a}/{b} = x{mean[b] / mean[a]:.3g} (same {len(hrs)} HR batches and seeds, interleaved over {iters} "
              f"timed rounds, device={device.type})")
    if "basicsr" in contenders:
        k = statistics.fmean(ref_split["kernels"][-iters:])
        d = statistics.fmean(ref_split["device"][-iters:])
        print(line(f"reference basicsr=={ref_version} (Real-ESRGAN, {args.preset}'s ranges)", args.batch, args.size,
                   device, mean["basicsr"], f" = kernels on the CPU {k * 1000:.0f} ms + device {d * 1000:.0f} ms"))
        print(f"degradation reference: {tag_a}/basicsr = x{mean['basicsr'] / mean[tag_a]:.3g} pairs/s "
              f"(BasicSR's device part alone, kernels in its workers: x{d / mean[tag_a]:.3g})")


if __name__ == "__main__":
    main()

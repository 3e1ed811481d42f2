"""Throughput of the synthetic degradation pipelines (sr_lab.degradation).

Builds a preset (default: Real-ESRGAN x4plus, spec degradation_and_metrics.md §1), feeds random HR
batches and prints one line, e.g.

    degradation realesrgan batch=16 crop=512 device=cpu (<cpu model>) torch=2.x: X.XX pairs/s (Y ms/batch)

Usage: python benchmarks/degradation.py [--batch 16] [--size 512] [--iters N] [--device cuda|cpu]
       [--preset realesrgan|stablesr|ccsr|bicubic] [--per-sample]
"""
from __future__ import annotations

import argparse
import time

import torch

from sr_lab.degradation import BicubicDegradation, RealESRGANDegradation
from sr_lab.utils.device import device_name

# Preset overrides of the Real-ESRGAN x4plus defaults (mirror conf/degradation/*.yaml).
_STABLESR_CCSR = dict(
    blur_sigma=(0.2, 1.5), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5), blur_sigma2=(0.2, 1.0),
    betag_range2=(0.5, 2.0), betap_range2=(1.0, 1.5), resize_range=(0.3, 1.5), noise_range=(1.0, 15.0),
    poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0), second_blur_prob=0.5, resize_range2=(0.6, 1.2),
    noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0), resize_lr_to_hr=True,
)
PRESETS = {
    "realesrgan": dict(),
    "stablesr": dict(_STABLESR_CCSR, use_usm=True, usm_target=True, round_lr=False, no_degradation_prob=0.01),
    "ccsr": dict(_STABLESR_CCSR, use_usm=False, usm_target=False, round_lr=True),
}




def sync(device: torch.device) -> None:
    """Wait for queued GPU work so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Parse arguments, time the chosen preset, print one result line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on cuda, 5 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 3 on cuda, 1 on cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="realesrgan", choices=[*PRESETS, "bicubic"])
    ap.add_argument("--per-sample", action="store_true", help="per-sample draws of the per-batch choices")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device(args.device)
    iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    if args.preset == "bicubic":
        deg = BicubicDegradation(scale=4)
    else:
        deg = RealESRGANDegradation(scale=4, per_sample=args.per_sample, **PRESETS[args.preset])
    deg = deg.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    hr = torch.rand(args.batch, 3, args.size, args.size, generator=g, device=device)

    with torch.inference_mode():
        for _ in range(warmup):
            deg(hr, g)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            deg(hr, g)
        sync(device)
        dt = (time.perf_counter() - t0) / iters

    tag = args.preset + ("+per_sample" if args.per_sample else "")
    print(f"degradation {tag} batch={args.batch} crop={args.size} device={device.type} ({device_name(device)}) "
          f"torch={torch.__version__}: {args.batch / dt:.2f} pairs/s ({dt * 1000:.0f} ms/batch)")


if __name__ == "__main__":
    main()

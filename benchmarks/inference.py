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
       [--methods [--backbone tiny|sd21_shape] [--sizes 128] [--tiled] [--rows ...] [--tiled-rows ...]
        [--peak-tflops X] [--no-baseline] [--compile] [--channels-last] [--frozen-bf16]]

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

``--methods`` prints one row per method with each method's OWN stage, built from its preset
(``experiment=<preset>``, untrained adapters, random weights: speed only) on ``--backbone tiny`` (default)
or ``sd21_shape`` (SD 2.1-base's architecture; at paper scale the presets' tiny CLIP parts are swapped for
the real-shape random ones: AddSR ``prompt=clip_tags``, ClearSR ``clip_image_prompt``), at 128 -> 512
(``--sizes``; ``--tiled`` adds 512 -> 2048, which the pipeline samples in 64-latent tiles, overlap 32, 4 tiles
per call, with 1024 px VAE tiles, for the ``--tiled-rows``):

    StableSR DDPM-200, StableSR DDIM-20 (stablesr_stage1: time-aware encoder + SFT, start = noised LR latent),
    CCSR-15 (ccsr_stage1: ControlNet, truncated sampler on the 45-grid = 16 calls), AddSR-1 / AddSR-4 (addsr
    student: ControlNet + tag prompts, re-noise sampler + PSR), ClearSR-50 (clearsr: LoRA'd LR encoder, DPM +
    GSPM, decoder LoRA, CLIP image prompt; 50 DDPM steps + LSA)

Columns: model calls per image (sampler timesteps; x tile batches when tiled), s/image (median of ``--iters``
timed runs after one warm-up, default 5), peak memory (CUDA max allocated, or the process's peak RSS on
CPU), FLOPs per image, achieved TFLOP/s and MFU. Decoding is the plain VAE decoder of stage 1 (StableSR's
CFW and CCSR's stage-2 decoder are separate stages, not timed here).

FLOPs: a whole image is counted once per row with ``FlopCounterMode`` (benchmarks/flops.py: matmul,
convolution and attention FLOPs, 2 per multiply-add; element-wise ops count 0) on the real shapes, with
compiled modules run eagerly; the sampler's repeated model calls of an already-counted input shape are
replayed from the first (FLOPs depend on shapes only), so the count costs about one step plus the VAE (the
baselines are counted whole). MFU = achieved / peak, the peak from the table in benchmarks/flops.py matched
on the CUDA device name (dense bf16/fp16 tensor-core peaks, bf16 runs only) or ``--peak-tflops``; "n/a" on
CPU without ``--peak-tflops``.

Baseline (same device and run): the CCSR stage's own ControlNet and the backbone's UNet and VAE driven by a
plain diffusers loop (``DDIMScheduler`` / ``DDPMScheduler.set_timesteps`` + ``.step``, ``ControlNetModel``
-> ``down_block_res_samples`` / ``mid_block_res_sample`` -> ``UNet2DConditionModel``), with as many calls
as a row: DDIM-20 and DDPM on CCSR's 16 timesteps. The ``vs diffusers`` column is sr_lab s/image / baseline
s/image: CCSR-15 is the same network and call count (sr_lab's overhead); StableSR DDIM-20 runs StableSR's
SFT stage against the ControlNet loop (its FLOP ratio is printed beside it). Not at tiled sizes (the plain
loop does not tile). Then the seeds line (N seeds batched vs one by one) on the CCSR-15 row.

Speed switches ``--compile``, ``--channels-last``, ``--frozen-bf16`` go through ``sr_lab.models.speed``
(``SpeedConfig``, ``apply_speed``, in place on the stage and the shared backbone, so the baseline loop runs the
same switched modules); without ``--frozen-bf16`` the frozen weights stay float32 under bf16 autocast (sr-infer
at ``precision=bf16`` casts them, ``speed.frozen_dtype=auto``: ``--frozen-bf16`` is that setting). On
CUDA the SDPA backend report is printed. ``benchmarks/run_all.sh`` (``make bench``) runs the GPU set.

    python benchmarks/inference.py --methods --iters 1 --sizes 32                 # CPU smoke (tiny backbone)
    python benchmarks/inference.py --methods --backbone sd21_shape --tiled        # CUDA, bf16, SD 2.1 shape
    python benchmarks/inference.py --methods --backbone sd21_shape --sizes 16 --iters 1 --rows CCSR-15  # CPU smoke
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sr_lab.utils.device import device_name

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # the shared helpers (flops.py) beside this script
    sys.path.insert(0, str(ROOT / "benchmarks"))




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


def compose_train(experiment: str, overrides: Sequence[str] = ()):
    """The training config of ``experiment=<experiment>`` (conf/train.yaml), as ``sr-train`` composes it, with
    further command-line ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="bench"):
        return compose(config_name="train",
                       overrides=[f"experiment={experiment}", "paths.output_dir=/tmp", *overrides])


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
    ap.add_argument("--iters", type=int, default=None,
                    help="timed single-image runs after one warm-up (default 2; --methods: 5, the median is printed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, choices=["32", "bf16"],
                    help="default 32; --methods: bf16 on CUDA, 32 on CPU")
    ap.add_argument("--compare", action="store_true", help="one row per method's sampler on the same stage")
    ap.add_argument("--clearsr-checkpoint", default=None,
                    help="--compare: ClearSR export for the ClearSR-50 row (default: the untrained adapter)")
    ap.add_argument("--methods", action="store_true",
                    help="one row per method on its own stage, with FLOPs, MFU and the diffusers baseline")
    ap.add_argument("--backbone", default="tiny", choices=list(BACKBONES),
                    help="--methods: tiny, or sd21_shape (SD 2.1-base architecture, random weights)")
    ap.add_argument("--sizes", default=None, help="--methods: LR sides, comma-separated (default: --size)")
    ap.add_argument("--tiled", action="store_true", help="--methods: also 512 -> 2048 (tiled sampling and VAE)")
    ap.add_argument("--tiled-size", type=int, default=TILED_LR,
                    help=f"--methods: the LR side --tiled adds (default {TILED_LR})")
    ap.add_argument("--rows", default="all", help="--methods: comma-separated row labels (default all)")
    ap.add_argument("--tiled-rows", default=",".join(TILED_ROWS),
                    help=f"--methods: rows run at tiled sizes (default {','.join(TILED_ROWS)}; 'all')")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="--methods: the device's peak TFLOP/s for MFU (default: benchmarks/flops.py's table)")
    ap.add_argument("--no-baseline", action="store_true", help="--methods: skip the plain diffusers loop")
    ap.add_argument("--compile", action="store_true", help="--methods: torch.compile (sr_lab.models.speed)")
    ap.add_argument("--channels-last", action="store_true", help="--methods: channels-last memory format")
    ap.add_argument("--frozen-bf16", action="store_true", help="--methods: frozen backbone weights in bf16")
    args = ap.parse_args()
    if args.methods:
        if args.checkpoint or args.sampler or args.steps is not None or args.timesteps:
            raise SystemExit("--methods builds each method's untrained stage and sampler from its preset; "
                             "--checkpoint / --sampler / --steps / --timesteps apply to the default mode")
        return methods(args)
    args.iters = 2 if args.iters is None else args.iters
    args.precision = args.precision or "32"
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

    seeds_line(pipe, lr, args.seeds, device, out_side)


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



# ---------------------------------------------------------------------------------------------- --methods
BACKBONES = ("tiny", "sd21_shape")


@dataclass(frozen=True)
class MethodRow:
    """One ``--methods`` row: its label, the preset its stage comes from, and Hydra overrides for its sampler."""
    label: str
    preset: str
    overrides: tuple[str, ...] = ()


METHOD_ROWS = (
    MethodRow("StableSR DDPM-200", "stablesr_stage1", ("sampler.steps=200",)),
    MethodRow("StableSR DDIM-20", "stablesr_stage1", ("sampler=ddim", "sampler.steps=20")),
    MethodRow("CCSR-15", "ccsr_stage1", ("sampler.grid=45",)),
    MethodRow("AddSR-1", "addsr", ("sampler.first=1",)),
    MethodRow("AddSR-4", "addsr", ()),
    MethodRow("ClearSR-50", "clearsr", ("sampler.steps=50",)),
)
#: rows run at the tiled size by default (tiled, every step is 49 tiles in 13 batched calls: StableSR DDPM-200 and
#: ClearSR-50 would take tens of seconds per image even on a GPU; --tiled-rows all runs them)
TILED_ROWS = ("StableSR DDIM-20", "CCSR-15", "AddSR-1", "AddSR-4")
#: per preset: what building its stage for a benchmark needs (AddSR: no teacher, no discriminator: inference only)
PRESET_OVERRIDES = {"addsr": ("teacher=null",)}
#: at the real shape the presets' tiny CLIP parts become the paper-scale ones, with random weights
SHAPE_OVERRIDES = {"sd21_shape": {
    "addsr": ("prompt=clip_tags", "prompt.allow_random_init=true"),
    "clearsr": ("branch@adapter.branches.image_prompt=clip_image_prompt",
                "adapter.branches.image_prompt.allow_random_init=true")}}
#: the plain diffusers loop: (label, scheduler kind, the row whose timesteps it takes or None, steps)
BASELINES = (("diffusers DDIM-20", "ddim", None, 20), ("diffusers DDPM-16", "ddpm", "CCSR-15", None))
#: a row's ``vs diffusers`` ratio is taken against this baseline
BASELINE_OF = {"StableSR DDIM-20": "diffusers DDIM-20", "CCSR-15": "diffusers DDPM-16"}
#: the LR side of the tiled configuration (512 -> 2048)
TILED_LR = 512
#: on CPU the real shape runs as a smoke test only: LR sides up to this
CPU_SD21_MAX_LR = 32


def _norm(label: str) -> str:
    return label.replace(" ", "").replace("_", "").lower()


def select_rows(spec: str, rows=METHOD_ROWS) -> list[MethodRow]:
    """Rows named in a comma-separated ``spec`` (labels, case and spaces ignored), or all of them."""
    if spec.strip().lower() == "all":
        return list(rows)
    wanted = [_norm(w) for w in spec.split(",") if w.strip()]
    known = {_norm(r.label): r for r in rows}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}: choose from {[r.label for r in rows]} or 'all'")
    return [r for r in rows if _norm(r.label) in wanted]


def compose_method(preset: str, backbone: str, device: torch.device, extra: Sequence[str] = ()):
    """The training config of ``experiment=<preset>`` on ``backbone`` with the benchmark's overrides."""
    over = [f"backbone={backbone}"]
    if backbone == "sd21_shape":  # random weights: the config check would refuse "training" without this
        over += ["backbone.allow_training=true", f"backbone.device={device}"]
    over += list(PRESET_OVERRIDES.get(preset, ())) + list(SHAPE_OVERRIDES.get(backbone, {}).get(preset, ()))
    return compose_train(preset, [*over, *extra])


class StageBank:
    """Builds each preset's stage once on one shared backbone (random weights, untrained adapters) and releases
    it when asked, so only the backbone and one stage are resident at a time."""

    def __init__(self, backbone: str, device: torch.device):
        self.backbone_name, self.device = backbone, device
        self.backbone = None
        self.stages: dict[str, object] = {}

    def sampler(self, row: MethodRow):
        import hydra

        cfg = compose_method(row.preset, self.backbone_name, self.device, row.overrides)
        return hydra.utils.instantiate(cfg.sampler)

    def stage(self, preset: str):
        import hydra

        if preset not in self.stages:
            cfg = compose_method(preset, self.backbone_name, self.device)
            if self.backbone is None:
                self.backbone = hydra.utils.instantiate(cfg.backbone).to(self.device)
            extra = {"discriminator": None} if "discriminator" in cfg.module else {}
            stage = hydra.utils.instantiate(cfg.module, backbone=self.backbone, **extra)
            self.stages[preset] = stage.eval().requires_grad_(False).to(self.device)
        return self.stages[preset]

    def release(self, preset: str) -> None:
        import gc

        if self.stages.pop(preset, None) is not None:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def controlnet_of(stage) -> torch.nn.Module:
    """The diffusers ``ControlNetModel`` of a ControlNet stage (CCSR stage 1's ``controlnet`` branch)."""
    for branch in stage.adapter.branches.values():
        net = getattr(branch, "controlnet", None)
        if net is not None:
            return net
    raise ValueError("the stage has no ControlNet branch")


def baseline_scheduler(kind: str, num_train_timesteps: int = 1000):
    """SD 2.1-base's noise schedule (scaled-linear betas 0.00085 -> 0.012) as a diffusers scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"scheduler kind {kind!r} must be ddim or ddpm")


@torch.no_grad()
def diffusers_loop(unet, controlnet, vae, scheduler, lr01: torch.Tensor, context: torch.Tensor, *, upscale: int = 4,
                   num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                   precision: str = "32", generator: torch.Generator | None = None,
                   conditioning_scale: float = 1.0) -> torch.Tensor:
    """LR (B, 3, h, w) in [0, 1] -> SR in [0, 1] (returned on the CPU) by a plain diffusers loop, as a user
    writes it: bicubic x ``upscale``, the VAE latent of it as the ControlNet condition, x_T ~ N(0, I), then for every
    scheduler timestep ``ControlNetModel`` -> its residuals into ``UNet2DConditionModel`` -> ``scheduler.step``;
    VAE decode. One ControlNet and one UNet call per timestep (``num_inference_steps`` or explicit
    ``timesteps``)."""
    import torch.nn.functional as F

    device = next(unet.parameters()).device
    udt, cdt, vdt = unet.dtype, controlnet.dtype, vae.dtype
    scale = float(vae.config.scaling_factor)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        lr01 = lr01.to(device, torch.float32)
        up = F.interpolate(lr01, scale_factor=upscale, mode="bicubic", align_corners=False).clamp(0, 1)
        cond = vae.encode((up * 2 - 1).to(vdt)).latent_dist.mode() * scale
        b, _, h, w = cond.shape
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=list(timesteps), device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        latents = torch.randn((b, unet.config.in_channels, h, w), generator=generator, device=device)
        latents = latents * scheduler.init_noise_sigma
        ctx = context.to(device).expand(b, -1, -1)
        for t in scheduler.timesteps:
            down, mid = controlnet(latents.to(cdt), t, encoder_hidden_states=ctx.to(cdt),
                                   controlnet_cond=cond.to(cdt), conditioning_scale=conditioning_scale,
                                   return_dict=False)
            eps = unet(latents.to(udt), t, encoder_hidden_states=ctx.to(udt),
                       down_block_additional_residuals=[d.to(udt) for d in down],
                       mid_block_additional_residual=mid.to(udt)).sample
            latents = scheduler.step(eps.float(), t, latents, generator=generator).prev_sample
        image = vae.decode(latents.to(vdt) / scale).sample
    return ((image.float() + 1) / 2).clamp(0, 1).cpu()


def run_baseline(stage, kind: str, lr01: torch.Tensor, *, upscale: int, precision: str, seed: int = 0,
                 steps: int | None = None, timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`diffusers_loop` on a ControlNet stage's own networks (its ControlNet, the backbone's UNet and VAE,
    the empty prompt's context as the stage caches it)."""
    bb = stage.backbone
    device = bb.alphas_cumprod.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return diffusers_loop(bb.unet, controlnet_of(stage), bb.vae, baseline_scheduler(kind, bb.num_timesteps), lr01,
                          bb.prompt_embedding("", 1), upscale=upscale, num_inference_steps=steps, timesteps=timesteps,
                          precision=precision, generator=gen)


def count_pipeline_flops(pipe, lr01: torch.Tensor, seed: int = 0) -> dict:
    """FLOPs of one image (one seed) through ``pipe``, counted once with :func:`flops.flop_counter`. The
    sampler's model calls whose input shape was already counted are replayed (the first call's output and
    FLOPs): FLOPs depend on shapes only, so the total is exact at the cost of about one step. Returns
    ``{"total", "step", "rest", "calls"}`` (``step``: one sampler model call, tiles and branches included;
    ``rest``: everything else — VAE encode/decode, prompts and image prompts, LR encoder, hooks)."""
    from flops import eager, flop_counter

    sampler = pipe.sampler
    stats = {"calls": 0, "replayed": 0, "step": 0}
    with eager(), flop_counter() as counter:  # a compiled module runs eagerly here, so its ops count
        def replaying(model, noise, cond, abar, **kw):
            cache: dict = {}

            def m(x, t, c):
                stats["calls"] += 1
                key = (tuple(x.shape), x.dtype)
                if key in cache:
                    out, f = cache[key]
                    stats["replayed"] += f
                    return out
                before = counter.get_total_flops()
                out = model(x, t, c)
                cache[key] = (out, counter.get_total_flops() - before)
                stats["step"] = cache[key][1]
                return out
            return sampler(m, noise, cond, abar, **kw)

        pipe.sampler = replaying
        try:
            pipe(lr01, [seed])
        finally:
            pipe.sampler = sampler
    total = int(counter.get_total_flops()) + int(stats["replayed"])
    steps = int(stats["step"]) * stats["calls"]
    return {"total": total, "step": int(stats["step"]), "rest": total - steps, "calls": stats["calls"]}


def tile_layout(pipe, lr01: torch.Tensor) -> tuple[int, int]:
    """(tiles per model call, batched calls of the UNet per model call) of the pipeline's aggregation sampling."""
    from sr_lab.inference.tiling import tile_boxes

    up, _ = pipe.prepare_lr(lr01[:1].to(pipe.device))
    f = int(pipe.backbone.vae_factor)
    h, w = up.shape[-2] // f, up.shape[-1] // f
    if not pipe.tile.enabled:
        return 1, 1
    n = len(tile_boxes(h, w, pipe.tile.size, pipe.tile.overlap))
    return n, -(-n // pipe.tile.batch)


@dataclass
class Measured:
    label: str
    stage: str
    size: int
    out: int
    calls: int
    tiles: tuple[int, int]
    times: list[float]
    cpu_times: list[float]
    mem: float
    mem_kind: str
    flops: dict
    baseline: str = ""
    ratio: float | None = None
    flop_ratio: float | None = None

    @property
    def seconds(self) -> float:
        from flops import median

        return median(self.times)


def time_runs(run, device: torch.device, iters: int) -> tuple[list[float], list[float], float, str]:
    """One warm-up ``run(0)``, then ``iters`` timed ``run(i)``: (wall seconds, process CPU seconds, peak MiB, kind)."""
    run(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu = [], []
    for i in range(iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        run(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    mem, kind = peak_memory_mib(device)
    return times, cpu, mem, kind


def speed_setup(args, precision: str):
    """(``SpeedConfig`` or None, a description) for ``--compile`` / ``--channels-last`` / ``--frozen-bf16``
    (``sr_lab.models.speed``; SDPA attention is on in both cases, diffusers' default). Without
    ``--frozen-bf16`` the frozen weights stay as built (float32), so each switch can be measured alone."""
    flags = {"compile": args.compile, "channels_last": args.channels_last, "frozen_bf16": args.frozen_bf16}
    on = [k for k, v in flags.items() if v]
    if not on:
        return None, "none"
    if args.frozen_bf16 and precision != "bf16":
        raise SystemExit("--frozen-bf16 needs --precision bf16 (the frozen parts then run under bf16 autocast)")
    try:
        from sr_lab.models.speed import SpeedConfig
    except ImportError as exc:
        raise SystemExit(f"--compile / --channels-last / --frozen-bf16 need sr_lab.models.speed (SpeedConfig, "
                         f"apply_speed), which is not importable here: {exc}") from exc
    config = SpeedConfig(compile=args.compile, channels_last=args.channels_last,
                         frozen_dtype="bf16" if args.frozen_bf16 else None)
    return config, ",".join(on)


def sdpa_line(device: torch.device, precision: str) -> str | None:
    """The SDPA backend report of ``sr_lab.models.speed`` on CUDA (None elsewhere); SD 2.1's first UNet level at
    512 px (4096 tokens, head dim 64) in the run's dtype."""
    if device.type != "cuda":
        return None
    try:
        from sr_lab.models.speed import sdpa_backend_report
    except ImportError as exc:
        return f"sdpa: report unavailable (sr_lab.models.speed: {exc})"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        return str(sdpa_backend_report(device, dtype=dtype)["summary"])
    except Exception as exc:  # noqa: BLE001 - a report, never a reason to stop the benchmark
        return f"sdpa: report failed ({type(exc).__name__}: {exc})"


def methods(args) -> list[Measured]:
    """The ``--methods`` table (module docstring); returns the measured rows, baselines last (tests)."""
    from flops import achieved_tflops, device_peak, format_mfu, mfu

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "32")
    iters = 5 if args.iters is None else int(args.iters)
    if iters < 1:
        raise SystemExit("--iters must be >= 1")
    sizes = [int(v) for v in (args.sizes or str(args.size)).split(",") if v.strip()]
    tiled_size = int(getattr(args, "tiled_size", TILED_LR))
    if args.tiled and tiled_size not in sizes:
        sizes.append(tiled_size)
    if args.backbone == "sd21_shape" and device.type == "cpu" and max(sizes) > CPU_SD21_MAX_LR:
        raise SystemExit(f"--backbone sd21_shape on CPU is a smoke run only: use --sizes <= {CPU_SD21_MAX_LR} "
                         f"(e.g. --sizes 16 --iters 1 --rows CCSR-15); the real sizes need CUDA")
    rows = select_rows(args.rows)
    speed_cfg, speed_desc = speed_setup(args, precision)
    peak, peak_src = device_peak(device, precision, args.peak_tflops)
    dname = device_name(device)
    print(f"methods backbone={args.backbone} precision={precision} device={device.type} ({dname}) "
          f"torch={torch.__version__} iters={iters} (median) speed={speed_desc} "
          f"peak={'n/a' if peak is None else f'{peak:g} TFLOP/s'} ({peak_src})", flush=True)
    line = sdpa_line(device, precision)
    if line:
        print(line, flush=True)
    print("FLOPs: one whole image per row counted once with FlopCounterMode (matmul/conv/attention, 2 per "
          "multiply-add; sampler calls of an already-counted shape replayed; compiled modules run eagerly); "
          "baselines counted whole", flush=True)

    run = MethodsRun(args, device, precision, iters, sizes, tiled_size, rows,
                     {r.label for r in select_rows(args.tiled_rows)}, speed_cfg, peak)
    # execution grouped by stage (one resident at a time); the table at the end is in METHOD_ROWS order
    order = ["ccsr_stage1"] + [p for p in dict.fromkeys(r.preset for r in rows) if p != "ccsr_stage1"]
    need_baseline = run.want_baseline and any(r.label in BASELINE_OF for r in rows)
    interrupted = False
    try:
        for preset in order:
            prows = [r for r in rows if r.preset == preset]
            if prows or (preset == "ccsr_stage1" and need_baseline):
                run.run_preset(preset, prows)
                run.bank.release(preset)
    except KeyboardInterrupt:  # Ctrl-C or run_all.sh's time cap: still print what was measured
        interrupted = True
        print("\ninterrupted: the table below holds the rows measured so far", flush=True)

    order_idx = {r.label: i for i, r in enumerate(METHOD_ROWS)}
    table = sorted(run.results, key=lambda m: (m.size, order_idx.get(m.label, 99)))
    table += sorted(run.baselines.values(), key=lambda m: (m.size, m.label))
    print("\n| method | stage | LR->SR | model calls | s/image | peak MiB | GFLOP/image | TFLOP/s | MFU "
          "| vs diffusers |\n|---|---|---|---|---|---|---|---|---|---|")
    for m in table:
        tiles = f" (x{m.tiles[1]} tile batches)" if m.tiles[0] > 1 else ""
        vs = f"x{m.ratio:.2f} ({m.baseline})" if m.ratio is not None else ""
        print(f"| {m.label} | {m.stage} | {m.size}->{m.out} | {m.calls}{tiles} | {m.seconds:.3f} | {m.mem:.0f} | "
              f"{m.flops['total'] / 1e9:.1f} | {achieved_tflops(m.flops['total'], m.seconds):.3g} | "
              f"{format_mfu(mfu(m.flops['total'], m.seconds, peak))} | {vs} |")
    print(f"({args.backbone}, precision={precision}, {device.type} {dname}, torch {torch.__version__}, "
          f"speed={speed_desc}; peak memory: {table[0].mem_kind if table else '-'})", flush=True)
    if interrupted:
        raise SystemExit(130)
    return table


class MethodsRun:
    """The state of one ``--methods`` run: the stage bank, the inputs, the measured rows and baselines."""

    def __init__(self, args, device, precision, iters, sizes, tiled_size, rows, tiled_rows, speed, peak):
        self.args, self.device, self.precision, self.iters = args, device, precision, iters
        self.sizes, self.tiled_size, self.rows, self.tiled_rows = sizes, tiled_size, rows, tiled_rows
        self.speed, self.peak = speed, peak
        self.want_baseline = not args.no_baseline
        self.bank = StageBank(args.backbone, device)
        self.lrs = {s: torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0)) for s in sizes}
        self.results: list[Measured] = []
        self.baselines: dict[tuple[str, int], Measured] = {}

    def at_size(self, label: str, size: int) -> bool:
        """Every row runs at the first size; at the tiled size (when it is not the first) only ``--tiled-rows``."""
        return size == self.sizes[0] or size != self.tiled_size or label in self.tiled_rows

    def report(self, m: Measured) -> None:
        from flops import achieved_tflops, format_mfu, median, mfu

        fl = m.flops
        tput = achieved_tflops(fl["total"], m.seconds)
        tiles = f" x{m.tiles[1]} tile batches ({m.tiles[0]} tiles)" if m.tiles[0] > 1 else ""
        cpu = f" (process CPU {median(m.cpu_times):.2f} s)" if self.device.type == "cpu" else ""
        vs = f" | x{m.ratio:.2f} vs {m.baseline} (FLOPs x{m.flop_ratio:.2f})" if m.ratio is not None else ""
        parts = "counted whole"
        if fl["step"]:
            parts = f"step {fl['step'] / 1e9:.2f} x{fl['calls']} + rest {fl['rest'] / 1e9:.1f}"
        print(f"row {m.label:17s} | {m.stage} | {m.size}->{m.out} | {m.calls} calls{tiles} | {m.seconds:.3f} s/image "
              f"(median of {len(m.times)}: {min(m.times):.3f}-{max(m.times):.3f}){cpu} | peak {m.mem:.0f} MiB "
              f"({m.mem_kind}) | {fl['total'] / 1e9:.1f} GFLOP/image ({parts}) | {tput:.3g} TFLOP/s | "
              f"MFU {format_mfu(mfu(fl['total'], m.seconds, self.peak))}{vs}", flush=True)

    def run_preset(self, preset: str, prows: list[MethodRow]) -> None:
        """All rows of one preset's stage (and, on CCSR's ControlNet stage, the diffusers baselines): FLOPs
        first in eager mode, then the speed switches, then the timed runs."""
        from flops import count_flops

        from sr_lab.diffusion.samplers import sampler_timesteps
        from sr_lab.inference import SRPipeline

        args, device, precision = self.args, self.device, self.precision
        stage = self.bank.stage(preset)
        samplers = {r.label: self.bank.sampler(r) for r in prows}
        flop_counts = {}
        for size in self.sizes:
            for r in prows:
                if self.at_size(r.label, size):
                    pipe = SRPipeline(stage, samplers[r.label], upscale=args.upscale, precision=precision)
                    if not flop_counts:  # fill the stage's caches first (prompt embeddings, tag vocabulary)
                        count_pipeline_flops(pipe, self.lrs[size])
                    flop_counts[(r.label, size)] = count_pipeline_flops(pipe, self.lrs[size])
        base = {}
        if preset == "ccsr_stage1" and self.want_baseline:
            wanted = {BASELINE_OF.get(r.label) for r in self.rows}
            for label, kind, ts_row, steps in BASELINES:
                if label not in wanted:
                    continue
                ts = None
                if ts_row is not None:
                    row = next(r for r in METHOD_ROWS if r.label == ts_row)
                    ts = sampler_timesteps(self.bank.sampler(row), stage.backbone.num_timesteps)
                for size in self.sizes:
                    if size == self.tiled_size and size != self.sizes[0]:
                        continue  # the plain loop does not tile
                    _, f = count_flops(run_baseline, stage, kind, self.lrs[size], upscale=args.upscale,
                                       precision=precision, steps=steps, timesteps=ts)
                    calls = len(ts) if ts is not None else int(steps)
                    base[(label, size)] = ({"total": f, "step": 0, "rest": 0, "calls": calls}, kind, steps, ts)
        if self.speed is not None:  # in place, on the shared backbone too (idempotent); the pipelines below pass it
            from sr_lab.models.speed import apply_speed

            print(f"speed {preset}: {apply_speed(stage, self.speed, precision=precision).summary()}", flush=True)
        for (label, size), (fl, kind, steps, ts) in base.items():
            def run_b(i, kind=kind, size=size, steps=steps, ts=ts):
                run_baseline(stage, kind, self.lrs[size], upscale=args.upscale, precision=precision, seed=i,
                             steps=steps, timesteps=ts)
            times, cpu, mem, mem_kind = time_runs(run_b, device, self.iters)
            m = Measured(label, "ccsr_stage1's ControlNet + UNet", size, size * args.upscale, fl["calls"], (1, 1),
                         times, cpu, mem, mem_kind, fl)
            self.baselines[(label, size)] = m
            self.report(m)
        for size in self.sizes:
            for r in prows:
                if (r.label, size) not in flop_counts:
                    continue
                pipe = SRPipeline(stage, samplers[r.label], upscale=args.upscale, precision=precision,
                                  speed=self.speed)  # compile: static tile batches (one shape)
                calls = len(sampler_timesteps(samplers[r.label], stage.backbone.num_timesteps))
                lr = self.lrs[size]
                times, cpu, mem, mem_kind = time_runs(lambda i: pipe(lr, [i]), device, self.iters)
                m = Measured(r.label, r.preset, size, size * args.upscale, calls, tile_layout(pipe, lr), times, cpu,
                             mem, mem_kind, flop_counts[(r.label, size)])
                b = self.baselines.get((BASELINE_OF.get(r.label, ""), size))
                if b is not None:
                    m.baseline, m.ratio = b.label, m.seconds / b.seconds
                    m.flop_ratio = m.flops["total"] / max(b.flops["total"], 1)
                self.results.append(m)
                self.report(m)
                if r.label == "CCSR-15" and size == self.sizes[0] and args.seeds > 0:
                    seeds_line(pipe, lr, args.seeds, device, size * args.upscale,
                               warm=self.speed is not None and self.speed.compile)


def seeds_line(pipe, lr01: torch.Tensor, n: int, device: torch.device, out_side: int, warm: bool = False) -> None:
    """N seeds of one image in one batched call vs one by one (same images, less time); ``warm``: one untimed
    batched call first (a compiled model compiles again for the new batch size)."""
    seeds = list(range(n))
    if warm:
        pipe(lr01, seeds)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    batched = pipe(lr01, seeds)
    sync(device)
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    single = torch.cat([pipe(lr01, [s]) for s in seeds])
    sync(device)
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    diff = float((batched - single).abs().max())
    print(f"inference seeds N={n} {lr01.shape[-1]}->{out_side} device={device.type}: batched {t_batched:.1f} s "
          f"({t_batched / n:.2f} s/seed), one by one {t_single:.1f} s ({t_single / n:.2f} s/seed), "
          f"x{t_single / t_batched:.2f} (process CPU time {c_batched:.1f} s vs {c_single:.1f} s); "
          f"max |batched - single| = {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Toy-scale reproduction of the papers' ablation trends (``make reproduce``).

Trains the minimal stages on the trained tiny prior (``backbone=tiny``) and runs the ablations whose
direction the four papers report, then prints ONE table ``claim | paper | expected sign | measured values |
holds?`` and writes it as markdown + JSON (default ``benchmarks/results/reproduce/<date>_<device>.{md,json}``).

    .venv/bin/python benchmarks/reproduce.py                 # full run (CPU: < 1 h on 2 cores)
    .venv/bin/python benchmarks/reproduce.py --quick         # smoke run: tiny iteration counts, 2 seeds, 2 images
    .venv/bin/python benchmarks/reproduce.py --only 1,2      # some claims (and only the stages they need)
    .venv/bin/python benchmarks/reproduce.py --device cuda   # trainer=gpu, device=cuda (auto: CUDA when present)

Claims (paper numbers in :data:`CLAIMS`):

1. CCSR Table 5: a narrower t_max - t_min gives lower G-STD (of PSNR) and L-STD. t_max is a *training*
   setting of NUTL (the eps loss covers [0, t_max), l_tmax re-noises to t_max) and a sampling setting; t_min
   is only a sampling setting (the paper never uses it in training). So every t_max gets its own stage-1
   training (T/2, 2T/3, 4T/5) and each variant samples with its own (t_max, t_min): A2, A4 and CCSR share the
   2T/3 model. Row 1b repeats A1/A3 sampler-only on the 2T/3 model (what ``sweeps/ccsr_tmax_tmin.yaml`` does).
2. CCSR Table 4 (V1 vs V2): NUTL + truncated sampling vs a plain eps ControlNet (``loss=eps_mse
   schedule=uniform``, same iterations) sampled with a full spaced DDPM (45 steps from noise) -> lower L-STD.
3. StableSR Table 4: larger CFW w -> higher PSNR (stablesr_stage1 -> stablesr_latents -> stablesr_cfw).
4. StableSR Table 3: colour fix (AdaIN, wavelet) -> higher PSNR than none (same model, inference option).
5. ClearSR Fig. 7: larger alpha -> higher PSNR (5a); larger beta -> better no-reference score (5b; MANIQA
   when its weight file is found, else a labelled weight-free proxy: high-frequency energy).
6. AddSR Table 8: larger nu (TA-ADD weighting, a training setting) -> higher PSNR: one student per nu.

Every job is one of sr_lab's entry points on its own composed config -- ``sr-make-testset``
(``make_testset``), ``sr-train`` (``sr_lab.train.run``), ``sr-eval`` (``run_eval``, with the sweep recipes of
``experiments/sweeps``) -- run in-process by a pool of worker processes (``--jobs``, one thread each on CPU);
the JSON lists each job as the equivalent command line. So the samplers, metrics (pyiqa PSNR/SSIM on Y),
G-STD and L-STD (``sr_lab.eval.stability``) are sr_lab's. Iteration counts are set here; learning rates are
the presets' toy ones (``method.toy_lr``), read back from each training's stored config into the JSON.
"holds?" is computed from the measured numbers (rules in :data:`RULES`), never set by hand.

Work folder (trained stages, test set, eval outputs, logs): ``outputs/reproduce/<full|quick>`` (``--work``).
A job whose command line, upstream jobs and resolved config did not change is skipped on a rerun (a preset
change reruns it and everything after it); ``--fresh`` reruns all.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# -- settings ------------------------------------------------------------------------------------------------
# Every count is set here explicitly (never a preset's own train.iterations); the JSON records all of them.
FULL = {
    "seeds": [0, 1, 2, 3, 4],
    "testset": {"crop_size": 128, "crops_per_image": 2, "degradation": "stablesr", "seed": 0, "crop": "random"},
    "train": {"crop_size": 64, "batch_size": 4, "seed": 0},
    "iterations": {"ccsr_stage1": 300, "ccsr_eps": 300, "stablesr_stage1": 300, "stablesr_cfw": 100,
                   "clearsr": 300, "addsr_teacher": 300, "addsr": 100},
    "records": {"num": 16, "shard_size": 8, "sampler_steps": 50},
    "infer": {"stablesr_ddpm_steps": 50, "clearsr_ddpm_steps": 50, "v1_ddpm_steps": 45, "ccsr_grid": 45},
}
QUICK = {
    "seeds": [0, 1],
    "testset": {"crop_size": 128, "crops_per_image": 1, "degradation": "stablesr", "seed": 0, "crop": "random"},
    "train": {"crop_size": 64, "batch_size": 2, "seed": 0},
    "iterations": {"ccsr_stage1": 3, "ccsr_eps": 3, "stablesr_stage1": 3, "stablesr_cfw": 2,
                   "clearsr": 3, "addsr_teacher": 3, "addsr": 2},
    "records": {"num": 4, "shard_size": 2, "sampler_steps": 5},
    "infer": {"stablesr_ddpm_steps": 5, "clearsr_ddpm_steps": 5, "v1_ddpm_steps": 10, "ccsr_grid": 45},
}
# Ablation points (the papers' values; a subset where a sweep recipe has more, to fit the CPU budget)
CCSR_VARIANTS = {"A1": (0.5, 0.3333), "A2": (0.6667, 0.5), "A3": (0.8, 0.3333), "A4": (0.6667, 0.2),
                 "CCSR": (0.6667, 0.3333)}                       # (t_max, t_min) as in sweeps/ccsr_tmax_tmin.yaml
CFW_W = {"w0": 0.0, "w0_5": 0.5, "w0_75": 0.75, "w1": 1.0}      # sweeps/stablesr_cfw_w.yaml variants
COLOR_FIX = ("none", "adain", "wavelet")
LSA_ALPHA = {"alpha0": 0.0, "ClearSR": 0.01, "alpha0_03": 0.03, "alpha0_05": 0.05}   # beta = 0.01
LSA_BETA = {"beta0": 0.0, "ClearSR": 0.01, "beta0_05": 0.05}                         # alpha = 0.01
ADDSR_NU = (1.3, 2.5)                                            # Table 8, mu = 0.5: the ends of its nu range
NR_METRICS = ["maniqa", "musiq", "niqe"]                         # ClearSR's no-reference scores (pyiqa weights)

RULES = {
    "psnr": "holds = the sign of the mean-PSNR difference (mean over images and seeds) is the paper's; "
            "'beyond seed spread' when |difference| > the larger G-STD (mean per-image std over seeds) of the two",
    "std": "holds = the sign of the difference of the set values (G-STD of PSNR, L-STD) is the paper's; "
           "'beyond image noise' when |difference| > 2 standard errors of the paired per-image differences",
    "sweep": "for a sweep the two ends are compared (w 1 vs 0, alpha 0.05 vs 0, beta 0.05 vs 0, nu 2.5 vs 1.3); "
             "whether every step of the sweep moves the same way is reported as 'monotone'",
}

CLAIMS = {
    "1": {"title": "CCSR Tab. 5: narrower t_max-t_min -> lower G-STD, L-STD (each t_max trained)",
          "paper": "RealSR L-STD A1 .0184, A2 .0206 vs A3 .0219, A4 .0216 (CCSR .0218); PSNR G-STD A1 .253, "
                   "A2 .321 vs A3 .382, A4 .377 (CCSR .366); DIV2K-StableSR L-STD .0244/.0268 vs .0287/.0299",
          "expected": "narrow {A1,A2} < wide {A3,A4} for G-STD(PSNR) and L-STD"},
    "1b": {"title": "CCSR Tab. 5, sampler-only: the same on the one 2T/3 model (sweeps/ccsr_tmax_tmin)",
           "paper": "(as 1; the paper does not say whether A1/A3 were retrained)",
           "expected": "narrow {A1,A2} < wide {A3,A4} for G-STD(PSNR) and L-STD"},
    "2": {"title": "CCSR Tab. 4: NUTL + truncated sampling (V2) vs eps + full sampling (V1) -> lower L-STD",
          "paper": "L-STD V1 .0246 -> V2 .0226 (RealSR), .0307 -> .0294 (DIV2K-StableSR); PSNR G-STD .456 -> .382",
          "expected": "L-STD(V2) < L-STD(V1)"},
    "3": {"title": "StableSR Tab. 4: larger CFW w -> higher PSNR",
          "paper": "DIV2K-Val PSNR w=0 22.68, .5 23.26, .75 24.17, 1 23.14; RealSR 24.07, 24.65, 25.37, 24.70",
          "expected": "PSNR(w=1) > PSNR(w=0)"},
    "4": {"title": "StableSR Tab. 3: colour fix -> higher PSNR than none",
          "paper": "RealSR PSNR none 22.24, AdaIN 24.65, wavelet 23.38 (DRealSR 23.86, 28.03, 26.80)",
          "expected": "PSNR(AdaIN) > PSNR(none) and PSNR(wavelet) > PSNR(none)"},
    "5a": {"title": "ClearSR Fig. 7a: larger alpha (ELA) -> higher PSNR",
           "paper": "Fig. 7a: PSNR rises with alpha (> 2 dB range; values only in the figure); DRealSR alpha .01 "
                    "28.22 -> .03 29.00 (Tab. 1); ELA on 28.11 -> 28.44 (Tab. 4)",
           "expected": "PSNR(alpha=.05) > PSNR(alpha=0)"},
    "5b": {"title": "ClearSR Fig. 7b: larger beta (LLA) -> better no-reference score",
           "paper": "Fig. 7b: MANIQA rises with beta (> 0.1 range; values only in the figure); LLA on: MANIQA "
                    ".6226 -> .6360, NIQE 6.53 -> 5.99 (Tab. 4)",
           "expected": "MANIQA(beta=.05) > MANIQA(beta=0)"},
    "6": {"title": "AddSR Tab. 8: larger nu -> higher PSNR (one student per nu)",
          "paper": "RealSR 4-step PSNR (mu .5): nu 1.3 22.33, 1.7 23.40, 2.1 22.73, 2.5 23.29; 1-step 24.11 -> 24.48",
          "expected": "PSNR(nu=2.5) > PSNR(nu=1.3)"},
}
CLAIM_GROUPS = {"1": ("1", "1b"), "2": ("2",), "3": ("3",), "4": ("4",), "5": ("5a", "5b"), "6": ("6",)}


# -- jobs --------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    phase: str                     # testset | train | eval
    module: str                    # python -m <module>
    args: list[str]
    out: Path                      # the job's own folder (hydra run dir / output)
    done: str                      # a file under `out` that exists when the job succeeded
    needs: tuple[str, ...] = ()
    clean: tuple[Path, ...] = ()   # further folders the job writes (removed before a (re)run)
    key: str = ""
    status: str = "pending"        # pending | cached | ok | failed | skipped
    wall_s: float | None = None
    cpu_s: float | None = None
    returncode: int | None = None
    log: Path | None = None
    tail: str = ""
    extra: dict = field(default_factory=dict)


def _list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def build_jobs(s: dict, work: Path, device: str) -> dict[str, Job]:
    """Every job of the full reproduction (the caller selects the ones the chosen claims need)."""
    jobs: dict[str, Job] = {}
    ts = work / "testset"
    tr, ev = work / "train", work / "eval"
    photos = work / "photos"

    def add(job: Job) -> Job:
        jobs[job.name] = job
        return job

    t = s["testset"]
    add(Job("testset", "testset", "sr_lab.eval.testset",
            [f"hr_dirs={photos / 'held_out'}", f"crop_size={t['crop_size']}", f"crops_per_image={t['crops_per_image']}",
             f"degradation={t['degradation']}", f"seed={t['seed']}", f"crop={t['crop']}", "upscale=4", "device=cpu",
             f"out_dir={ts}", f"hydra.run.dir={ts}"], ts, "manifest.json"))

    trainer = ["trainer=gpu", "trainer.precision=32"] if device == "cuda" else ["trainer=cpu"]
    c = s["train"]

    def train(name: str, preset: str, iters: int, *extra: str, needs: tuple[str, ...] = (),
              done: str = "export/trainable.safetensors", clean: tuple[Path, ...] = (), hr: bool = True) -> Job:
        args = [f"experiment={preset}", "backbone=tiny", *trainer, f"seed={c['seed']}", f"train.iterations={iters}",
                "train.val_every=1000000000", "train.ckpt_every=1000000000", f"train.log_every={max(1, iters // 10)}",
                "train.progress=log", f"data.crop_size={c['crop_size']}", f"data.batch_size={c['batch_size']}",
                f"train.total_batch_size={c['batch_size']}", *([f"data.hr_dirs=[{photos / 'train'}]"] if hr else []),
                "logger=csv", "++trainer.enable_progress_bar=false", *extra, f"hydra.run.dir={tr / name}"]
        return add(Job(name, "train", "sr_lab.train", args, tr / name, done, needs, clean))

    it = s["iterations"]
    for tmax in sorted({v[0] for v in CCSR_VARIANTS.values()}):
        train(f"ccsr_tmax{tmax}", "ccsr_stage1", it["ccsr_stage1"], f"schedule.t_max={tmax}", "schedule.t_min=0.3333")
    # V1 of CCSR Tab. 4: the same ControlNet stage with the plain eps loss at t ~ U[0, T) (no NUTL)
    train("ccsr_eps", "ccsr_stage1", it["ccsr_eps"], "loss=eps_mse", "schedule=uniform", "~schedule.t_max",
          "~schedule.t_min", "sampler.t_max=0.6667", "sampler.t_min=0.3333")
    train("stablesr_stage1", "stablesr_stage1", it["stablesr_stage1"])
    r = s["records"]
    records = tr / "stablesr_records"
    train("stablesr_latents", "stablesr_latents", 1, f"stage1={tr / 'stablesr_stage1' / 'export'}",
          f"records.dir={records}", f"records.num={r['num']}", f"records.shard_size={r['shard_size']}",
          f"sampler.steps={r['sampler_steps']}", needs=("stablesr_stage1",), done="../stablesr_records/meta.json",
          clean=(records,))
    # no VGG16 weights here: LPIPS would run on a random trunk (noise), so its weight is 0 (L1 only; the GAN
    # starts at iteration 501, after the toy run)
    train("stablesr_cfw", "stablesr_cfw", it["stablesr_cfw"], f"records.dir={records}",
          "perceptual.allow_random_init=true", "module.perceptual_weight=0", needs=("stablesr_latents",), hr=False)
    train("clearsr", "clearsr", it["clearsr"])
    train("addsr_teacher", "addsr_teacher", it["addsr_teacher"])
    for nu in ADDSR_NU:
        train(f"addsr_nu{nu}", "addsr", it["addsr"], f"teacher={tr / 'addsr_teacher' / 'export'}",
              f"module.distill_weight.nu={nu}", needs=("addsr_teacher",))

    dev = [f"infer.device={device}", f"metrics.device={device}"]
    common = [f"lr_dir={ts / 'LR'}", f"hr_dir={ts / 'HR'}", f"infer.seeds={_list(s['seeds'])}", "infer.progress=false",
              "logger=csv", *dev]
    inf = s["infer"]

    def evaluate(name: str, train_job: str, *extra: str, metrics=("psnr", "ssim"), hf: bool = False,
                 needs: tuple[str, ...] = ()) -> Job:
        args = ["run_inference=true", f"infer.checkpoint={tr / train_job / 'export'}", *common,
                f"metrics.names={_list(metrics)}", *extra, f"hydra.run.dir={ev / name}"]
        return add(Job(name, "eval", "sr_lab.eval.run", args, ev / name, "summary.json",
                       ("testset", train_job, *needs), extra={"hf": hf}))

    for v, (tmax, _tmin) in CCSR_VARIANTS.items():   # claim 1: each variant on the model trained with its t_max
        evaluate(f"ccsr_{v}", f"ccsr_tmax{tmax}", "sweep=ccsr_tmax_tmin", f"variant={v}", "hydra.mode=RUN",
                 f"infer.sampler.grid={inf['ccsr_grid']}")
    for v in ("A1", "A3"):                             # claim 1b: sampler-only on the 2T/3 model
        evaluate(f"ccsr_{v}_sampler_only", "ccsr_tmax0.6667", "sweep=ccsr_tmax_tmin", f"variant={v}",
                 "hydra.mode=RUN", f"infer.sampler.grid={inf['ccsr_grid']}")
    evaluate("ccsr_V1_eps_ddpm", "ccsr_eps", "sampler@infer.sampler=ddpm_spaced",
             f"infer.sampler.steps={inf['v1_ddpm_steps']}", "infer.start=noise")
    cfw = [f"infer.decoder_checkpoint={tr / 'stablesr_cfw' / 'export'}", "sweep=stablesr_cfw_w", "hydra.mode=RUN",
           f"infer.sampler.steps={inf['stablesr_ddpm_steps']}"]
    for v in CFW_W:                                    # claim 3 (colour fix adain, the recipe's)
        evaluate(f"stablesr_{v}", "stablesr_stage1", *cfw, f"variant={v}", needs=("stablesr_cfw",))
    for fix in COLOR_FIX:                              # claim 4 at w = 0.5 (adain = the w0_5 job of claim 3)
        if fix != "adain":
            evaluate(f"stablesr_color_{fix}", "stablesr_stage1", *cfw, "variant=w0_5", f"infer.color_fix={fix}",
                     needs=("stablesr_cfw",))
    for v in dict.fromkeys([*LSA_ALPHA, *LSA_BETA]):   # claim 5: one job per (alpha, beta) point
        evaluate(f"clearsr_{v}", "clearsr", "sweep=clearsr_lsa", f"variant={v}", "hydra.mode=RUN",
                 f"infer.sampler.steps={inf['clearsr_ddpm_steps']}", metrics=("psnr", "ssim", *NR_METRICS), hf=True)
    for nu in ADDSR_NU:                                # claim 6: the raw student weights (see README)
        evaluate(f"addsr_nu{nu}_eval", f"addsr_nu{nu}", "infer.ema=false")
    return jobs


def claim_jobs(claim: str) -> list[str]:
    """Eval jobs a claim reads (their training jobs follow from `needs`)."""
    return {
        "1": [f"ccsr_{v}" for v in CCSR_VARIANTS],
        "1b": ["ccsr_A1_sampler_only", "ccsr_A2", "ccsr_A3_sampler_only", "ccsr_A4", "ccsr_CCSR"],
        "2": ["ccsr_V1_eps_ddpm", "ccsr_CCSR"],
        "3": [f"stablesr_{v}" for v in CFW_W],
        "4": ["stablesr_color_none", "stablesr_w0_5", "stablesr_color_wavelet"],
        "5a": [f"clearsr_{v}" for v in LSA_ALPHA],
        "5b": [f"clearsr_{v}" for v in LSA_BETA],
        "6": [f"addsr_nu{nu}_eval" for nu in ADDSR_NU],
    }[claim]


# -- running -------------------------------------------------------------------------------------------------
# Jobs run in-process in a small pool of long-lived worker processes (one job per worker at a time), each calling
# the entry point's own Python function on the config composed from the job's overrides -- what the command
# line in the JSON (`jobs[].argv`) runs: sr_lab.eval.testset.make_testset, sr_lab.train.run,
# sr_lab.eval.run.run_eval. On the 2-core VM a process start (torch, Lightning, diffusers, pyiqa imports) costs
# ~20 CPU s, more than most toy jobs; a worker pays it once.
ENTRY = {"sr_lab.eval.testset": "testset", "sr_lab.train": "train", "sr_lab.eval.run": "eval"}


def set_thread_env(threads: int, device: str) -> None:
    """Environment of the worker processes (set before they are spawned)."""
    os.environ.pop("SR_LAB_CONF", None)
    os.environ.update({"SR_LAB_ROOT": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "HYDRA_FULL_ERROR": "1", "TOKENIZERS_PARALLELISM": "false",
                       "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "OPENBLAS_NUM_THREADS": str(threads)})
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _worker_init(threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def run_job_inprocess(spec: dict) -> dict:
    """Run one job in this worker: output to its log file (fd level), returns status and times."""
    import gc
    import logging
    import resource
    import traceback

    for d in (spec["out"], *spec["clean"]):
        if Path(d).exists():
            shutil.rmtree(d)
    Path(spec["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["log"]).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    logf = open(spec["log"], "wb", buffering=0)
    logf.write((shlex.join(spec["argv"]) + "\n(run in-process on the config these overrides compose)\n\n").encode())
    os.dup2(logf.fileno(), 1)
    os.dup2(logf.fileno(), 2)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    error = None
    try:
        from hydra import compose, initialize_config_dir

        from sr_lab.train import CONF_DIR

        overrides = [o for o in spec["overrides"] if not o.startswith("hydra.")] + [f"paths.output_dir={spec['out']}"]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=spec["name"]):
            cfg = compose(config_name=spec["config_name"], overrides=overrides)
        kind = ENTRY[spec["module"]]
        if kind == "testset":
            from sr_lab.eval.testset import make_testset
            make_testset(cfg)
        elif kind == "train":
            from sr_lab.train import run
            run(cfg)
        else:
            from sr_lab.eval.run import run_eval
            run_eval(cfg)
    except BaseException as exc:  # noqa: BLE001 - reported as a failed job, the worker goes on
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for h in logging.getLogger().handlers:
            h.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        logf.close()
        gc.collect()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = error is None and (Path(spec["out"]) / spec["done"]).exists()
    return {"status": "ok" if ok else "failed", "wall_s": time.perf_counter() - t0,
            "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "error": error or
            (None if ok else f"{spec['done']} was not written")}


def portable(text: str, work: Path) -> str:
    return text.replace(str(work), "<WORK>").replace(str(REPO), "<REPO>")


def compute_keys(jobs: dict[str, Job], work: Path) -> None:
    def key(j: Job) -> str:
        if not j.key:
            up = [key(jobs[n]) for n in j.needs if n in jobs]
            blob = json.dumps([j.module, [portable(a, work) for a in j.args], up])
            j.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return j.key
    for j in jobs.values():
        key(j)


def _stamp(j: Job) -> Path:
    return j.out.parent / f".{j.out.name}.reproduce.json"


RESOLVED_KEYS = ("optim.lr", "optim.mode", "train.iterations", "train.total_batch_size", "data.batch_size",
                 "data.crop_size", "loss._target_", "schedule._target_", "schedule.t_max", "sampler._target_",
                 "degradation._target_", "module.distill_weight.nu", "module.perceptual_weight", "module.disc_start",
                 "ema.decay", "records.num", "sampler.steps")


def composed_config(j: Job) -> dict:
    """The job's config as its worker composes it, resolved (the eval node's own hydra block and its
    time-stamped default output_dir left out, as sr_lab.eval.run stores it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sr_lab.train import CONF_DIR

    overrides = [o for o in j.args if not o.startswith("hydra.")] + [f"paths.output_dir={j.out}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=j.name):
        cfg = compose(config_name=ENTRY[j.module], overrides=overrides)
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if c.get("infer") is not None:
        for k in ("hydra", "output_dir"):
            if k in c.infer:
                del c.infer[k]
    return OmegaConf.to_container(c, resolve=True)


def stored_config(j: Job) -> dict | None:
    """The resolved config a finished job stored (training: export/config.yaml; eval: summary.json), or None."""
    from omegaconf import OmegaConf

    try:
        if j.phase == "train" and (j.out / "export" / "config.yaml").is_file():
            return OmegaConf.to_container(OmegaConf.load(j.out / "export" / "config.yaml"))
        if j.phase == "eval" and (j.out / "summary.json").is_file():
            cfg = json.loads((j.out / "summary.json").read_text()).get("config") or {}
            (cfg.get("infer") or {}).pop("output_dir", None)
            return cfg
    except (OSError, ValueError):
        return None
    return None


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flat(v, f"{prefix}.{k}" if prefix else str(k)).items()}
    if isinstance(d, list):
        return {k2: v2 for i, v in enumerate(d) for k2, v2 in _flat(v, f"{prefix}[{i}]").items()}
    return {prefix: d}


def is_cached(j: Job) -> bool:
    """Same command line, upstream jobs and finished output -- and, where the job stored its resolved config,
    the same config as the one composed now (a preset or conf/ change since the cached run reruns the job)."""
    st = _stamp(j)
    if not st.is_file() or not (j.out / j.done).exists():
        return False
    try:
        rec = json.loads(st.read_text())
    except (OSError, ValueError):
        return False
    if rec.get("key") != j.key or rec.get("status") != "ok":
        return False
    stored = stored_config(j)
    if stored is not None:
        a, b = _flat(composed_config(j)), _flat(stored)
        diff = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
        if diff:
            print(f"[cache] {j.name}: the config changed since the cached run ({', '.join(diff[:4])}"
                  f"{' ...' if len(diff) > 4 else ''}): rerun", flush=True)
            return False
    j.wall_s, j.cpu_s = rec.get("wall_s"), rec.get("cpu_s")
    return True


def resolved_settings(j: Job) -> dict:
    """What a training job actually used (its stored config; else the config composed now)."""
    cfg = stored_config(j) or composed_config(j)
    flat = _flat(cfg)
    return {k: flat[k] for k in RESOLVED_KEYS if k in flat}


class Runner:
    """A pool of ``workers`` spawned processes running jobs in-process (module comment above)."""

    def __init__(self, work: Path, workers: int, threads: int):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        self.work, self.workers = work, max(1, workers)
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                        initializer=_worker_init, initargs=(threads,))

    def spec(self, j: Job) -> dict:
        j.log = self.work / "logs" / f"{j.name}.log"
        return {"name": j.name, "module": j.module, "config_name": {"testset": "testset", "train": "train",
                                                                    "eval": "eval"}[ENTRY[j.module]],
                "overrides": j.args, "out": str(j.out), "clean": [str(c) for c in j.clean], "done": j.done,
                "log": str(j.log), "argv": ["python", "-m", j.module, *j.args]}

    def finish(self, j: Job, res: dict) -> None:
        j.status, j.wall_s, j.cpu_s = res["status"], res["wall_s"], res["cpu_s"]
        if j.status == "ok":
            _stamp(j).write_text(json.dumps({"key": j.key, "status": "ok", "wall_s": j.wall_s, "cpu_s": j.cpu_s,
                                             "argv": [portable(a, self.work) for a in self.spec(j)["argv"]]},
                                            indent=1))
        else:
            j.tail = (res.get("error") or "") + "\n" + (j.log.read_text(errors="replace")[-3000:]
                                                        if j.log and j.log.is_file() else "")

    def run_phase(self, jobs: list[Job], all_jobs: dict[str, Job], label: str) -> float:
        """Run ``jobs`` (in list order, as soon as their needs are met); returns the phase's wall seconds."""
        from concurrent.futures import FIRST_COMPLETED, wait

        t0 = time.perf_counter()
        todo = [j for j in jobs if j.status == "pending"]
        running: dict = {}

        def ready(j: Job) -> bool | None:  # True: runnable, None: a need failed
            for n in j.needs:
                if n in all_jobs and all_jobs[n].status in ("failed", "skipped"):
                    return None
            return all(n not in all_jobs or all_jobs[n].status in ("ok", "cached") for n in j.needs)

        while True:
            for j in todo:
                if j.status == "pending" and ready(j) is None:
                    j.status = "skipped"
                    print(f"[{label}] skip {j.name}: a job it needs failed", flush=True)
            for j in todo:
                if len(running) >= self.workers:
                    break
                if j.status == "pending" and j not in running.values() and ready(j):
                    _stamp(j).unlink(missing_ok=True)
                    running[self.pool.submit(run_job_inprocess, self.spec(j))] = j
                    print(f"[{label}] start {j.name} ({_dt.datetime.now():%H:%M:%S})", flush=True)
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                j = running.pop(fut)
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    res = {"status": "failed", "wall_s": 0.0, "cpu_s": 0.0, "error": f"worker died: {exc!r}"}
                self.finish(j, res)
                msg = (f"[{label}] {'done' if j.status == 'ok' else 'FAILED'} {j.name}: {j.wall_s:.1f} s wall, "
                       f"{j.cpu_s:.1f} s CPU")
                if j.status != "ok":
                    msg += f" (log {j.log})\n" + j.tail[-1500:]
                print(msg, flush=True)
        return time.perf_counter() - t0

    def close(self, kill: bool = False) -> None:
        if kill:
            for p in list(getattr(self.pool, "_processes", {}).values()):  # only the workers this script started
                p.terminate()
        self.pool.shutdown(wait=not kill, cancel_futures=True)


# -- reading results ------------------------------------------------------------------------------------------------
def hf_energy(path: Path) -> float:
    """Weight-free PROXY of detail (not MANIQA/MUSIQ/NIQE): mean |4-neighbour Laplacian| of BT.601 luma on the
    0-255 scale, 4-px border removed (as the PSNR crop)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
    y = (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2])[4:-4, 4:-4]
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.abs(lap).mean())


@dataclass
class Result:
    """One eval job: sr_lab's summary + per-image arrays [images x seeds]."""
    name: str
    summary: dict
    images: list[str]
    per_image: dict[str, np.ndarray]     # metric -> [M, N]
    l_std_img: np.ndarray                # [M] per-image L-STD terms (sr_lab.eval.stability)

    def mean(self, m: str) -> float | None:
        x = self.summary["metrics"].get(m, {})
        if m in self.per_image and m not in self.summary["metrics"]:
            return float(self.per_image[m].mean())
        return x.get("mean") if x.get("available") else None

    def gstd(self, m: str) -> float | None:
        from sr_lab.eval.stability import g_std

        if m in self.per_image and m not in self.summary["metrics"]:
            return g_std(self.per_image[m])
        x = self.summary["metrics"].get(m, {})
        return x.get("g_std") if x.get("available") else None

    @property
    def l_std(self) -> float | None:
        return self.summary.get("stability", {}).get("l_std")

    def per_image_std(self, m: str) -> np.ndarray:
        from sr_lab.eval.stability import per_image_std

        return per_image_std(self.per_image[m])


def load_result(j: Job) -> Result | None:
    if j.status not in ("ok", "cached"):
        return None
    summary = json.loads((j.out / "summary.json").read_text())
    rows = list(csv.DictReader(open(j.out / "per_image.csv", newline="")))
    images = sorted({r["image"] for r in rows})
    runs = sorted({r["run"] for r in rows}, key=lambda r: int(r.split("_")[-1]) if r.split("_")[-1].isdigit() else r)
    per_image: dict[str, np.ndarray] = {}
    for m in ("psnr", "ssim"):
        if rows and rows[0].get(m) not in (None, ""):
            arr = np.full((len(images), len(runs)), np.nan)
            for r in rows:
                arr[images.index(r["image"]), runs.index(r["run"])] = float(r[m])
            per_image[m] = arr
    if j.extra.get("hf"):
        arr = np.full((len(images), len(runs)), np.nan)
        for r in rows:
            arr[images.index(r["image"]), runs.index(r["run"])] = hf_energy(Path(r["sr_path"]))
        per_image["hf_proxy"] = arr
    std_rows = {r["image"]: r for r in csv.DictReader(open(j.out / "per_image_std.csv", newline=""))}
    l_img = np.array([float(std_rows[i]["l_std"]) if i in std_rows and std_rows[i].get("l_std") else np.nan
                      for i in images])
    return Result(j.name, summary, images, per_image, l_img)


def hr_hf(testset: Path) -> float | None:
    files = sorted((testset / "HR").glob("*.png"))
    return float(np.mean([hf_energy(f) for f in files])) if files else None


# -- claims --------------------------------------------------------------------------------------------------------
def f4(x, d=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def psnr_compare(hi: Result, lo: Result) -> dict:
    """Expected: mean PSNR of `hi` > that of `lo`."""
    d = hi.mean("psnr") - lo.mean("psnr")
    spread = max(hi.gstd("psnr"), lo.gstd("psnr"))
    return {"diff": d, "spread": spread, "sign_ok": d > 0, "beyond": abs(d) > spread}


def metric_compare(hi: Result, lo: Result, m: str) -> dict:
    d = hi.mean(m) - lo.mean(m)
    spread = max(hi.gstd(m), lo.gstd(m))
    return {"diff": d, "spread": spread, "sign_ok": d > 0, "beyond": abs(d) > spread}


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def group_std_compare(narrow: list[Result], wide: list[Result], what: str) -> dict:
    """Expected: the set value (`gstd` of PSNR or `lstd`) is lower for `narrow` than for `wide`."""
    if what == "gstd":
        val = [r.gstd("psnr") for r in narrow], [r.gstd("psnr") for r in wide]
        per = np.mean([r.per_image_std("psnr") for r in narrow], 0), np.mean([r.per_image_std("psnr") for r in wide], 0)
    else:
        val = [r.l_std for r in narrow], [r.l_std for r in wide]
        per = np.mean([r.l_std_img for r in narrow], 0), np.mean([r.l_std_img for r in wide], 0)
    d = float(np.mean(val[0]) - np.mean(val[1]))
    se = paired_se(*per)
    return {"diff": d, "se2": 2 * se, "sign_ok": d < 0, "beyond": abs(d) > 2 * se,
            "images_agreeing": int((per[0] < per[1]).sum()), "images": int(len(per[0]))}


def verdict(parts: list[dict], noise: str) -> str:
    ok = all(p["sign_ok"] for p in parts)
    beyond = all(p["beyond"] for p in parts)
    if ok:
        return "yes" + ("" if beyond else f" (within {noise})")
    return "no" + ("" if any(p["beyond"] and not p["sign_ok"] for p in parts) else f" (within {noise})")


def monotone(vals: list[float], increasing: bool = True) -> bool:
    return all((b > a) if increasing else (b < a) for a, b in zip(vals, vals[1:]))


def sweep_row(row: dict, r: dict, need: list, key: str, values, name: str, diff_label: str) -> None:
    """A one-knob sweep (CFW w, LSA alpha): PSNR/G-STD per point, last vs first point, monotone or not."""
    vals = [r[n].mean("psnr") for n in need]
    c = psnr_compare(r[need[-1]], r[need[0]])
    row["comparisons"] = {name: c, "monotone": monotone(vals)}
    row["measured"] = ("PSNR/G-STD " + ", ".join(f"{key}={v:g} {f4(r[n].mean('psnr'), 2)}/{f4(r[n].gstd('psnr'), 2)}"
                                                 for v, n in zip(values, need))
                       + f"{diff_label} {c['diff']:+.2f} dB; monotone: {'yes' if monotone(vals) else 'no'}")
    row["holds"] = verdict([c], "seed spread")


def evaluate_claim(cid: str, R: dict[str, Result | None], extras: dict) -> dict:
    info = CLAIMS[cid]
    row = {"id": cid, "claim": info["title"], "paper": info["paper"], "expected": info["expected"]}
    need = claim_jobs(cid)
    missing = [n for n in need if R.get(n) is None]
    if missing:
        row.update(measured=f"not measured: job(s) {', '.join(missing)} failed or did not run", holds="n/a")
        return row
    r = {n: R[n] for n in need}
    details = {n: {"psnr": x.mean("psnr"), "psnr_gstd": x.gstd("psnr"), "ssim": x.mean("ssim"),
                   "ssim_gstd": x.gstd("ssim"), "l_std": x.l_std, "n_runs": x.summary["n_runs"],
                   "n_images": x.summary["n_images_all_runs"],
                   "model_calls": x.summary.get("model_calls"), "executed_steps": x.summary.get("executed_steps"),
                   **({"hf_proxy": x.mean("hf_proxy"), "hf_proxy_gstd": x.gstd("hf_proxy")}
                      if "hf_proxy" in x.per_image else {})} for n, x in r.items()}
    row["details"] = details
    if cid in ("1", "1b"):
        a1, a2, a3, a4, cc = need
        narrow, wide = [r[a1], r[a2]], [r[a3], r[a4]]
        g = group_std_compare(narrow, wide, "gstd")
        lc = group_std_compare(narrow, wide, "lstd")
        row["comparisons"] = {"gstd_psnr": g, "l_std": lc}
        lab = ["A1", "A2", "A3", "A4", "CCSR"]
        row["measured"] = ("L-STD " + ", ".join(f"{k} {f4(r[n].l_std)}" for k, n in zip(lab, need))
                           + "; G-STD(PSNR) " + ", ".join(f"{k} {f4(r[n].gstd('psnr'), 3)}" for k, n in zip(lab, need))
                           + "; PSNR " + ", ".join(f"{k} {f4(r[n].mean('psnr'), 2)}" for k, n in zip(lab, need))
                           + f". narrow-wide: L-STD {lc['diff']:+.4f} (2SE {lc['se2']:.4f}), "
                           f"G-STD {g['diff']:+.3f} (2SE {g['se2']:.3f})")
        row["holds"] = verdict([g, lc], "image noise")
    elif cid == "2":
        v1, v2 = r[need[0]], r[need[1]]
        lc = group_std_compare([v2], [v1], "lstd")
        g = group_std_compare([v2], [v1], "gstd")
        row["comparisons"] = {"l_std": lc, "gstd_psnr_info": g}
        row["measured"] = (f"L-STD V1 {f4(v1.l_std)} -> V2 {f4(v2.l_std)} ({lc['diff']:+.4f}, 2SE {lc['se2']:.4f}); "
                           f"G-STD(PSNR) {f4(v1.gstd('psnr'), 3)} -> {f4(v2.gstd('psnr'), 3)}; "
                           f"PSNR {f4(v1.mean('psnr'), 2)} -> {f4(v2.mean('psnr'), 2)}")
        row["holds"] = verdict([lc], "image noise")
    elif cid == "3":
        sweep_row(row, r, need, "w", CFW_W.values(), "psnr_w1_vs_w0", "; w1-w0")
    elif cid == "4":
        none, adain, wav = (r[n] for n in need)
        ca, cw = psnr_compare(adain, none), psnr_compare(wav, none)
        row["comparisons"] = {"adain_vs_none": ca, "wavelet_vs_none": cw}
        row["measured"] = (f"PSNR/G-STD none {f4(none.mean('psnr'), 2)}/{f4(none.gstd('psnr'), 2)}, AdaIN "
                           f"{f4(adain.mean('psnr'), 2)}/{f4(adain.gstd('psnr'), 2)}, wavelet "
                           f"{f4(wav.mean('psnr'), 2)}/{f4(wav.gstd('psnr'), 2)} (w=0.5); "
                           f"AdaIN-none {ca['diff']:+.2f}, wavelet-none {cw['diff']:+.2f} dB")
        row["holds"] = verdict([ca, cw], "seed spread")
    elif cid == "5a":
        sweep_row(row, r, need, "a", LSA_ALPHA.values(), "psnr_alpha_max_vs_0", " (beta .01); a.05-a0")
    elif cid == "5b":
        unavailable = r[need[0]].summary.get("unavailable", {})
        nr_avail = [m for m in NR_METRICS if r[need[0]].summary["metrics"].get(m, {}).get("available")]
        parts, txt = [], []
        for m in nr_avail:   # the paper's metrics where their weights were found
            lower = m == "niqe"
            c = metric_compare(r[need[0]], r[need[-1]], m) if lower else metric_compare(r[need[-1]], r[need[0]], m)
            parts.append(c)
            txt.append(f"{m.upper()} " + ", ".join(f"b={b:g} {f4(r[n].mean(m), 4)}"
                                                   for b, n in zip(LSA_BETA.values(), need)))
        missing_txt = "; ".join(f"{m.upper()} n/a: " + _short_missing(unavailable.get(m, "")) for m in NR_METRICS
                                if m not in nr_avail)
        vals = [r[n].mean("hf_proxy") for n in need]
        cp = metric_compare(r[need[-1]], r[need[0]], "hf_proxy")
        row["comparisons"] = {"paper_metrics": dict(zip(nr_avail, parts)), "hf_proxy_beta_max_vs_0": cp,
                              "hf_proxy_monotone": monotone(vals),
                              "unavailable": {m: unavailable.get(m) for m in NR_METRICS if m not in nr_avail}}
        row["measured"] = "; ".join(txt + ([missing_txt] if missing_txt else []) + [
            "PROXY high-frequency energy (mean |Laplacian| of luma, 0-255; not a paper metric) " + ", ".join(
                f"b={b:g} {f4(v, 2)}" for b, v in zip(LSA_BETA.values(), vals))
            + f" (HR {f4(extras.get('hr_hf'), 2)}); b.05-b0 {cp['diff']:+.2f} (seed spread {cp['spread']:.2f})"])
        proxy = "proxy: " + verdict([cp], "seed spread")
        row["holds"] = (verdict(parts, "seed spread") + "; " + proxy) if parts else f"n/a (MANIQA missing); {proxy}"
    elif cid == "6":
        lo, hi = r[need[0]], r[need[-1]]
        c = psnr_compare(hi, lo)
        row["comparisons"] = {"psnr_nu_max_vs_min": c}
        row["measured"] = (f"PSNR/G-STD nu={ADDSR_NU[0]:g} {f4(lo.mean('psnr'), 2)}/{f4(lo.gstd('psnr'), 2)}, nu="
                           f"{ADDSR_NU[-1]:g} {f4(hi.mean('psnr'), 2)}/{f4(hi.gstd('psnr'), 2)} (4 steps); "
                           f"diff {c['diff']:+.3f} dB")
        row["holds"] = verdict([c], "seed spread")
    return row


def _short_missing(msg: str) -> str:
    m = re.search(r"([\w.-]+\.(?:pth|pt|mat))", msg or "")
    return f"{m.group(1)} not found" if m else (msg or "unavailable")[:80]


# -- output --------------------------------------------------------------------------------------------------------
def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def main_table(rows: list[dict]) -> str:
    lines = ["| claim | paper | expected sign | measured values | holds? |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(md_escape(x) for x in (f"{r['id']}. {r['claim']}", r["paper"], r["expected"],
                                                                 r["measured"], r["holds"])) + " |")
    return "\n".join(lines)


def details_table(rows: list[dict]) -> str:
    lines = ["| claim | job | PSNR | G-STD | SSIM | L-STD | HF proxy | model calls |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for n, d in (r.get("details") or {}).items():
            lines.append(f"| {r['id']} | {n} | {f4(d['psnr'], 2)} | {f4(d['psnr_gstd'], 3)} | {f4(d['ssim'])} | "
                         f"{f4(d['l_std'])} | {f4(d.get('hf_proxy'), 2) if 'hf_proxy' in d else ''} | "
                         f"{d.get('model_calls') or ''} |")
    return "\n".join(lines)


def device_info(device: str) -> dict:
    import torch

    from sr_lab.utils.device import device_name

    dev = torch.device(device)
    return {"device": device, "name": device_name(dev), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def git_info() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def write_photos(work: Path) -> dict:
    """The tiny prior's training photos and its two held-out photos (sr_lab.pretrain.tiny's split), as PNGs."""
    from PIL import Image

    from sr_lab.pretrain.tiny import load_photos

    p = load_photos()
    out = {}
    for part, items in (("train", p.train), ("held_out", p.held_out)):
        d = work / "photos" / part
        d.mkdir(parents=True, exist_ok=True)
        for name, t in items.items():
            f = d / (Path(name).stem + ".png")
            if not f.exists():
                Image.fromarray(t.permute(1, 2, 0).numpy()).save(f)
        out[part] = sorted(items)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny iteration counts, 2 seeds, 2 images")
    ap.add_argument("--only", default=None, help="claim ids, comma-separated (1..6; 1 includes 1b, 5 = 5a + 5b)")
    ap.add_argument("--fresh", action="store_true", help="rerun every job (ignore the cache in the work folder)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default=None, help="output path stem (writes <stem>.md and <stem>.json)")
    ap.add_argument("--work", default=None, help="work folder (default outputs/reproduce/<full|quick>)")
    ap.add_argument("--jobs", type=int, default=None, help="processes at a time (default 2)")
    ap.add_argument("--scale-iters", type=float, default=1.0,
                    help="multiply every training's iteration count (e.g. 10 on a GPU); recorded")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads per process (default: 1 on CPU: on a shared 2-core VM two 1-thread "
                         "processes ran ~10x faster per iteration than one 2-thread process; 4 on CUDA)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    started = _dt.datetime.now()
    load_start = os.getloadavg()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("reproduce: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    s = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.scale_iters != 1:   # e.g. on a GPU: train longer (recorded; its own work folder)
        s["iterations"] = {k: max(1, round(v * args.scale_iters)) for k, v in s["iterations"].items()}
        s["scale_iters"] = args.scale_iters
    mode = ("quick" if args.quick else "full") + (f"-x{args.scale_iters:g}" if args.scale_iters != 1 else "")
    work = Path(args.work or REPO / "outputs" / "reproduce" / mode).resolve()
    workers = args.jobs or 2
    threads = args.threads or (4 if device == "cuda" else 1)
    dinfo = device_info(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dinfo["name"]).strip("-") or device
    # a --quick smoke run writes into its work folder unless --out says otherwise
    stem = Path(args.out) if args.out else (work if args.quick else REPO / "benchmarks" / "results" / "reproduce") / (
        f"{started:%Y-%m-%d_%H%M}_{slug}" + ("" if mode == "full" else f"-{mode}"))
    if stem.suffix in (".md", ".json"):
        stem = stem.with_suffix("")
    if args.only:
        groups = [g.strip() for g in re.split(r"[,\s]+", args.only) if g.strip()]
        bad = [g for g in groups if g not in CLAIM_GROUPS and g not in CLAIMS]
        if bad:
            print(f"reproduce: --only {bad}: claim ids are {sorted(CLAIM_GROUPS)} (or {sorted(CLAIMS)})",
                  file=sys.stderr)
            return 2
        claims = [c for g in groups for c in CLAIM_GROUPS.get(g, (g,))]
    else:
        claims = [c for g in CLAIM_GROUPS.values() for c in g]
    claims = [c for g in CLAIM_GROUPS.values() for c in g if c in claims]   # in the table's order

    print(f"# sr_lab make reproduce ({mode}) {started:%Y-%m-%d %H:%M:%S}; device {device} ({dinfo['name']}), "
          f"torch {dinfo['torch']}, {os.cpu_count()} CPU cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{workers} processes x {threads} thread(s); work {work}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    photos = write_photos(work)
    jobs = build_jobs(s, work, device)
    compute_keys(jobs, work)
    selected: dict[str, Job] = {}

    def select(n: str) -> None:
        if n in jobs and n not in selected:
            for m in jobs[n].needs:
                select(m)
            selected[n] = jobs[n]
    for c in claims:
        for n in claim_jobs(c):
            select(n)
    order = list(jobs)   # build order; the training phase starts the long chains first
    train_first = ["stablesr_stage1", "addsr_teacher", "stablesr_latents", "stablesr_cfw",
                   *[f"addsr_nu{nu}" for nu in ADDSR_NU]]
    set_thread_env(threads, device)
    for j in selected.values():   # dependency order: a job is cached only when everything it needs is
        if not args.fresh and all(selected[n].status == "cached" for n in j.needs) and is_cached(j):
            j.status = "cached"
    runner = Runner(work, workers, threads)
    phases: dict[str, dict] = {}
    try:
        for phase in ("testset", "train", "eval"):
            pj = [selected[n] for n in order if n in selected and selected[n].phase == phase]
            if phase == "train":
                pj.sort(key=lambda j: train_first.index(j.name) if j.name in train_first else len(train_first))
            cached = [j.name for j in pj if j.status == "cached"]
            if cached:
                print(f"[{phase}] cached (same settings, skipped): {', '.join(cached)}", flush=True)
            wall = runner.run_phase(pj, jobs, phase)
            ran = [j for j in pj if j.status in ("ok", "failed")]
            phases[phase] = {"wall_s": round(wall, 1), "jobs_run": len(ran), "jobs_cached": len(cached),
                             "job_wall_s_sum": round(sum(j.wall_s or 0 for j in ran), 1),
                             "job_cpu_s_sum": round(sum(j.cpu_s or 0 for j in ran), 1)}
            print(f"[{phase}] phase wall time {wall:.1f} s ({len(ran)} job(s) run, {len(cached)} cached)", flush=True)
    except KeyboardInterrupt:
        runner.close(kill=True)
        raise
    runner.close()

    t_rep = time.perf_counter()
    results = {n: load_result(j) for n, j in selected.items() if j.phase == "eval"}
    extras = {"hr_hf": hr_hf(work / "testset")}
    rows = [evaluate_claim(c, results, extras) for c in claims]
    phases["report"] = {"wall_s": round(time.perf_counter() - t_rep, 1)}
    total = time.perf_counter() - t_start
    finished = _dt.datetime.now()

    table = main_table(rows)
    resolved = {n: resolved_settings(j) for n, j in selected.items() if j.phase == "train"}
    used = "; ".join(f"{n}: lr {r.get('optim.lr')}, {r.get('train.iterations')} it" for n, r in resolved.items()
                     if n != "stablesr_latents")
    per_claim_time = {}
    for c in claims:
        names: set[str] = set()

        def closure(n: str) -> None:
            if n in selected and n not in names:
                names.add(n)
                for m in selected[n].needs:
                    closure(m)
        for n in claim_jobs(c):
            closure(n)
        per_claim_time[c] = round(sum(selected[n].wall_s or 0 for n in names if selected[n].status == "ok"), 1)
    failed = [j.name for j in selected.values() if j.status in ("failed", "skipped")]
    header = (f"sr_lab toy-scale reproduction ({mode}), {started:%Y-%m-%d %H:%M} - {finished:%H:%M}, device {device} "
              f"({dinfo['name']}, {os.cpu_count()} cores), torch {dinfo['torch']}, git {git_info()['commit']}"
              f"{' (uncommitted changes)' if git_info()['dirty'] else ''}; backbone=tiny (trained prior); "
              f"{len(s['seeds'])} seeds x {s['testset']['crops_per_image'] * len(photos['held_out'])} images (LR "
              f"{s['testset']['crop_size'] // 4} px, x4); total wall time {total / 60:.1f} min; load average at "
              f"start {load_start[0]:.1f} (1 min) with other jobs on the machine")
    cpu_sum = sum(j.cpu_s or 0 for j in selected.values() if j.status == "ok")
    timing = ("wall time per phase: " + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in phases.items())
              + f"; total {total:.0f} s; CPU time of the jobs run {cpu_sum:.0f} s")
    print("\n" + header + "\n\n" + table + "\n\n" + timing, flush=True)
    if failed:
        print(f"failed or skipped jobs: {', '.join(failed)} (logs in {work / 'logs'})", flush=True)

    settings = {
        "mode": mode, **s, "ccsr_variants": CCSR_VARIANTS, "cfw_w": CFW_W, "color_fix": COLOR_FIX,
        "lsa_alpha (beta=0.01)": LSA_ALPHA, "lsa_beta (alpha=0.01)": LSA_BETA, "addsr_nu": ADDSR_NU,
        "nr_metrics": NR_METRICS, "workers": workers, "threads_per_process": threads, "photos": photos,
        "notes": [
            "every training: backbone=tiny (the trained prior), val/ckpt off, batch and crop as above, HR = the "
            "prior's 7 training photos; test set = random crops of the 2 held-out photos (chelsea, rocket), "
            "degraded with sr-make-testset degradation=stablesr",
            "claim 1: one ccsr_stage1 per t_max (t_max is a NUTL training setting, t_min only a sampling one)",
            "claim 2: V1 = ccsr_stage1 with loss=eps_mse schedule=uniform, sampled with ddpm_spaced from noise",
            "stablesr_cfw: module.perceptual_weight=0 (no VGG16 weights: LPIPS on a random trunk would be noise); "
            "the GAN term starts at iteration 501 (preset), after the toy run",
            "stablesr inference: DDPM with stablesr_ddpm_steps (paper 200) from the noised LR latent, colour fix "
            "adain unless stated (sweeps/stablesr_cfw_w.yaml)",
            "addsr: inference with the raw student weights (infer.ema=false): after 100 iterations the EMA (0.99) "
            "would still hold 37 % of the teacher initialisation",
        ],
    }
    out = {
        "title": "sr_lab toy-scale reproduction of the papers' ablation trends (make reproduce)",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        "total_wall_s": round(total, 1), "device": dinfo, "git": git_info(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "rules": RULES, "settings": settings,
        "claims": rows,
        "phases": phases, "claim_job_wall_s": per_claim_time,
        "jobs": [{"name": j.name, "phase": j.phase, "status": j.status, "wall_s": j.wall_s and round(j.wall_s, 1),
                  "cpu_s": j.cpu_s and round(j.cpu_s, 1), "needs": list(j.needs), "key": j.key,
                  "argv": [portable(a, work) for a in ["python", "-m", j.module, *j.args]],
                  **({"resolved": resolved[j.name]} if j.name in resolved else {}),
                  **({"log_tail": j.tail} if j.tail else {})} for j in selected.values()],
        "work": str(work), "failed": failed,
    }
    md = "\n".join([
        f"# {out['title']}", "", header, "", table, "",
        "Rules: " + " ".join(RULES.values()), "",
        "## Per job", "", details_table(rows), "",
        timing + ("; job wall time per claim (incl. its trainings, shared jobs counted in each): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in per_claim_time.items())), "",
        "## Settings", "", *[f"- {n}" for n in settings["notes"]],
        f"- iterations: {json.dumps(s['iterations'])}; train {json.dumps(s['train'])}; "
        f"records {json.dumps(s['records'])}; "
        f"inference {json.dumps(s['infer'])}; seeds {s['seeds']}; test set {json.dumps(s['testset'])}",
        f"- learning rate and iterations each training used (its stored config; the lr is the preset's toy lr, "
        f"method.toy_lr): {used}",
        f"- every command line and the resolved training settings: {stem.name}.json (`jobs[].argv`, "
        f"`jobs[].resolved`)", ""])
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    print(f"written: {stem.with_suffix('.md')} and .json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

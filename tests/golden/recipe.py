"""The golden-output recipe: a short, fixed-seed chain of every preset on the random tiny backbone
(``backbone=tiny_random``), run through
the command-line entry points only (``python -m sr_lab.train`` / ``python -m sr_lab.inference.run``), so
the same recipe runs against any checkout of sr_lab, old or new.

    from recipe import run_recipe, checkout_env
    result = run_recipe(out_dir, sys.executable, checkout_env("/path/to/checkout"))

What it runs (all on CPU, one thread per process, two processes at a time):

* training, 2 iterations each, 64 px crops, batch 2, validation and periodic checkpoints off, CSV logger,
  HR photos = four fixed 96 px crops of scikit-image sample photos (written by the recipe):
  ``ccsr_stage1``, ``stablesr_stage1``, ``stablesr_latents`` (stage1 = the stablesr_stage1 export, 4 records,
  10 DDPM steps), ``stablesr_cfw`` (those records, random LPIPS trunk, discriminator from iteration 0),
  ``ccsr_stage2`` (stage1 = the ccsr_stage1 export, random LPIPS trunk);
* inference (``start=noise``) on one fixed 32x32 LR crop: both denoising stages with seeds [0, 1]
  (StableSR: DDPM 10 steps; CCSR: its truncated default, 45 spaced / 15 executed), each once more with
  its decoder stage (``decoder_checkpoint``; the StableSR/CFW run samples with DDIM, 5 steps, eta 1),
  StableSR with CFG (``cfg_scale=2``, ``negative_prompt=blurry``), and CCSR with aggregation tiling
  forced over many tiles (4x4 latent tiles, overlap 2: 165 tiles) and tiled VAE encode/decode (64 px
  tiles) on a 48x64 LR.

About 11 processes x ~9.5 CPU seconds, almost all of it Python/torch/Lightning start-up: ~105 CPU s, about
a minute of wall time on two idle cores.

Every process gets ``cwd`` = the checkout, ``PYTHONPATH`` = the checkout and ``SR_LAB_ROOT`` = the checkout
(:func:`checkout_env`), so the checkout's package and ``conf/`` are the ones used, not an installed copy.
:func:`collect` reads what a finished recipe wrote into named arrays (the same names for record and test).
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PRESETS = ("ccsr_stage1", "stablesr_stage1", "stablesr_latents", "stablesr_cfw", "ccsr_stage2")
EXPORTS = ("ccsr_stage1", "stablesr_stage1", "stablesr_cfw", "ccsr_stage2")  # presets that export weights
WORKERS = 2          # processes at a time
THREADS = "1"        # torch/OpenMP threads per process: results do not depend on the machine's core count
JOB_TIMEOUT_S = 600

# (name in the inputs folder, scikit-image photo, top, left, height, width)
INPUT_CROPS = {
    "lr_small.png": ("astronaut", 64, 192, 32, 32),   # 32x32 LR -> 128x128 SR
    "lr_wide.png": ("coffee", 100, 200, 48, 64),      # 48 rows x 64 cols LR -> 192x256 SR (tiling run)
}
HR_CROPS = {  # the training photos (data.hr_dirs): four 96x96 crops
    "hr_astronaut.png": ("astronaut", 40, 160, 96, 96),
    "hr_coffee.png": ("coffee", 120, 260, 96, 96),
    "hr_chelsea.png": ("chelsea", 60, 120, 96, 96),
    "hr_ihc.png": ("immunohistochemistry", 200, 100, 96, 96),
}

# backbone=tiny_random: the random-weight tiny backbone the golden outputs were recorded on (named
# `tiny` before the trained prior became the default; the recorded manifest keeps that command line)
TRAIN_FAST = [
    "backbone=tiny_random",
    "seed=0", "train.iterations=2", "train.val_every=1000", "train.ckpt_every=1000", "train.log_every=1",
    "data.crop_size=64", "data.batch_size=2", "train.total_batch_size=2", "logger=csv",
    "++trainer.enable_progress_bar=false",
]
INFER_COMMON = ["start=noise", "device=cpu", "progress=false", "batch_size=1"]


class RecipeError(RuntimeError):
    """A recipe step failed (the message names the step and ends with its output)."""


@dataclass
class Job:
    name: str
    module: str               # sr_lab.train | sr_lab.inference.run
    args: list[str]
    needs: tuple[str, ...] = ()
    seconds: float | None = None
    cpu_s: float | None = None
    returncode: int | None = None
    output_tail: str = ""
    argv: list[str] = field(default_factory=list)


# -- inputs -------------------------------------------------------------------------------------------
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def make_inputs(out_dir: Path) -> dict[str, Path]:
    """Write the LR inputs (``inputs/``) and the training HR photos (``hr/``); returns name -> path."""
    paths = {}
    for folder, crops in (("inputs", INPUT_CROPS), ("hr", HR_CROPS)):
        for fname, (photo, top, left, h, w) in crops.items():
            crop = _photo(photo)[top:top + h, left:left + w]
            assert crop.shape == (h, w, 3), (fname, crop.shape)
            p = out_dir / folder / fname
            _write_png(crop, p)
            paths[f"{folder}/{fname}"] = p
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the environment ------------------------------------------------------------------------------------
def checkout_env(repo: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that makes ``python -m sr_lab...`` use ``repo``'s package and ``repo/conf``, offline,
    single-threaded."""
    repo = str(Path(repo).resolve())
    env = dict(os.environ if base is None else base)
    env.pop("SR_LAB_CONF", None)  # would override $SR_LAB_ROOT/conf
    env.update({
        "PYTHONPATH": repo, "SR_LAB_ROOT": repo, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
        "HYDRA_FULL_ERROR": "1",  # a failing step shows the exception behind Hydra's one-line error
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "OPENBLAS_NUM_THREADS": THREADS,
        "CUDA_VISIBLE_DEVICES": "",
    })
    return env


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``: float results of a training
    run may differ in the last bits between CPU kinds (vector widths, reduction orders)."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_PROBE = ("import json, platform, sys, numpy, torch, PIL, skimage, sr_lab; "
          "print(json.dumps({'sr_lab': sr_lab.__file__, 'torch': torch.__version__, "
          "'numpy': numpy.__version__, 'pillow': PIL.__version__, 'skimage': skimage.__version__, "
          "'python': sys.version.split()[0], 'machine': platform.machine(), "
          "'torch_threads': torch.get_num_threads()}))")


def probe(python: str, env: dict[str, str]) -> dict:
    """Which sr_lab (file) and library versions the recipe's processes import; raises :class:`RecipeError`
    when sr_lab is not the checkout's (e.g. an editable install of another copy wins)."""
    import json

    repo = Path(env["SR_LAB_ROOT"]).resolve()
    proc = subprocess.run([python, "-c", _PROBE], cwd=repo, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0:
        raise RecipeError(f"{python} cannot import sr_lab from {repo}:\n{proc.stdout}{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    pkg = Path(info["sr_lab"]).resolve()
    if pkg.parent != repo / "sr_lab":
        raise RecipeError(f"the recipe's processes import sr_lab from {pkg}, not from the checkout {repo}")
    return info


# -- the jobs -------------------------------------------------------------------------------------------
def jobs(out: Path) -> list[Job]:
    """The recipe's steps in a fixed order (``needs`` = steps whose outputs a step reads)."""
    hr = f"data.hr_dirs=[{out / 'hr'}]"
    small, wide = out / "inputs" / "lr_small.png", out / "inputs" / "lr_wide.png"
    exp = {p: out / p / "export" for p in PRESETS}
    records = out / "stablesr_records"

    def train(preset: str, *extra: str, needs: tuple[str, ...] = ()) -> Job:
        return Job(preset, "sr_lab.train",
                   [f"experiment={preset}", *TRAIN_FAST, *extra, f"hydra.run.dir={out / preset}"], needs)

    def infer(name: str, stage: str, inp: Path, *extra: str, needs: tuple[str, ...]) -> Job:
        return Job(f"infer_{name}", "sr_lab.inference.run",
                   [f"checkpoint={exp[stage]}", f"input={inp}", f"output_dir={out / 'sr' / name}",
                    *INFER_COMMON, *extra], needs)

    return [
        train("stablesr_stage1", hr),
        train("ccsr_stage1", hr, "optim.lr=1e-4"),  # recorded at the paper lr (the toy default became 1e-3)
        train("stablesr_latents", hr, f"stage1={exp['stablesr_stage1']}", f"records.dir={records}",
              "records.num=4", "records.shard_size=2", "sampler.steps=10", needs=("stablesr_stage1",)),
        train("ccsr_stage2", hr, f"stage1={exp['ccsr_stage1']}", "perceptual.allow_random_init=true",
              needs=("ccsr_stage1",)),
        train("stablesr_cfw", f"records.dir={records}", "perceptual.allow_random_init=true", "module.disc_start=0",
              needs=("stablesr_latents",)),
        infer("stablesr", "stablesr_stage1", small, "seeds=[0,1]", "sampler.steps=10", needs=("stablesr_stage1",)),
        infer("ccsr", "ccsr_stage1", small, "seeds=[0,1]", needs=("ccsr_stage1",)),
        infer("stablesr_cfg", "stablesr_stage1", small, "seeds=[0]", "sampler.steps=10", "cfg_scale=2",
              "negative_prompt=blurry",  # the stage's prompt is empty: an empty negative would make CFG a no-op
              needs=("stablesr_stage1",)),
        infer("ccsr_tiled", "ccsr_stage1", wide, "seeds=[0]", "tile.enabled=true", "tile.size=4",
              "tile.overlap=2", "tile.batch=64", "vae_tile.enabled=true", "vae_tile.size=64",
              "vae_tile.overlap=16", needs=("ccsr_stage1",)),
        infer("ccsr_stage2_decoder", "ccsr_stage1", small, "seeds=[0]",
              f"decoder_checkpoint={exp['ccsr_stage2']}", needs=("ccsr_stage1", "ccsr_stage2")),
        # DDIM (eta 1: its noise path too) rides on the CFW run to save a process
        infer("stablesr_cfw_decoder_ddim", "stablesr_stage1", small, "seeds=[0]", "sampler=ddim", "sampler.steps=5",
              "sampler.eta=1.0", f"decoder_checkpoint={exp['stablesr_cfw']}", "decoder_w=0.5",
              needs=("stablesr_stage1", "stablesr_cfw")),
    ]


def _run_job(job: Job, python: str, env: dict[str, str], cwd: str) -> None:
    """Run one step; records its wall seconds and its CPU seconds (user + sys of the process tree)."""
    job.argv = [python, "-m", job.module, *job.args]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(job.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(JOB_TIMEOUT_S, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        job.returncode = proc.returncode
        job.cpu_s = usage.ru_utime + usage.ru_stime
        log.seek(0)
        out = log.read().decode("utf-8", "replace")
    job.seconds = time.perf_counter() - t0
    if job.returncode == -9:
        out += f"\n(killed after the {JOB_TIMEOUT_S} s limit per step)"
    job.output_tail = out[-6000:]


def run_recipe(out_dir: str | Path, python: str, env: dict[str, str], *, workers: int = WORKERS,
               keep_going: bool = False) -> dict:
    """Run the whole recipe into ``out_dir`` with ``python`` (an interpreter that has sr_lab's
    dependencies) under ``env`` (:func:`checkout_env`: ``SR_LAB_ROOT`` names the checkout; the processes
    run in it). Returns what ran and where it wrote. A failing step raises :class:`RecipeError`, or with
    ``keep_going`` the steps that do not need it still run and the result lists ``failed`` steps (name,
    exit code, command, output tail) and ``not_run`` steps (they need a failed one)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = env.get("SR_LAB_ROOT")
    if not repo or not (Path(repo) / "sr_lab").is_dir():
        raise RecipeError(f"env['SR_LAB_ROOT']={repo!r} is not an sr_lab checkout (use checkout_env(repo))")
    t0 = time.perf_counter()
    versions = probe(python, env)
    inputs = make_inputs(out)
    todo = jobs(out)
    done: set[str] = set()
    failed: list[Job] = []
    lock = threading.Condition()
    running: set[str] = set()

    def next_job() -> Job | None:  # called with the lock held
        for j in todo:
            if j.name not in running and j.returncode is None and all(n in done for n in j.needs):
                return j
        return None

    def worker() -> None:
        while True:
            with lock:
                while True:
                    if (failed and not keep_going) or all(j.returncode is not None for j in todo):
                        return
                    job = next_job()
                    if job is not None:
                        running.add(job.name)
                        break
                    if not running:  # nothing runnable and nothing running: unmet needs
                        return
                    lock.wait()
            _run_job(job, python, env, repo)
            with lock:
                running.discard(job.name)
                (done.add(job.name) if job.returncode == 0 else failed.append(job))
                lock.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failed and not keep_going:
        j = failed[0]
        raise RecipeError(f"recipe step {j.name} failed (exit {j.returncode}) after {j.seconds:.1f} s:\n"
                          f"  {shlex.join(j.argv)}\n{j.output_tail}")
    not_run = [j.name for j in todo if j.returncode is None]
    if not_run and not failed:
        raise RecipeError(f"recipe steps never ran: {not_run}")

    def rel(p: Path) -> str:
        return Path(p).relative_to(out).as_posix()

    images = sorted(rel(p) for p in (out / "sr").rglob("*.png")
                    if f"infer_{p.relative_to(out / 'sr').parts[0]}" in done)
    return {
        "out_dir": str(out),
        "repo": str(repo),
        "python": python,
        "versions": versions,
        "wall_s": round(wall, 2),
        "inputs": {k: {"path": rel(p), "sha256": sha256(p)} for k, p in inputs.items()},
        "exports": {p: rel(out / p / "export") for p in EXPORTS
                    if p in done and (out / p / "export" / "trainable.safetensors").is_file()},
        "records_dir": rel(out / "stablesr_records"),
        "sr_images": images,
        "failed": [{"name": j.name, "returncode": j.returncode, "command": shlex.join(j.argv),
                    "output_tail": j.output_tail} for j in failed],
        "not_run": not_run,
        "cpu_s": round(sum(j.cpu_s or 0.0 for j in todo), 2),
        "jobs": [{"name": j.name, "argv": j.argv, "seconds": round(j.seconds or 0.0, 2),
                  "cpu_s": round(j.cpu_s or 0.0, 2)} for j in todo],
    }


def portable_command(argv: list[str], out_dir: str, repo: str) -> str:
    """A command line with the output folder and checkout replaced by ``<OUT>`` / ``<REPO>``."""
    return shlex.join(argv[1:]).replace(str(out_dir), "<OUT>").replace(str(repo), "<REPO>")


# -- reading the outputs ----------------------------------------------------------------------------------
def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def collect(result: dict) -> dict[str, dict]:
    """Named outputs of a finished recipe:

    * ``weights``: ``"<preset>/<tensor key>"`` -> tensor, every tensor of each ``export/trainable.safetensors``;
    * ``records``: ``"<shard file stem>/<key>"`` -> tensor, every tensor of the stablesr_latents shards;
    * ``images``: ``"<run>/seed_<k>/<stem>.png"`` -> H x W x 3 uint8, every SR PNG written by inference.
    """
    from safetensors.torch import load_file

    out = Path(result["out_dir"])
    weights = {}
    for preset, export in result["exports"].items():
        for k, v in load_file(str(out / export / "trainable.safetensors")).items():
            weights[f"{preset}/{k}"] = v
    records = {}
    if "stablesr_latents" in {j["name"] for j in result.get("failed", [])} | set(result.get("not_run", [])):
        shards = []  # a failed run may leave some shards behind
    else:
        shards = sorted((out / result["records_dir"]).glob("*.safetensors"))
    for shard in shards:
        for k, v in load_file(str(shard)).items():
            records[f"{shard.stem}/{k}"] = v
    images = {Path(p).relative_to("sr").as_posix(): read_png(out / p) for p in result["sr_images"]}
    return {"weights": weights, "records": records, "images": images}


def producer(name: str) -> str:
    """The recipe step that writes an output name of :func:`collect` (prefixed with its group)."""
    group, rest = name.split("/", 1)
    if group == "weights":
        return rest.split("/", 1)[0]
    if group == "records":
        return "stablesr_latents"
    return "infer_" + rest.split("/", 1)[0]


# -- storing weights: whole files within a byte budget, per-tensor summaries beyond it ----------------------
WEIGHTS_COPY_BUDGET = 8_000_000   # bytes of trainable.safetensors copied verbatim, smallest exports first
STATS_SAMPLES = 16


def plan_weight_storage(sizes: dict[str, int], budget: int = WEIGHTS_COPY_BUDGET) -> dict[str, str]:
    """preset -> "copy" | "stats": the smallest exports are copied while the running total stays within
    ``budget``; the others are stored as per-tensor summaries (:func:`tensor_stats`)."""
    plan, total = {}, 0
    for preset in sorted(sizes, key=lambda p: (sizes[p], p)):
        total += sizes[preset]
        plan[preset] = "copy" if total <= budget else "stats"
    return plan


def tensor_stats(t) -> dict:
    """Summary of one tensor: shape, dtype, float64 sum / sum of squares / sum of |x|, the first 16 values
    and 16 evenly spaced values (flattened, row-major)."""
    import torch

    x = t.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    idx = torch.linspace(0, max(n - 1, 0), steps=min(STATS_SAMPLES, n)).round().long() if n else torch.zeros(0).long()
    return {
        "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "numel": n,
        "sum": float(x.sum()), "sumsq": float((x * x).sum()), "abs_sum": float(x.abs().sum()),
        "first": [float(v) for v in x[:STATS_SAMPLES]],
        "strided_index": [int(i) for i in idx], "strided": [float(x[i]) for i in idx],
    }

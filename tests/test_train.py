"""End-to-end training on the tiny backbone: the make target, checkpoint contents, exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, ROOT, compose_train
from sr_lab.train import run


def _weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_make_train_ccsr_stage1_end_to_end(tmp_path):
    """`make train EXP=ccsr_stage1` on the embedded default: checkpoint, metrics, image grid, export."""
    args = "train.iterations=4 train.val_every=2 train.ckpt_every=2 data.crop_size=64 sampler.steps=12 " \
           f"hydra.run.dir={tmp_path}"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(["make", "-s", "train", "EXP=ccsr_stage1", f"ARGS={args}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert {c.name for c in ckpts} >= {"last.ckpt", "step0000004.ckpt", "step0000008.ckpt"}
    state = _weights(tmp_path / "checkpoints" / "last.ckpt")
    assert state and all(k.startswith("adapter.") for k in state)  # only what trains
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/psnr_y", "val/ssim_y", "train/x0_T", "train/x0_tmax", "train/eps_tmax", "train/eps"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert 0 < metrics["val/psnr_y"] < 100 and -1 <= metrics["val/ssim_y"] <= 1
    assert list((tmp_path / "csv").rglob("val_lr_sr_hr_step*.png"))
    exported = load_file(tmp_path / "export" / "trainable.safetensors")
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)


@pytest.mark.parametrize("mode,accumulate", [("alternate", 1), ("combined", 2)])
def test_resume_continues_to_the_same_weights(tmp_path, mode, accumulate):
    """An interrupted run resumed from its checkpoint ends with exactly the uninterrupted weights."""
    base = [*FAST, "experiment=ccsr_stage1", f"optim.mode={mode}", "train.iterations=6",
            f"train.total_batch_size={2 * accumulate}", "train.export_weights=false"]
    full = run(compose_train([*base, "train.ckpt_every=3"], tmp_path / "full"))
    assert full["train/loss"] == full["train/loss"]
    steps_per_iter = 2 if mode == "alternate" else 1
    mid = tmp_path / "full" / "checkpoints" / f"step{3 * steps_per_iter:07d}.ckpt"
    assert mid.is_file()
    # "interrupted" after iteration 3: resume from that checkpoint in a fresh run folder
    run(compose_train([*base, f"ckpt_path={mid}"], tmp_path / "resumed"))
    a = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    # and training moved the weights away from the mid-run checkpoint
    m = _weights(mid)
    assert any(not torch.equal(a[k], m[k]) for k in a)


def test_same_seed_same_result_different_seed_differs(tmp_path):
    base = [*FAST, "experiment=ccsr_stage1", "train.iterations=2", "train.export_weights=false"]
    run(compose_train(base, tmp_path / "a"))
    run(compose_train(base, tmp_path / "b"))
    run(compose_train([*base, "seed=1"], tmp_path / "c"))  # backbone=tiny: the shipped prior, seed-independent
    a, b, c = (_weights(tmp_path / d / "checkpoints" / "last.ckpt") for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.timeout(400)
def test_ddp_two_cpu_processes(tmp_path):
    """trainer=ddp on 2 CPU processes (gloo): manual gradient all-reduce keeps the replicas identical
    (checked by the module at the end of training), ranks read disjoint samples, rank 0 writes."""
    args = ["experiment=ccsr_stage1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32", "train.total_batch_size=8", "data.batch_size=2", "train.iterations=3",
            "train.val_every=3", "train.ckpt_every=3", "data.crop_size=64", "sampler.steps=6",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "sr-train"), *args], cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "accumulate=2 world=2" in out and "DDP replicas in sync" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "val/psnr_y" in json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow  # bf16 autocast is slow on CPU (~1 min); run with `make test-slow`
def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    """trainer.precision=bf16-mixed (the paper-scale setting) runs the same code path under autocast."""
    metrics = run(compose_train([*FAST, "experiment=ccsr_stage1", "trainer.precision=bf16-mixed",
                                 "train.iterations=2", "train.val_every=2", "train.export_weights=false"],
                                tmp_path))
    assert all(v == v for v in metrics.values()) and "val/psnr_y" in metrics
    state = _weights(tmp_path / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in state.values())  # trainable master weights stay fp32

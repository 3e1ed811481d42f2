"""benchmarks/flops.py and the ``--methods`` mode of benchmarks/inference.py: FLOP counts against hand counts,
MFU arithmetic, the peak table, the plain diffusers baseline loop, and a CPU smoke of the new paths (tiny
backbone, 16 -> 64, one timed run)."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import flops  # noqa: E402


def _load_inference():
    name = "bench_inference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / "inference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def bench():
    return _load_inference()


@pytest.fixture(scope="module")
def ccsr_stage(bench):
    """CCSR stage 1 on the tiny backbone (random ControlNet), as --methods builds it."""
    return bench.StageBank("tiny", torch.device("cpu")).stage("ccsr_stage1")


def _args(**kw):
    base = dict(device="cpu", precision=None, iters=1, size=128, sizes="16", tiled=False, tiled_size=512,
                backbone="tiny", rows="CCSR-15", tiled_rows="all", peak_tflops=None, no_baseline=False,
                compile=False, channels_last=False, frozen_bf16=False, upscale=4, seeds=0)
    base.update(kw)
    return argparse.Namespace(**base)


# -- FLOP counting against hand counts -------------------------------------------------------------------
def test_linear_flops_are_2_in_out_batch():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    out, f = flops.count_flops(lin, x)
    assert out.shape == (5, 8)
    assert f == 2 * 16 * 8 * 5  # the bias add is element-wise: not counted


def test_conv_flops_are_2_n_cout_hw_cin_k2():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    _, f = flops.count_flops(conv, torch.randn(2, 3, 10, 10))
    assert f == 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3
    strided = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)  # out 5x5, C_in/groups = 2
    _, f = flops.count_flops(strided, torch.randn(1, 4, 10, 10))
    assert f == 2 * 1 * 6 * 5 * 5 * 2 * 3 * 3


def test_attention_flops_counted_on_cpu_too():
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    _, f = flops.count_flops(F.scaled_dot_product_attention, q, k, v)
    assert f == 2 * (2 * 16 * 8 * 24) + 2 * (2 * 16 * 24 * 8)  # q k^T and (softmax) v, batch x heads = 2


def test_count_flops_on_meta_tensors():
    with torch.device("meta"):
        lin = torch.nn.Linear(1024, 4096)
        x = torch.empty(77, 1024)
    _, f = flops.count_flops(lin, x)
    assert f == 2 * 1024 * 4096 * 77


# -- MFU arithmetic and the peak table --------------------------------------------------------------------
def test_mfu_arithmetic():
    assert flops.achieved_tflops(3e12, 2.0) == pytest.approx(1.5)
    assert flops.mfu(989e12, 2.0, 989.0) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, None) is None
    assert flops.format_mfu(0.1234) == "12.3%"
    assert flops.format_mfu(None) == "n/a"
    assert flops.median([3.0, 1.0, 2.0, 10.0, 4.0]) == 3.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("NVIDIA GeForce RTX 4090", 165.0), ("Tesla V100-SXM2-32GB", 125.0),
    ("Tesla V100-PCIE-16GB", 112.0), ("NVIDIA H100 NVL", None), ("Tesla T4", None)])
def test_peak_table_lookup_by_name(name, peak):
    got, label = flops.peak_tflops_for(name)
    assert got == peak
    assert label


def test_device_peak_cpu_is_na_unless_given():
    assert flops.device_peak("cpu", "bf16")[0] is None
    assert flops.device_peak("cpu", "32", override=100.0) == (100.0, "--peak-tflops")


# -- the diffusers baseline loop --------------------------------------------------------------------------
def _count_calls(module, counter, key):
    return module.register_forward_pre_hook(lambda *_: counter.__setitem__(key, counter[key] + 1))


def test_baseline_loop_makes_the_rows_model_calls(bench, ccsr_stage):
    from sr_lab.diffusion.samplers import sampler_timesteps
    from sr_lab.inference import SRPipeline

    bank = bench.StageBank("tiny", torch.device("cpu"))
    row = next(r for r in bench.METHOD_ROWS if r.label == "CCSR-15")
    sampler = bank.sampler(row)
    ts = sampler_timesteps(sampler, ccsr_stage.backbone.num_timesteps)
    assert len(ts) == 16  # 45-grid truncated: the step at T + 15
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counts = {"unet": 0, "controlnet": 0}
    hooks = [_count_calls(ccsr_stage.backbone.unet, counts, "unet"),
             _count_calls(bench.controlnet_of(ccsr_stage), counts, "controlnet")]
    try:
        out = bench.run_baseline(ccsr_stage, "ddpm", lr, upscale=4, precision="32", timesteps=ts)
        assert counts == {"unet": 16, "controlnet": 16}
        assert out.shape == (1, 3, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
        counts.update(unet=0, controlnet=0)
        bench.run_baseline(ccsr_stage, "ddim", lr, upscale=4, precision="32", steps=3)
        assert counts == {"unet": 3, "controlnet": 3}
        counts.update(unet=0, controlnet=0)
        SRPipeline(ccsr_stage, sampler, upscale=4)(lr, [0])
        assert counts == {"unet": 16, "controlnet": 16}  # sr_lab's row: the same calls
    finally:
        for h in hooks:
            h.remove()


def test_replayed_flop_count_equals_a_full_count(bench, ccsr_stage):
    """Replaying repeated sampler calls of a counted shape gives exactly the FLOPs of counting every call."""
    import hydra

    from sr_lab.inference import SRPipeline

    sampler = hydra.utils.instantiate({"_target_": "sr_lab.diffusion.samplers.ddim.sample", "_partial_": True,
                                       "steps": 3})
    pipe = SRPipeline(ccsr_stage, sampler, upscale=4)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe(lr, [0])  # caches (prompt embedding)
    counted = bench.count_pipeline_flops(pipe, lr)
    _, full = flops.count_flops(pipe, lr, [0])
    assert counted["total"] == full
    assert counted["calls"] == 3 and counted["step"] > 0
    assert counted["total"] == counted["step"] * 3 + counted["rest"]


# -- CLI paths --------------------------------------------------------------------------------------------
def test_select_rows(bench):
    assert [r.label for r in bench.select_rows("ccsr-15, AddSR-4")] == ["CCSR-15", "AddSR-4"]
    assert len(bench.select_rows("all")) == 6
    with pytest.raises(SystemExit, match="unknown row"):
        bench.select_rows("CCSR-16")


def test_speed_flags(bench):
    assert bench.speed_setup(_args(), "32") == (None, "none")
    with pytest.raises(SystemExit, match="--frozen-bf16 needs --precision bf16"):
        bench.speed_setup(_args(frozen_bf16=True), "32")
    cfg, desc = bench.speed_setup(_args(compile=True, channels_last=True), "32")
    assert cfg.compile and cfg.channels_last and cfg.frozen_dtype is None and desc == "compile,channels_last"


def test_methods_cpu_smoke(bench, capsys):
    """CCSR-15 at 16 -> 64 with its diffusers baseline (same call count) and the seeds line."""
    table = bench.methods(_args(sizes="16", seeds=2))
    assert [(m.label, m.size) for m in table] == [("CCSR-15", 16), ("diffusers DDPM-16", 16)]
    ccsr, base = table
    assert (ccsr.calls, base.calls) == (16, 16) and ccsr.tiles == (1, 1)
    assert ccsr.baseline == "diffusers DDPM-16" and ccsr.ratio > 0
    assert ccsr.flop_ratio == pytest.approx(1.0, rel=0.02)  # same networks, same calls
    assert ccsr.flops["step"] * 16 + ccsr.flops["rest"] == ccsr.flops["total"]
    out = capsys.readouterr().out
    assert "| method | stage | LR->SR | model calls | s/image |" in out
    assert "MFU n/a" in out and "inference seeds N=2 16->64" in out


def test_tiled_size_layout_and_flops(bench, ccsr_stage):
    """136 -> 544: a latent of 68 > one 64-latent tile, so 2 x 2 aggregation tiles in one batched call; the
    replayed count goes through the tiled model (one step = 4 tiles)."""
    import hydra

    from sr_lab.inference import SRPipeline

    sampler = hydra.utils.instantiate({"_target_": "sr_lab.diffusion.samplers.ddim.sample", "_partial_": True,
                                       "steps": 2})
    pipe = SRPipeline(ccsr_stage, sampler, upscale=4)
    small, large = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 136, 136)
    assert bench.tile_layout(pipe, small) == (1, 1) and bench.tile_layout(pipe, large) == (4, 1)
    pipe(small, [0])
    f_small, f_large = bench.count_pipeline_flops(pipe, small), bench.count_pipeline_flops(pipe, large)
    assert f_large["calls"] == 2 and f_large["step"] > 4 * f_small["step"]
    run = bench.MethodsRun(_args(), torch.device("cpu"), "32", 1, [16, 512], 512, [], {"CCSR-15"}, None, None)
    assert run.at_size("AddSR-1", 16) and run.at_size("CCSR-15", 512) and not run.at_size("AddSR-1", 512)


def test_sd21_shape_refused_on_cpu_at_real_size(bench):
    with pytest.raises(SystemExit, match="smoke run only"):
        bench.methods(_args(backbone="sd21_shape", sizes="128"))


@pytest.mark.slow
def test_methods_every_row_cpu_smoke(bench):
    table = bench.methods(_args(rows="all", sizes="8"))
    assert [m.label for m in table] == [r.label for r in bench.METHOD_ROWS] + ["diffusers DDIM-20",
                                                                               "diffusers DDPM-16"]
    assert [m.calls for m in table] == [200, 20, 16, 1, 4, 50, 20, 16]


@pytest.mark.slow
def test_methods_sd21_shape_cpu_smoke(bench):
    table = bench.methods(_args(backbone="sd21_shape", rows="CCSR-15", sizes="16"))
    assert [m.label for m in table] == ["CCSR-15", "diffusers DDPM-16"]
    assert table[0].flop_ratio == pytest.approx(1.0, rel=0.02)


@pytest.mark.slow
def test_methods_compile_smoke(bench, monkeypatch):
    """--compile through sr_lab.models.speed (the eager dynamo backend: the wiring, not inductor's speed)."""
    from sr_lab.models.speed import SpeedConfig

    monkeypatch.setattr(bench, "speed_setup", lambda args, precision: (
        SpeedConfig(compile=True, channels_last=True, frozen_dtype=None, compile_backend="eager"), "compile"))
    table = bench.methods(_args(compile=True, channels_last=True))
    assert table[0].flop_ratio == pytest.approx(1.0, rel=0.02)  # counted eagerly through the compiled modules

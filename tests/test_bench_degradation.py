"""benchmarks/degradation.py: presets composed from conf/degradation/, --vs, --reference basicsr."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import degradation as bench_deg  # noqa: E402  (benchmarks/degradation.py)

TINY = ["--batch", "2", "--size", "32", "--iters", "2", "--warmup", "1", "--device", "cpu"]
RATE = r"([0-9.]+) pairs/s"


def test_every_yaml_preset_builds_from_the_config_group():
    names = bench_deg.preset_names()
    assert {"realesrgan", "stablesr", "ccsr", "bicubic", "bsrgan"} <= set(names)
    assert names == sorted(p.stem for p in (ROOT / "conf" / "degradation").glob("*.yaml"))
    for name in names:
        deg = bench_deg.build_preset(name)
        assert callable(deg), name
    deg = bench_deg.build_preset("stablesr", per_sample=True)
    assert deg.per_sample and deg.resize_lr_to_hr and deg.scale == 4  # the YAML's values, upscale resolved


def test_vs_bicubic_realesrgan_same_batches(capsys):
    bench_deg.main(["--preset", "realesrgan", "--vs", "bicubic", *TINY])
    out = capsys.readouterr().out.splitlines()
    a = next(ln for ln in out if ln.startswith("degradation realesrgan batch=2 crop=32 device=cpu"))
    b = next(ln for ln in out if ln.startswith("degradation bicubic batch=2 crop=32 device=cpu"))
    vs = next(ln for ln in out if ln.startswith("degradation vs: "))
    ra, rb = (float(re.search(RATE, ln).group(1)) for ln in (a, b))
    ratio = float(re.search(r"realesrgan/bicubic = x([0-9.e+-]+)", vs).group(1))
    assert ratio == pytest.approx(ra / rb, rel=0.01)
    assert rb > ra  # plain bicubic is cheaper than the second-order pipeline


def test_interleaving_gives_each_contender_the_same_inputs():
    seen: dict[str, list] = {"A": [], "B": []}

    def record(name):
        def fn(hr, g):
            seen[name].append((hr.sum().item(), torch.rand(1, generator=g).item()))
        return fn

    hrs = bench_deg.hr_batches(2, 1, 8, torch.device("cpu"), 0)
    times = bench_deg.time_interleaved({"A": record("A"), "B": record("B")}, hrs, 3, 1, torch.device("cpu"), 0)
    assert seen["A"] == seen["B"] and len(seen["A"]) == 4 and [len(t) for t in times.values()] == [3, 3]


def test_reference_basicsr(capsys):
    # BasicSR's filter2D pads by 10 px: at least ~70 px HR (the first resize may go down to 0.15)
    bench_deg.main(["--preset", "realesrgan", "--reference", "basicsr", *TINY, "--size", "96"])
    out = capsys.readouterr().out
    try:
        import basicsr_reference

        basicsr_reference.load_basicsr()
    except ImportError:
        assert "reference basicsr: skipped" in out and "pip install basicsr==1.4.2 --no-deps" in out
        return
    assert re.search(r"degradation reference basicsr==1\.4\.2 .*" + RATE, out)
    assert re.search(r"degradation reference: realesrgan/basicsr = x[0-9.]+", out)


def test_basicsr_reference_outputs_pairs():
    bref = pytest.importorskip("basicsr_reference")
    try:
        ref = bref.BasicSRRealESRGAN(device=torch.device("cpu"))
    except ImportError as exc:
        pytest.skip(f"basicsr not installed: {exc}")
    hr = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    kernels = ref.kernels(2)
    assert kernels["kernel1"].shape == (2, 21, 21) and kernels["sinc_kernel"].shape == (2, 21, 21)
    gt_usm, lq = ref.degrade(hr, kernels)
    assert gt_usm.shape == hr.shape and lq.shape == (2, 3, 24, 24)
    assert torch.equal(lq, (lq * 255).round() / 255) and 0 <= lq.min() and lq.max() <= 1

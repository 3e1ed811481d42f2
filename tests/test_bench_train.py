"""benchmarks/train.py: a CPU smoke run at minimal size (the stage trained by sr_lab.train.run itself)."""
from __future__ import annotations

import json
import math
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import train as bench_train  # noqa: E402  (benchmarks/train.py)

TINY = ["--crop", "32", "--batch", "1", "--steps", "2", "--warmup", "1", "--device", "cpu"]


def _check(r: dict) -> None:
    parts = r["breakdown_s"]
    assert set(parts) == set(bench_train.PIECES) == {"data", "degrade", "vae", "fwd+bwd", "optim", "log", "other"}
    assert all(parts[k] >= 0 for k in parts if k != "other"), parts
    assert math.isclose(sum(parts.values()), r["step_s"], rel_tol=1e-6)
    named = sum(v for k, v in parts.items() if k != "other")
    assert named <= r["step_s"] * 1.001 and named >= 0.75 * r["step_s"], parts  # the pieces cover the step
    assert parts["fwd+bwd"] > 0 and parts["vae"] > 0 and parts["optim"] > 0 and parts["degrade"] > 0
    assert r["step_s"] <= r["wall_s"] * 1.001 and r["steps"] == 2
    assert math.isclose(r["samples_per_s"], r["batch"] / r["step_s"])
    assert r["flops_per_step"] and r["flops_per_step"] > 0
    assert r["peak_memory_gib"] > 0


def test_bench_train_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    results = bench_train.main(["--experiment", "ccsr_stage1", *TINY, "--json", str(out), "--peak-tflops", "1.0"])
    assert len(results) == 1 and json.loads(out.read_text())[0]["experiment"] == "ccsr_stage1"
    r = results[0]
    _check(r)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12)  # peak 1 TFLOP/s
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train ")]
    assert len(line) == 1 and line[0].startswith("train ccsr_stage1 tiny 32 b1 32 cpu (")
    for word in ("samples/s", "data ", "| degrade ", "| vae ", "| fwd+bwd ", "| optim ", "| log ", "MFU ", "peak "):
        assert word in line[0], word
    # without a peak (CPU): MFU n/a, the line says why
    r["mfu"], r["peak_source"] = None, "no peak for CPUs: pass --peak-tflops"
    assert "MFU n/a (no peak for CPUs" in bench_train.format_result(r)


@pytest.mark.slow
def test_bench_train_stablesr_cpu():
    _check(bench_train.main(["--experiment", "stablesr_stage1", *TINY])[0])

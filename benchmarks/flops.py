"""FLOP counting and model-FLOP utilisation (MFU) shared by the benchmarks.

* :func:`flop_counter` — ``torch.utils.flop_counter.FlopCounterMode`` (no table printed) that also counts
  the CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which PyTorch's
  table lacks, so attention would count 0 on CPU). What it counts is the matrix work: ``mm``/``addmm``/
  ``bmm``/``baddbmm`` (2·M·N·K), convolutions (2·N·C_out·H_out·W_out·C_in/groups·k_h·k_w) and scaled
  dot-product attention (2 batched matmuls); element-wise ops (norms, activations, additions) count 0. One
  multiply-add = 2 FLOPs. This is the usual numerator of MFU: the work tensor cores can do.
* :func:`count_flops` — run a callable once under the counter, return (its result, FLOPs).
* :data:`PEAK_TFLOPS` / :func:`peak_tflops_for` / :func:`device_peak` — dense tensor-core peaks (no 2:4
  sparsity) matched on the CUDA device name; ``--peak-tflops`` in the benchmarks overrides it.
* :func:`achieved_tflops`, :func:`mfu`, :func:`format_mfu` — achieved TFLOP/s = FLOPs / s / 1e12, MFU =
  achieved / peak.
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["PEAK_TFLOPS", "flop_counter", "eager", "count_flops", "peak_tflops_for", "device_peak", "achieved_tflops",
           "mfu", "format_mfu", "median"]

#: Dense (no sparsity) tensor-core peaks in TFLOP/s, from the vendors' datasheets / whitepapers: (words that must
#: all occur in the device name, case-insensitive; peak or None = variant without a verified figure; what the
#: figure is). The first matching row wins, so variants come before their family.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float | None, str]] = [
    (("H100", "NVL"), None, "H100 NVL: no verified dense figure here"),
    (("H200", "NVL"), None, "H200 NVL: no verified dense figure here"),
    (("H100", "PCIE"), 756.0, "H100 PCIe bf16 dense (1513 with sparsity)"),
    (("H100",), 989.0, "H100 SXM bf16 dense (1979 with sparsity)"),
    (("H200",), 989.0, "H200 SXM bf16 dense (1979 with sparsity)"),
    (("A100",), 312.0, "A100 bf16 dense (624 with sparsity)"),
    (("L40S",), 362.0, "L40S bf16 dense (733 with sparsity)"),
    (("L40",), 181.0, "L40 bf16 dense (362 with sparsity)"),
    (("RTX 4090",), 165.0, "RTX 4090 bf16 dense, FP32 accumulate (330 with sparsity)"),
    (("V100S",), None, "V100S: no verified figure here"),
    (("V100", "PCIE"), 112.0, "V100 PCIe fp16 dense (no bf16 tensor cores)"),
    (("V100",), 125.0, "V100 SXM2 fp16 dense (no bf16 tensor cores)"),
]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU flash-attention kernel."""
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = _sdpa_cpu_flop
    return FlopCounterMode(display=False, custom_mapping=extra)


def eager():
    """A context in which modules compiled with ``torch.compile`` run eagerly (``torch.compiler.set_stance(
    "force_eager")``), so the counter sees their aten ops; a no-op on a torch without it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """(``fn(*args, **kwargs)``, the FLOPs it ran), counted by :func:`flop_counter` with compiled modules run
    eagerly (:func:`eager`). Works on meta tensors too (the counter needs shapes only)."""
    with eager(), flop_counter() as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def peak_tflops_for(name: str) -> tuple[float | None, str]:
    """(dense tensor-core peak in TFLOP/s, what it is) for a device name, or (None, why not)."""
    upper = str(name).upper()
    for words, peak, label in PEAK_TFLOPS:
        if all(w.upper() in upper for w in words):
            return peak, label
    return None, f"{name!r} is not in the peak table (benchmarks/flops.py): pass --peak-tflops"


def device_peak(device: torch.device | str, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s for MFU, where it comes from). ``override`` (``--peak-tflops``) wins; on CUDA the table's
    bf16/fp16 peak applies to ``precision="bf16"`` only; CPUs have no table entry (MFU "n/a")."""
    if override is not None:
        return float(override), "--peak-tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak for CPUs: pass --peak-tflops"
    if str(precision) != "bf16":
        return None, f"precision={precision}: the table holds bf16/fp16 tensor-core peaks (pass --peak-tflops)"
    return peak_tflops_for(torch.cuda.get_device_name(device))


def achieved_tflops(flops: float, seconds: float) -> float:
    """FLOPs done in ``seconds`` -> TFLOP/s."""
    return float(flops) / float(seconds) / 1e12 if seconds > 0 else float("nan")


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model-FLOP utilisation in [0, 1]: achieved TFLOP/s / peak TFLOP/s (None without a peak)."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return achieved_tflops(flops, seconds) / float(peak_tflops)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))

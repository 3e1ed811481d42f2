"""Leaf operations of the compose degradation language (``degradation=compose``, :mod:`.compose`).

Each op is a small class registered by name in :data:`OPS`. It reads its YAML keys once (validated,
every error names the key), and then, for a batch, splits its randomness in two:

* **decisions** — python values that change which code runs (a resize's direction/scale/mode):
  drawn by the interpreter from uniforms it transfers to the host once per batch
  (:meth:`Op.decide`), per batch or per sample (``per:`` of the step);
* **values** — per-sample tensors on the device (kernels, sigmas, JPEG qualities, jitter amounts):
  drawn by :meth:`Op.draw` from the explicit generator, no host transfer.

:meth:`Op.apply` then transforms ``x`` (B, 3, H, W) float; noise maps are drawn from the generator
there. Ops that wrap sr_lab's Real-ESRGAN building blocks (``blur``, ``sinc``, ``resize``,
``gaussian_noise``, ``poisson_noise``, ``jpeg``, ``usm``) call exactly the functions
:class:`~sr_lab.degradation.RealESRGANDegradation` calls, so a pipeline written with them reproduces
it bit for bit given the same draws (``conf/degradation/realesrgan_compose.yaml``, tested). The
others are kornia's functional operators (:mod:`.kornia_ops`).

Adding an op: subclass :class:`Op` (or :class:`RangeOp` for "draw a few uniform values per sample and
call a function"), set ``name`` and ``keys``, decorate with :func:`register_op`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .filters import USMSharp
from .jpeg import diff_jpeg
from .kernels import (
    KERNEL_TYPES,
    build_final_sinc_kernels,
    build_mixed_kernels,
    sample_final_sinc_params,
    sample_mixed_kernel_params,
)
from .kornia_ops import filter2d_reflect
from .noise import add_gaussian_noise, add_poisson_noise

__all__ = ["OPS", "Op", "RangeOp", "StepError", "register_op", "SizeContext", "RESIZE_MODES_ALL"]

#: Interpolation modes a ``resize`` step may draw from (``F.interpolate``, no antialias, as BasicSR).
RESIZE_MODES_ALL = ("area", "bilinear", "bicubic", "nearest", "nearest-exact")

OPS: dict[str, type["Op"]] = {}


def register_op(cls: type["Op"]) -> type["Op"]:
    """Class decorator: make ``cls`` available as ``{op: <cls.name>}`` in compose pipelines."""
    OPS[cls.name] = cls
    return cls


class StepError(ValueError):
    """A bad key of one step: ``key`` (relative to the step) and a message; the interpreter adds the path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class SizeContext:
    """Sizes an op needs at run time: the HR size and the LR size it must end at (``scale``)."""

    def __init__(self, hr_hw: tuple[int, int], scale: int):
        self.hr_hw = hr_hw
        self.scale = scale
        self.lr_hw = (hr_hw[0] // scale, hr_hw[1] // scale)


# ------------------------------------------------------------------------------------------------
# key readers (each raises StepError naming the key)
# ------------------------------------------------------------------------------------------------
def read_prob(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise StepError(key, f"a probability must be a number in [0, 1], got {v!r}")
    return float(v)


def read_dist(key: str, v: Any, n: int | None = None) -> tuple[float, ...]:
    if not isinstance(v, Sequence) or isinstance(v, str) or not v:
        raise StepError(key, f"expected a non-empty list of probabilities, got {v!r}")
    ps = tuple(read_prob(key, p) for p in v)
    if n is not None and len(ps) != n:
        raise StepError(key, f"expected {n} probabilities, got {len(ps)}")
    if abs(sum(ps) - 1.0) > 1e-6:
        raise StepError(key, f"probabilities must sum to 1, got {list(ps)} (sum {sum(ps):g})")
    return ps


def read_range(key: str, v: Any, *, lo_min: float | None = None, lo_open: bool = False,
               hi_max: float | None = None, around_one: bool = False) -> tuple[float, float]:
    """A ``[lo, hi]`` pair: not empty, not inverted (lo == hi is a constant), within the op's bounds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, Sequence) or isinstance(v, str) or len(v) == 0:
        raise StepError(key, f"expected a range [lo, hi], got an empty or non-list value {v!r}")
    if len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        raise StepError(key, f"expected a range [lo, hi] of two numbers, got {list(v)!r}")
    lo, hi = float(v[0]), float(v[1])
    if lo > hi:
        raise StepError(key, f"inverted range {list(v)}: need lo <= hi")
    if lo_min is not None and (lo < lo_min or (lo_open and lo == lo_min)):
        raise StepError(key, f"lo must be {'>' if lo_open else '>='} {lo_min:g}, got {list(v)}")
    if hi_max is not None and hi > hi_max:
        raise StepError(key, f"hi must be <= {hi_max:g}, got {list(v)}")
    if around_one and not lo <= 1.0 <= hi:
        raise StepError(key, f"need lo <= 1 <= hi (draws U(lo, 1) or U(1, hi)), got {list(v)}")
    return lo, hi


def read_bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise StepError(key, f"expected true or false, got {v!r}")
    return v


def read_choice(key: str, v: Any, allowed: Sequence[str]) -> str:
    if v not in allowed:
        raise StepError(key, f"must be one of {list(allowed)}, got {v!r}")
    return v


def uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + u * (hi - lo)


# ------------------------------------------------------------------------------------------------
# base classes
# ------------------------------------------------------------------------------------------------
class Op:
    """One leaf step. Subclasses set ``name``, ``keys`` (YAML key -> default) and override what they use.

    ``size_rule``: ``"keep"`` (output size = input size), ``"lr"`` (output is always the LR size) or
    ``"random"`` (depends on a decision); the interpreter uses it to batch per-sample decisions and to
    check that a pipeline ends at the LR size.
    """

    name: ClassVar[str] = ""
    keys: ClassVar[dict[str, Any]] = {}
    n_decisions: ClassVar[int] = 0
    size_rule: str = "keep"
    changes_target: bool = False

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = {k: spec.get(k, d) for k, d in self.keys.items()}

    # decisions (python values; u: n_decisions floats in [0, 1))
    def decide(self, u: Sequence[float]) -> dict[str, Any]:
        return {}

    # per-sample values on the generator's device
    def draw(self, batch: int, generator: torch.Generator) -> dict[str, Any]:
        return {}

    def apply(self, x: Tensor, decision: Mapping[str, Any], values: Mapping[str, Any],
              generator: torch.Generator, ctx: SizeContext) -> Tensor:
        raise NotImplementedError

    # static size checks (validation): smallest side accepted, and a lower bound of the output side
    def min_side(self) -> int:
        return 1

    def out_side_bounds(self, lo: float, hi: float, lr_side: float) -> tuple[float, float]:
        return lo, hi

    def describe(self, decision: Mapping[str, Any], values: Mapping[str, Any], i: int) -> dict[str, Any]:
        """JSON-able summary of what sample ``i`` drew (for manifests and contact sheets)."""
        out = {k: v for k, v in decision.items()}
        for k, v in values.items():
            if isinstance(v, Tensor) and v.ndim >= 1 and v.numel() == v.shape[0]:
                out[k] = round(float(v[i]), 4)
        return out


class RangeOp(Op):
    """Ops with per-sample values drawn uniformly from ``[lo, hi]`` ranges, then ``fn(x, **values)``.

    ``ranges``: key -> (default range, read_range kwargs). Values drawn in one ``torch.rand`` call.
    """

    ranges: ClassVar[dict[str, tuple[tuple[float, float], dict]]] = {}

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__(spec)
        self.range = {k: read_range(k, spec.get(k, d), **kw) for k, (d, kw) in self.ranges.items()}

    def draw(self, batch: int, generator: torch.Generator) -> dict[str, Any]:
        u = torch.rand((len(self.range), batch), generator=generator, device=generator.device)
        return {k: uniform(u[j], lo, hi) for j, (k, (lo, hi)) in enumerate(self.range.items())}

    def fn(self, x: Tensor, **values: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, x, decision, values, generator, ctx):
        return self.fn(x, **values)


# ------------------------------------------------------------------------------------------------
# Real-ESRGAN building blocks (exactly the calls RealESRGANDegradation makes)
# ------------------------------------------------------------------------------------------------
@register_op
class USM(Op):
    """Unsharp-mask sharpening (BasicSR ``USMSharp``, Real-ESRGAN GT sharpening; spec §1.5).

    ``input``: the degradation continues from the sharpened image; ``target``: the returned HR is the
    sharpened image (Real-ESRGAN x4plus: both). Must be the first step.
    """

    name = "usm"
    keys = {"radius": 50, "weight": 0.5, "threshold": 10, "input": True, "target": True}

    def __init__(self, spec):
        super().__init__(spec)
        r = spec.get("radius", 50)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise StepError("radius", f"must be a positive int, got {r!r}")
        self.input = read_bool("input", spec.get("input", True))
        self.target = read_bool("target", spec.get("target", True))
        if not (self.input or self.target):
            raise StepError("input", "usm with input=false and target=false does nothing")
        self.changes_target = self.target
        self.usm = USMSharp(r, float(spec.get("weight", 0.5)), float(spec.get("threshold", 10)))

    def apply(self, x, decision, values, generator, ctx):
        return self.usm(x)


def _kernel_keys(spec: Mapping[str, Any]) -> dict[str, Any]:
    kl = spec.get("kernel_list", list(KERNEL_TYPES))
    if not isinstance(kl, Sequence) or isinstance(kl, str) or not kl or any(k not in KERNEL_TYPES for k in kl):
        raise StepError("kernel_list", f"unknown or empty kernel types {kl!r}; known: {list(KERNEL_TYPES)}")
    default_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) if tuple(kl) == KERNEL_TYPES else [1 / len(kl)] * len(kl)
    return dict(
        kernel_list=tuple(kl),
        kernel_prob=read_dist("kernel_prob", spec.get("kernel_prob", default_prob), len(kl)),
        sinc_prob=read_prob("sinc_prob", spec.get("sinc_prob", 0.1)),
        blur_sigma=read_range("blur_sigma", spec.get("blur_sigma", (0.2, 3.0)), lo_min=0.0, lo_open=True),
        betag_range=read_range("betag_range", spec.get("betag_range", (0.5, 4.0)), lo_min=0.0, lo_open=True,
                               around_one=True),
        betap_range=read_range("betap_range", spec.get("betap_range", (1.0, 2.0)), lo_min=0.0, lo_open=True,
                               around_one=True),
    )


@register_op
class Blur(Op):
    """Real-ESRGAN mixed blur kernel per sample (iso/aniso/generalised/plateau Gaussians or sinc), 21×21.

    Real-ESRGAN (Wang et al. 2021) kernel1/kernel2, spec §1.2 (:func:`.kernels.sample_mixed_kernel_params`);
    applied with ``kornia.filters.filter2d(border_type='reflect')`` where the pad is smaller than the
    image — bit-identical there to BasicSR ``filter2D`` / sr_lab's :func:`.filters.filter2d` (tested) —
    and sr_lab's otherwise (kornia's reflect padding raises; the second-order stage can get that small):
    :func:`.kornia_ops.filter2d_reflect`.
    """

    name = "blur"
    keys = {"kernel_list": None, "kernel_prob": None, "sinc_prob": 0.1, "blur_sigma": (0.2, 3.0),
            "betag_range": (0.5, 4.0), "betap_range": (1.0, 2.0)}

    def __init__(self, spec):
        super().__init__(spec)
        self.kernel_args = _kernel_keys(spec)

    def draw(self, batch, generator):
        params = sample_mixed_kernel_params(batch, generator, **self.kernel_args)
        return {"kernel": build_mixed_kernels(params), "kernel_params": params}

    def apply(self, x, decision, values, generator, ctx):
        return filter2d_reflect(x, values["kernel"])

    def describe(self, decision, values, i):
        p = values["kernel_params"]
        if bool(p["is_sinc"][i]):
            return {"kernel": "sinc", "size": int(p["size"][i]), "omega": round(float(p["omega"][i]), 4)}
        return {"kernel": KERNEL_TYPES[int(p["kind"][i])], "size": int(p["size"][i]),
                "sigma": [round(float(p["sigma_x"][i]), 4), round(float(p["sigma_y"][i]), 4)],
                "theta": round(float(p["theta"][i]), 4), "beta": round(float(p["beta"][i]), 4)}


@register_op
class Sinc(Op):
    """Real-ESRGAN final-stage kernel: a sinc (size U{7..21}, ω_c ~ U(π/3, π)) with prob ``sinc_prob``,
    else a pulse (identity) — always filtered, as the reference does (spec §1.2 ``final_sinc_prob``)."""

    name = "sinc"
    keys = {"sinc_prob": 0.8}

    def __init__(self, spec):
        super().__init__(spec)
        self.sinc_prob = read_prob("sinc_prob", spec.get("sinc_prob", 0.8))

    def draw(self, batch, generator):
        params = sample_final_sinc_params(batch, generator, self.sinc_prob)
        return {"kernel": build_final_sinc_kernels(params), "sinc_params": params}

    def apply(self, x, decision, values, generator, ctx):
        return filter2d_reflect(x, values["kernel"])

    def describe(self, decision, values, i):
        p = values["sinc_params"]
        return {"sinc": bool(p["is_sinc"][i]), "size": int(p["size"][i]), "omega": round(float(p["omega"][i]), 4)}


@register_op
class Resize(Op):
    """Random resize (Real-ESRGAN spec §1.3 steps 2, 6, 8): direction up/down/keep with ``scale_prob``,
    scale ~ U(1, hi) up or U(lo, 1) down from ``scale_range``, mode uniformly from ``modes``
    (``F.interpolate``, no antialias, as BasicSR).

    ``relative_to: input`` scales the current image (``scale_factor=s``; step 2); ``relative_to: lr``
    resizes to ``(int(H/scale·s), int(W/scale·s))`` of the HR size (steps 6 and 8; with the default
    ``scale_prob: [0, 0, 1]`` exactly the LR size). A resize to the current size is skipped.
    """

    name = "resize"
    keys = {"scale_prob": (0.0, 0.0, 1.0), "scale_range": (1.0, 1.0), "modes": ("area", "bilinear", "bicubic"),
            "relative_to": "input"}
    n_decisions = 3

    def __init__(self, spec):
        super().__init__(spec)
        self.scale_prob = read_dist("scale_prob", spec.get("scale_prob", (0.0, 0.0, 1.0)), 3)
        self.scale_range = read_range("scale_range", spec.get("scale_range", (1.0, 1.0)), lo_min=0.0,
                                      lo_open=True, around_one=True)
        modes = spec.get("modes", ("area", "bilinear", "bicubic"))
        if isinstance(modes, str):
            modes = [modes]
        if not isinstance(modes, Sequence) or not modes:
            raise StepError("modes", f"expected a non-empty list of modes from {list(RESIZE_MODES_ALL)}")
        self.modes = tuple(read_choice("modes", m, RESIZE_MODES_ALL) for m in modes)
        self.relative_to = read_choice("relative_to", spec.get("relative_to", "input"), ("input", "lr"))
        fixed = self.scale_prob[2] == 1.0 or self.scale_range == (1.0, 1.0)
        if self.relative_to == "lr":
            self.size_rule = "lr" if fixed else "random"
        else:
            self.size_rule = "keep" if fixed else "random"

    def decide(self, u):
        p, (lo, hi) = self.scale_prob, self.scale_range
        if u[0] < p[0]:
            s = 1.0 + u[1] * (hi - 1.0)
        elif u[0] < p[0] + p[1]:
            s = lo + u[1] * (1.0 - lo)
        else:
            s = 1.0
        mode = self.modes[min(int(u[2] * len(self.modes)), len(self.modes) - 1)]
        return {"scale": s, "mode": mode}

    def apply(self, x, decision, values, generator, ctx):
        s, mode = decision["scale"], decision["mode"]
        if self.relative_to == "input":
            return x if s == 1.0 else F.interpolate(x, scale_factor=s, mode=mode)
        size = (max(1, int(ctx.lr_hw[0] * s)), max(1, int(ctx.lr_hw[1] * s)))
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode=mode)

    def _scales(self) -> tuple[float, float]:
        p, (lo, hi) = self.scale_prob, self.scale_range
        smin = lo if p[1] > 0 else 1.0 if (p[2] > 0 or p[0] > 0) else lo
        smax = hi if p[0] > 0 else 1.0
        return smin, smax

    def out_side_bounds(self, lo, hi, lr_side):
        smin, smax = self._scales()
        if self.relative_to == "input":
            return math.floor(lo * smin), math.floor(hi * smax)
        return max(1, math.floor(lr_side * smin)), max(1, math.floor(lr_side * smax))

    def describe(self, decision, values, i):
        return {"scale": round(decision["scale"], 4), "mode": decision["mode"]}


class _NoiseOp(Op):
    def describe(self, decision, values, i):
        return {k: (round(float(v[i]), 4) if k != "gray" else bool(v[i] > 0.5)) for k, v in values.items()}


@register_op
class GaussianNoise(_NoiseOp):
    """Additive Gaussian noise σ ~ U(``sigma``) in 0–255 units, gray with ``gray_prob`` (Real-ESRGAN, BasicSR
    ``random_add_gaussian_noise_pt``; spec §1.3 step 3); clipped to [0, 1].

    ``gray_shared_across_batch: true`` reproduces the reference's one gray map per batch (spec §1.3).
    """

    name = "gaussian_noise"
    keys = {"sigma": (1.0, 30.0), "gray_prob": 0.4, "gray_shared_across_batch": True}

    def __init__(self, spec):
        super().__init__(spec)
        self.sigma = read_range("sigma", spec.get("sigma", (1.0, 30.0)), lo_min=0.0)
        self.gray_prob = read_prob("gray_prob", spec.get("gray_prob", 0.4))
        self.shared = read_bool("gray_shared_across_batch", spec.get("gray_shared_across_batch", True))

    def draw(self, batch, generator):
        u = torch.rand((2, batch), generator=generator, device=generator.device)
        return {"sigma": uniform(u[0], *self.sigma), "gray": (u[1] < self.gray_prob).float()}

    def apply(self, x, decision, values, generator, ctx):
        return add_gaussian_noise(x, values["sigma"], values["gray"], generator,
                                  gray_shared_across_batch=self.shared)


@register_op
class PoissonNoise(_NoiseOp):
    """Poisson noise scaled by ``scale`` ~ U(range), gray with ``gray_prob`` (Real-ESRGAN, BasicSR
    ``random_add_poisson_noise_pt``; spec §1.3 step 3); clipped to [0, 1]."""

    name = "poisson_noise"
    keys = {"scale": (0.05, 3.0), "gray_prob": 0.4}

    def __init__(self, spec):
        super().__init__(spec)
        self.scale = read_range("scale", spec.get("scale", (0.05, 3.0)), lo_min=0.0)
        self.gray_prob = read_prob("gray_prob", spec.get("gray_prob", 0.4))

    def draw(self, batch, generator):
        u = torch.rand((2, batch), generator=generator, device=generator.device)
        return {"scale": uniform(u[0], *self.scale), "gray": (u[1] < self.gray_prob).float()}

    def apply(self, x, decision, values, generator, ctx):
        return add_poisson_noise(x, values["scale"], values["gray"], generator)


@register_op
class JPEG(RangeOp):
    """JPEG at quality ~ U(``quality``) with sr_lab's DiffJPEG (BasicSR ``DiffJPEG``, Real-ESRGAN; spec §1.6),
    after clamping to [0, 1] as the reference does before every JPEG."""

    name = "jpeg"
    keys = {"quality": (30.0, 95.0)}
    ranges = {"quality": ((30.0, 95.0), dict(lo_min=0.0, lo_open=True, hi_max=100.0))}

    def fn(self, x, quality):
        return diff_jpeg(torch.clamp(x, 0, 1), quality)


@register_op
class Clamp(Op):
    """Clamp to [``min``, ``max``] (default [0, 1])."""

    name = "clamp"
    keys = {"min": 0.0, "max": 1.0}

    def apply(self, x, decision, values, generator, ctx):
        return torch.clamp(x, float(self.spec["min"]), float(self.spec["max"]))


# ------------------------------------------------------------------------------------------------
# kornia-based ops (functions in .kornia_ops)
# ------------------------------------------------------------------------------------------------
def _kornia(name: str) -> Callable[..., Tensor]:
    from . import kornia_ops

    return getattr(kornia_ops, name)


def _odd(v: Tensor) -> Tensor:
    """Round to the nearest odd integer >= 1 (kernel lengths)."""
    return torch.clamp(2 * torch.floor(v / 2) + 1, min=1)


@register_op
class MotionBlur(RangeOp):
    """Linear motion blur: ``length`` px (rounded to odd), ``angle`` in degrees, ``direction`` in [-1, 1]
    (0: symmetric, ±1: the streak trails to one side) — kornia ``get_motion_kernel2d``, reflect border."""

    name = "motion_blur"
    keys = {"length": (3.0, 15.0), "angle": (0.0, 360.0), "direction": (-1.0, 1.0)}
    ranges = {"length": ((3.0, 15.0), dict(lo_min=1.0)), "angle": ((0.0, 360.0), {}),
              "direction": ((-1.0, 1.0), dict(lo_min=-1.0, hi_max=1.0))}

    def draw(self, batch, generator):
        v = super().draw(batch, generator)
        v["length"] = _odd(v["length"])
        return v

    def fn(self, x, length, angle, direction):
        return _kornia("motion_blur")(x, length, angle, direction)

    def min_side(self):
        longest = 2 * math.floor(self.range["length"][1] / 2) + 1  # the longest odd length drawn (_odd)
        return longest // 2 + 1


@register_op
class DiskBlur(RangeOp):
    """Defocus: a uniform (antialiased) disk of ``radius`` px — :func:`.kornia_ops.disk_blur`."""

    name = "disk_blur"
    keys = {"radius": (1.0, 4.0)}
    ranges = {"radius": ((1.0, 4.0), dict(lo_min=0.0))}

    def fn(self, x, radius):
        return _kornia("disk_blur")(x, radius)

    def min_side(self):
        return math.ceil(self.range["radius"][1]) + 1


@register_op
class GaussianBlur(RangeOp):
    """Isotropic Gaussian blur, σ ~ U(``sigma``) px, via kornia ``gaussian_blur2d`` (reflect border)."""

    name = "gaussian_blur"
    keys = {"sigma": (0.5, 2.0)}
    ranges = {"sigma": ((0.5, 2.0), dict(lo_min=0.0, lo_open=True))}

    def fn(self, x, sigma):
        return _kornia("gaussian_blur")(x, sigma)

    def min_side(self):
        return math.ceil(3 * self.range["sigma"][1]) + 1


@register_op
class Brightness(RangeOp):
    """Additive brightness shift ``delta`` (kornia ``adjust_brightness``), clamped to [0, 1]."""

    name = "brightness"
    keys = {"delta": (-0.1, 0.1)}
    ranges = {"delta": ((-0.1, 0.1), dict(lo_min=-1.0, hi_max=1.0))}

    def fn(self, x, delta):
        return _kornia("adjust_brightness")(x.clamp(0, 1), delta)


@register_op
class Contrast(RangeOp):
    """Multiplicative contrast ``factor`` (kornia ``adjust_contrast``), clamped to [0, 1]."""

    name = "contrast"
    keys = {"factor": (0.8, 1.2)}
    ranges = {"factor": ((0.8, 1.2), dict(lo_min=0.0))}

    def fn(self, x, factor):
        return _kornia("adjust_contrast")(x.clamp(0, 1), factor)


@register_op
class Gamma(RangeOp):
    """Gamma ``x ** gamma`` (kornia ``adjust_gamma``), clamped to [0, 1]. Like every colour op here it clamps its
    input to [0, 1] first: a bicubic resize overshoots below 0, and a negative base gives NaN."""

    name = "gamma"
    keys = {"gamma": (0.8, 1.25)}
    ranges = {"gamma": ((0.8, 1.25), dict(lo_min=0.0, lo_open=True))}

    def fn(self, x, gamma):
        return _kornia("adjust_gamma")(x.clamp(0, 1), gamma)


@register_op
class Saturation(RangeOp):
    """Saturation ``factor`` (kornia ``adjust_saturation``: scales HSV saturation; 1: unchanged, 0: every
    channel becomes max(R, G, B), not a luma gray), clamped to [0, 1]."""

    name = "saturation"
    keys = {"factor": (0.7, 1.3)}
    ranges = {"factor": ((0.7, 1.3), dict(lo_min=0.0))}

    def fn(self, x, factor):
        return _kornia("adjust_saturation")(x.clamp(0, 1), factor)


@register_op
class ChromaticAberration(RangeOp):
    """Lateral chromatic aberration: red and blue planes shifted by ``shift`` px (sub-pixel, bilinear) in a
    random direction ``angle`` (degrees), red one way and blue the other; green fixed —
    :func:`.kornia_ops.chromatic_aberration`."""

    name = "chromatic_aberration"
    keys = {"shift": (0.0, 1.5), "angle": (0.0, 360.0)}
    ranges = {"shift": ((0.0, 1.5), dict(lo_min=0.0)), "angle": ((0.0, 360.0), {})}

    def fn(self, x, shift, angle):
        a = torch.deg2rad(angle)
        d = torch.stack([torch.cos(a), torch.sin(a)], dim=1) * shift[:, None]
        return _kornia("chromatic_aberration")(x, d, -d)


@register_op
class JPEGKornia(RangeOp):
    """JPEG at quality ~ U(``quality``) with kornia's differentiable codec (``jpeg_codec_differentiable``),
    an alternative to ``jpeg`` (BasicSR's DiffJPEG); the differences are stated in
    :func:`.kornia_ops.jpeg_kornia`. Input clamped to [0, 1] first."""

    name = "jpeg_kornia"
    keys = {"quality": (30.0, 95.0)}
    ranges = {"quality": ((30.0, 95.0), dict(lo_min=1.0, hi_max=100.0))}

    def fn(self, x, quality):
        return _kornia("jpeg_kornia")(torch.clamp(x, 0, 1), quality)


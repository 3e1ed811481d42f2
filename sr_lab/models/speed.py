"""Speed switches for a built stage: frozen parts in bf16, ``channels_last``, SDPA attention, ``torch.compile``.

Each switch changes how the same computation runs, never what it computes (up to the rounding a test in
``tests/test_speed.py`` bounds for each); the ``speed:`` block of ``conf/train.yaml`` / ``conf/infer.yaml``
holds them, all off by default except SDPA (diffusers' own default), so a default run is unchanged.

API (``benchmarks/inference.py`` and ``benchmarks/train.py`` import these)::

    SpeedConfig(channels_last: bool = False, compile: bool = False, compile_mode: str | None = None,
                frozen_dtype: str | None = "auto", sdpa: bool = True,
                compile_backend: str | Callable = "inductor")
    SpeedConfig.from_config(node: SpeedConfig | Mapping | DictConfig | None) -> SpeedConfig  # ValueError: one line
    apply_speed(stage: nn.Module, config: SpeedConfig | Mapping | None = None, *, precision: str = "32",
                compile: bool | None = None, sharded: bool = False) -> SpeedReport
    compile_stage(stage: nn.Module, config: SpeedConfig | Mapping | None = None) -> list[str]
    sdpa_backend_report(device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        batch: int = 2, heads: int = 8, q_len: int = 4096, kv_len: int | None = None,
                        head_dim: int = 64, attn_mask: bool = False) -> dict   # ["summary"]: one printable line

``stage`` is anything holding a backbone: a stage module (``stage.backbone``, its runners
:class:`~sr_lab.models.runner.ControlledUNet` anywhere below it, e.g. ``stage.adapter``, an AddSR teacher's)
or a :class:`~sr_lab.models.backbone.Backbone` itself. ``precision`` is the run's: ``trainer.precision``
(``32``, ``bf16-mixed``, ``bf16-true``, …) or the inference ``precision`` (``32`` / ``bf16``). ``sharded``:
the stage will be wrapped by FSDP. :class:`SpeedReport` says what changed (``summary()`` is one log line,
``as_dict()`` for run records).

The switches:

* ``frozen_dtype`` (``auto`` | ``fp32`` | ``bf16`` | ``null``): the dtype the frozen backbone (UNet, VAE, text
  encoder) is stored in. ``auto`` = bf16 when the run's precision is bf16 (``bf16-mixed``/``bf16-true``,
  inference ``bf16``), else unchanged; ``null`` = as built (``backbone.dtype``); ``fp32`` casts to float32;
  ``bf16`` needs a bf16 precision (the frozen parts then run under bf16 autocast). Under FSDP (``sharded``)
  ``auto`` keeps float32 (a flat parameter needs one dtype). Trainable parameters are never cast (fp32
  master weights; Lightning's ``bf16-mixed`` autocasts their compute). **Where float32 is kept** even then:

  - the ends of the VAE — ``encoder.conv_norm_out``, ``encoder.conv_out``, ``quant_conv`` (the posterior's
    mean / log-variance, so the HR training latents and the LR condition latents are not rounded to bf16),
    ``decoder.conv_norm_out``, ``decoder.conv_out`` (the final pixels before the clamp: bf16 would round
    them to ~1/256, one 8-bit level) — and the UNet's ``conv_norm_out`` / ``conv_out`` (ε̂ is divided by
    √ᾱ_t ≈ 0.07 at t = T−1 in x̂0, which would amplify a bf16 rounding of ε̂ ~15×). These run in float32
    outside autocast (their class becomes :class:`FP32Conv2d` / :class:`FP32GroupNorm`: same parameters,
    same state-dict keys; input upcast);
  - the latent scaling (``Backbone.encode``: ``z.float() * scale``; ``Backbone.decode``: ``latent.float() /
    scale`` before the cast) and the image -> [-1, 1] mapping;
  - parts a stage declares in ``speed_fp32_modules`` (paths below the stage): the decoder-GAN stages
    (StableSR CFW, CCSR stage 2) keep ``backbone.vae.decoder`` and ``backbone.vae.post_quant_conv`` in
    float32, since their trained layers sit in (CFW) or replace (CCSR) the VAE decoder and are trained
    against its output;
  - the sampler arithmetic (ᾱ in float64, step coefficients as Python floats, x̂0 and the step rules on the
    float32 ε̂ of ``stage.denoise``), the noise schedule buffer (``alphas_cumprod``, float64, never cast);
  - the degradation of the data module (outside autocast, float32 input; ``sr_lab/data/datamodule.py``).

* ``channels_last``: UNet, VAE and every control branch's per-step networks (ControlNets, the SFT encoder)
  in ``torch.channels_last``; a forward pre-hook converts their 4-D inputs too, so every convolution sees
  one layout.
* ``sdpa``: every diffusers ``Attention`` below the stage (UNet, ControlNets, VAE, StableSR's encoder) uses
  ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``); ``false`` switches them to the classic
  ``AttnProcessor`` (explicit softmax; a reference, and the ablation). Custom processors are left alone.
  sr_lab's own attention (ClearSR's :class:`~sr_lab.models.window_attention.WindowCrossAttention`) always
  calls ``F.scaled_dot_product_attention``. No xformers. :func:`sdpa_backend_report` says which SDPA kernel
  a shape would run on the device (flash / memory-efficient / cuDNN / math).
* ``compile`` (+ ``compile_mode``, ``compile_backend``): ``nn.Module.compile`` (in place: the state-dict keys
  stay) of the UNet and every branch's per-step networks (``ControlBranch.step_modules``) with
  ``dynamic=False``. Shapes are static across sampler steps (timesteps are ``(B,)`` int64 tensors built once
  per sampling call; the batch never changes inside the loop) and across aggregation tiles (the last tile
  batch is padded to the full one, :class:`~sr_lab.inference.tiling.TiledModel` ``static_batch``), so one
  sampling call compiles once per model (a new latent/tile size or seed-batch size compiles again, up to
  ``torch._dynamo.config.cache_size_limit``). Branch hooks registered per call (SFT, LoRA, DPM window
  attention) are traced into the graph without recompiling. Training compiles after Lightning has moved
  (and for DDP/FSDP wrapped) the model: :class:`sr_lab.callbacks.CompileStage` at ``on_fit_start``.
  ``compile_backend``: ``inductor`` (default, the fast one), ``aot_eager`` / ``eager`` (debugging, quick CPU
  checks; ``aot_eager`` + ``channels_last`` fails in the backward pass with torch 2.x — a stride assumption
  in the AOT graph of diffusers' Transformer2D — so the config check refuses it for training).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["SpeedConfig", "SpeedReport", "apply_speed", "compile_stage", "sdpa_backend_report",
           "resolve_frozen_dtype", "speed_config_problem", "FP32Conv2d", "FP32GroupNorm",
           "FROZEN_DTYPES", "COMPILE_MODES", "COMPILE_BACKENDS"]

FROZEN_DTYPES = ("auto", "fp32", "bf16")
_FROZEN_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
_BOOLS = ("channels_last", "compile", "sdpa")

# float32 islands of a low-precision frozen backbone (paths below the backbone; module doc)
FP32_ISLANDS = ("vae.encoder.conv_norm_out", "vae.encoder.conv_out", "vae.quant_conv",
                "vae.decoder.conv_norm_out", "vae.decoder.conv_out", "unet.conv_norm_out", "unet.conv_out")


# -- config ----------------------------------------------------------------------------------------
def _is_bf16(precision: Any) -> bool:
    return str(precision).lower().startswith(("bf16", "bfloat16"))


def speed_config_problem(values: Mapping[str, Any], precision: Any = "32", sharded: bool = False,
                         precision_key: str = "trainer.precision", prefix: str = "speed",
                         training: bool = False) -> str | None:
    """One line naming the first invalid ``speed.*`` value (``None`` if all are valid); ``training``: the
    switches will run a backward pass."""
    names = {f.name for f in dataclasses.fields(SpeedConfig)}
    for key in values:
        if key not in names:
            return f"{prefix}.{key} is not a speed switch (one of {', '.join(sorted(names))})"
    for key in _BOOLS:
        if key in values and not isinstance(values[key], bool):
            return f"{prefix}.{key}={values[key]} must be true or false"
    mode = values.get("compile_mode")
    if mode is not None and mode not in COMPILE_MODES:
        return f"{prefix}.compile_mode={mode} must be null or one of {', '.join(COMPILE_MODES)}"
    backend = values.get("compile_backend", "inductor")
    if not callable(backend) and backend not in COMPILE_BACKENDS:
        return f"{prefix}.compile_backend={backend} must be one of {', '.join(COMPILE_BACKENDS)}"
    if mode is not None and backend != "inductor":
        return f"{prefix}.compile_mode={mode} applies to compile_backend=inductor only (got {backend})"
    if training and backend == "aot_eager" and values.get("compile") and values.get("channels_last"):
        # torch 2.x: the AOT backward of diffusers' Transformer2D views a channels_last gradient as contiguous
        return (f"{prefix}.compile_backend=aot_eager with {prefix}.channels_last=true fails in the backward pass "
                f"(a PyTorch AOT-autograd stride issue); train with compile_backend=inductor or eager")
    fd = values.get("frozen_dtype", "auto")
    if fd is not None and str(fd).lower() not in _FROZEN_ALIASES:
        return f"{prefix}.frozen_dtype={fd} must be one of {', '.join(FROZEN_DTYPES)} or null"
    fd = None if fd is None else _FROZEN_ALIASES[str(fd).lower()]
    if fd == "bf16" and not _is_bf16(precision):
        return (f"{prefix}.frozen_dtype=bf16 needs a bf16 precision ({precision_key}={precision}): the frozen "
                f"parts run under bf16 autocast; use frozen_dtype=auto")
    if fd == "bf16" and sharded:
        return f"{prefix}.frozen_dtype=bf16 cannot be used with FSDP (a flat parameter holds one dtype); use auto"
    return None


@dataclass
class SpeedConfig:
    """The ``speed:`` block (module doc). ``compile_backend`` may also be a callable (a custom dynamo backend:
    tests count compilations with one)."""

    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    frozen_dtype: str | None = "auto"
    sdpa: bool = True
    compile_backend: str | Callable = "inductor"

    def __post_init__(self):
        # the precision-dependent checks run where the precision is known (config validation, apply_speed)
        problem = speed_config_problem({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                                       precision="bf16")
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_config(cls, node: Any) -> "SpeedConfig":
        """``None`` (defaults), a :class:`SpeedConfig`, a mapping or an OmegaConf node of the keys."""
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        if not isinstance(node, Mapping):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(node, DictConfig):
                raise ValueError(f"speed must be a mapping of switches, got {type(node).__name__}")
            node = OmegaConf.to_container(node, resolve=True)
        node = dict(node)
        problem = speed_config_problem(node, precision="bf16")
        if problem:
            raise ValueError(problem)
        return cls(**node)


def resolve_frozen_dtype(frozen_dtype: str | None, precision: Any = "32",
                         sharded: bool = False) -> torch.dtype | None:
    """The dtype the frozen backbone is cast to (``None``: left as built). See the module doc."""
    if frozen_dtype is None:
        return None
    fd = _FROZEN_ALIASES[str(frozen_dtype).lower()]
    if fd == "fp32":
        return torch.float32
    if fd == "bf16":
        problem = speed_config_problem({"frozen_dtype": fd}, precision, sharded)
        if problem:
            raise ValueError(problem)
        return torch.bfloat16
    return torch.bfloat16 if _is_bf16(precision) and not sharded else None


@dataclass
class SpeedReport:
    """What :func:`apply_speed` changed."""

    frozen_dtype: str | None = None                           # dtype the frozen backbone was cast to
    cast: list[str] = field(default_factory=list)             # parts cast ("backbone.unet: 2.9M params")
    fp32_kept: list[str] = field(default_factory=list)        # float32 islands and declared float32 parts
    channels_last: list[str] = field(default_factory=list)    # modules converted
    attention: dict[str, int] = field(default_factory=dict)   # processor class -> count (diffusers Attention)
    compiled: list[str] = field(default_factory=list)         # modules compiled
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        att = ", ".join(f"{k} x{v}" for k, v in sorted(self.attention.items())) or "none"
        parts = [f"frozen dtype {self.frozen_dtype or 'as built'}"
                 + (f" (fp32 kept: {len(self.fp32_kept)} modules)" if self.fp32_kept else ""),
                 f"channels_last {len(self.channels_last)} modules" if self.channels_last else "channels_last off",
                 f"attention {att}",
                 f"compiled {', '.join(self.compiled)}" if self.compiled else "not compiled"]
        return "; ".join(parts + self.notes)


# -- float32 islands ---------------------------------------------------------------------------------
class _FP32Island:
    """Mixin: ``forward`` outside autocast in its parameters' dtype — float32, as :func:`apply_speed` keeps them
    (a later cast of the whole model, e.g. Lightning's ``bf16-true``, takes the island along) — with the input
    cast to it, whatever the caller's dtype."""

    def forward(self, x, *args, **kwargs):
        p = next(self.parameters(), None)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(p.dtype if p is not None else torch.float32), *args, **kwargs)


class FP32Conv2d(_FP32Island, nn.Conv2d):
    """``nn.Conv2d`` kept in float32 in a low-precision model (same parameters and state-dict keys)."""


class FP32GroupNorm(_FP32Island, nn.GroupNorm):
    """``nn.GroupNorm`` kept in float32 in a low-precision model (same parameters and state-dict keys)."""


_ISLAND_CLASSES = {nn.Conv2d: FP32Conv2d, nn.GroupNorm: FP32GroupNorm}


def _make_island(module: nn.Module) -> bool:
    """Keep ``module`` in float32 with a float32 forward (its class becomes the float32 twin); False when its
    class has none (a diffusers version with other layer classes: it is then cast with the rest)."""
    cls = module.__class__ if isinstance(module, _FP32Island) else _ISLAND_CLASSES.get(type(module))
    if cls is None:
        return False
    module.float()
    module.__class__ = cls
    return True


# -- finding the parts --------------------------------------------------------------------------------
def _backbone(stage: nn.Module) -> nn.Module:
    bb = getattr(stage, "backbone", None)
    if bb is None and hasattr(stage, "unet") and hasattr(stage, "vae"):
        bb = stage
    if bb is None:
        raise TypeError(f"apply_speed: {type(stage).__name__} has no backbone (stage.backbone)")
    return bb


def _prefix_of(stage: nn.Module, module: nn.Module) -> str:
    for name, m in stage.named_modules():
        if m is module:
            return name
    return ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _step_modules(stage: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every per-step network of every runner's branches below ``stage``."""
    from sr_lab.models.runner import ControlledUNet

    seen: set[int] = set()
    for path, runner in stage.named_modules():
        if not isinstance(runner, ControlledUNet):
            continue
        for bname, branch in runner.branches.items():
            step = getattr(branch, "step_modules", None)
            for sub, m in (step() if callable(step) else {}).items():
                if id(m) not in seen:
                    seen.add(id(m))
                    yield _join(path, "branches", bname, sub), m


def _unet_vae(stage: nn.Module) -> list[tuple[str, nn.Module]]:
    bb = _backbone(stage)
    pre = _prefix_of(stage, bb)
    return [(_join(pre, "unet"), bb.unet), (_join(pre, "vae"), bb.vae)]


# -- the switches -------------------------------------------------------------------------------------
def _cast_frozen(stage: nn.Module, dtype: torch.dtype, report: SpeedReport) -> None:
    bb = _backbone(stage)
    pre = _prefix_of(stage, bb)
    kept: set[int] = set()
    for path in getattr(stage, "speed_fp32_modules", ()) or ():
        try:
            m = stage.get_submodule(path)
        except AttributeError:
            report.notes.append(f"{path} (declared float32) not found")
            continue
        if m is None:
            continue
        kept.update(id(s) for s in m.modules())
        m.float()
        report.fp32_kept.append(path)
    low = dtype != torch.float32
    islands: set[int] = set()
    if low:
        for path in FP32_ISLANDS:
            try:
                m = bb.get_submodule(path)
            except AttributeError:
                continue
            if m is None or id(m) in kept:
                continue
            if _make_island(m):
                islands.update(id(s) for s in m.modules())
                report.fp32_kept.append(_join(pre, path))
    for name in ("unet", "vae", "prompt_encoder"):
        part = getattr(bb, name, None)
        if part is None:
            continue
        n = 0
        for m in part.modules():
            if id(m) in kept or id(m) in islands:
                continue
            for p in m.parameters(recurse=False):
                if p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                    continue  # trainable weights stay float32 masters
                p.data = p.data.to(dtype)
                n += p.numel()
            for k, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    m._buffers[k] = b.to(dtype)
        if n:
            report.cast.append(f"{_join(pre, name)}: {n / 1e6:.1f}M params")
    if hasattr(bb, "_prompt_cache"):
        bb._prompt_cache.clear()  # embeddings of the old dtype
    report.frozen_dtype = str(dtype).replace("torch.", "")


def _to_channels_last(value):
    if torch.is_tensor(value) and value.ndim == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_channels_last(v) for v in value)
    return value


def _channels_last_inputs(module, args, kwargs):
    """Forward pre-hook: 4-D floating inputs (and lists of them, e.g. ControlNet residuals) to channels_last."""
    return tuple(_to_channels_last(a) for a in args), {k: _to_channels_last(v) for k, v in kwargs.items()}


def _channels_last(stage: nn.Module, report: SpeedReport) -> None:
    targets = _unet_vae(stage) + list(_step_modules(stage))
    for path, m in targets:
        m.to(memory_format=torch.channels_last)
        hooked = [m]
        if hasattr(m, "encoder") and hasattr(m, "decoder"):  # the VAE: encode/decode are not its forward
            hooked = [m.encoder, m.decoder]
        for h in hooked:
            if not getattr(h, "_sr_lab_channels_last", False):
                h.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
                h._sr_lab_channels_last = True
        report.channels_last.append(path)


def _attention(stage: nn.Module, sdpa: bool, report: SpeedReport) -> None:
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    counts: dict[str, int] = {}
    for m in stage.modules():
        if not isinstance(m, Attention):
            continue
        proc = m.processor
        if sdpa and type(proc) is AttnProcessor:
            m.set_processor(AttnProcessor2_0())
        elif not sdpa and type(proc) is AttnProcessor2_0:
            m.set_processor(AttnProcessor())
        name = type(m.processor).__name__
        counts[name] = counts.get(name, 0) + 1
    report.attention = counts
    text = getattr(getattr(getattr(stage, "backbone", stage), "prompt_encoder", None), "text_model", None)
    impl = getattr(getattr(text, "config", None), "_attn_implementation", None)
    if impl:  # a transformers text tower: its own switch ("sdpa" by default), run once per prompt
        report.notes.append(f"text encoder attention {impl}")


def compile_stage(stage: nn.Module, config: SpeedConfig | Mapping | None = None) -> list[str]:
    """``nn.Module.compile`` (in place, ``dynamic=False``) of the UNet and every branch's per-step networks;
    returns their paths. Modules compiled before are skipped. Call it after device placement."""
    cfg = SpeedConfig.from_config(config)
    kwargs: dict[str, Any] = {"backend": cfg.compile_backend, "dynamic": False}
    if cfg.compile_mode is not None:
        kwargs["mode"] = cfg.compile_mode
    done = []
    for path, m in [_unet_vae(stage)[0], *_step_modules(stage)]:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(**kwargs)
            done.append(path)
    return done


def apply_speed(stage: nn.Module, config: SpeedConfig | Mapping | None = None, *, precision: str = "32",
                compile: bool | None = None, sharded: bool = False) -> SpeedReport:
    """Apply the speed switches to a built stage (module doc) in place; returns what changed.

    ``compile``: ``None`` follows ``config.compile``; training passes ``False`` here and compiles after device
    placement (:class:`sr_lab.callbacks.CompileStage`). The stage is changed for good (a bf16 cast is not
    undone by a later ``fp32``): compare configurations on fresh stages (``copy.deepcopy`` of one is enough)."""
    cfg = SpeedConfig.from_config(config)
    report = SpeedReport()
    dtype = resolve_frozen_dtype(cfg.frozen_dtype, precision, sharded)
    if cfg.frozen_dtype == "auto" and sharded and _is_bf16(precision):
        report.notes.append("frozen_dtype=auto keeps float32 under FSDP")
    if dtype is not None:
        _cast_frozen(stage, dtype, report)
    if cfg.channels_last:
        _channels_last(stage, report)
    _attention(stage, cfg.sdpa, report)
    if cfg.compile if compile is None else compile:
        report.compiled = compile_stage(stage, cfg)
    return report


# -- SDPA kernel report ---------------------------------------------------------------------------------
_SDPA_FLAGS = {"flash": "flash_sdp_enabled", "mem_efficient": "mem_efficient_sdp_enabled",
               "math": "math_sdp_enabled", "cudnn": "cudnn_sdp_enabled"}


def sdpa_backend_report(device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                        batch: int = 2, heads: int = 8, q_len: int = 4096, kv_len: int | None = None,
                        head_dim: int = 64, attn_mask: bool = False) -> dict:
    """Which ``F.scaled_dot_product_attention`` kernel a (batch, heads, q_len, head_dim) x kv_len call would
    run on ``device`` (default: CUDA when available; SD 2.1's first UNet level at 512 px is 4096 tokens of
    head dim 64; ``attn_mask``: a float additive mask, as ClearSR's window attention passes).

    Returns ``{"device", "dtype", "shape", "enabled": {flash, mem_efficient, math, cudnn} (the global CUDA
    switches of ``torch.backends.cuda``), "priority": [...], "usable": {...} (CUDA: ``can_use_*`` for these
    tensors), "selected": "FLASH_ATTENTION" | "EFFICIENT_ATTENTION" | "CUDNN_ATTENTION" | "MATH" | ...,
    "summary": one line}``. Nothing is computed but the kernel choice (a few small tensors are allocated)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kv_len = q_len if kv_len is None else int(kv_len)
    q = torch.zeros(batch, heads, q_len, head_dim, device=dev, dtype=dtype)
    k = torch.zeros(batch, heads, kv_len, head_dim, device=dev, dtype=dtype)
    mask = torch.zeros(heads, q_len, kv_len, device=dev, dtype=dtype) if attn_mask else None
    bc = torch.backends.cuda
    enabled = {name: bool(getattr(bc, fn)()) for name, fn in _SDPA_FLAGS.items() if hasattr(bc, fn)}
    out: dict[str, Any] = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
                           "shape": f"q {batch}x{heads}x{q_len}x{head_dim}, kv {kv_len}"
                                    + (", float mask" if attn_mask else ""),
                           "enabled": enabled}
    try:
        from torch.nn.attention import SDPBackend

        names = {int(v): k for k, v in SDPBackend.__members__.items()}
    except Exception:  # noqa: BLE001 - older torch
        names = {}
    try:
        out["priority"] = [names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]
    except Exception:  # noqa: BLE001 - private API
        out["priority"] = []
    if dev.type == "cuda":
        usable = {}
        try:
            params = bc.SDPAParams(q, k, k, mask, 0.0, False, False)
            for name, fn in (("flash", "can_use_flash_attention"), ("mem_efficient", "can_use_efficient_attention"),
                             ("cudnn", "can_use_cudnn_attention")):
                if hasattr(bc, fn):
                    usable[name] = bool(getattr(bc, fn)(params, False))
        except Exception as exc:  # noqa: BLE001 - SDPAParams' signature changes between releases
            usable["error"] = f"{type(exc).__name__}: {exc}"[:120]
        out["usable"] = usable
    try:
        choice = int(torch._fused_sdp_choice(q, k, k, mask, 0.0, False))
        out["selected"] = names.get(choice, str(choice))
    except Exception as exc:  # noqa: BLE001 - private API
        out["selected"] = f"unknown ({type(exc).__name__})"
    if dev.type == "cpu" and out["selected"] == "FLASH_ATTENTION":
        out["selected"] = "FLASH_ATTENTION (CPU kernel)"
    on = ", ".join(k for k, v in enabled.items() if v) or "none"
    extra = ""
    if "usable" in out:
        extra = "; usable: " + (", ".join(k for k, v in out["usable"].items() if v is True) or "none")
    out["summary"] = (f"sdpa on {out['device']} {out['dtype']} ({out['shape']}): {out['selected']} "
                      f"[enabled: {on}{extra}]")
    return out

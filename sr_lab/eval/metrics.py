"""The evaluation metrics of the diffusion-SR papers, built through pyiqa, with graceful degradation.

Spec ``degradation_and_metrics.md`` §4 (what the authors call, pyiqa names and pitfalls) and
``methods.md`` "Evaluation protocol":

==========  ==================================================  ======  =========
sr_lab      pyiqa metric                                        better  kind
==========  ==================================================  ======  =========
psnr        ``psnr`` with ``test_y_channel=True, color_space='ycbcr'``  ↑   reference
ssim        ``ssim`` with ``test_y_channel=True, color_space='ycbcr'``  ↑   reference
lpips       ``lpips`` (AlexNet, v0.1)                            ↓      reference
dists       ``dists``                                            ↓      reference
fid         ``fid`` GT folder vs SR folder (clean mode)          ↓      set
niqe        ``niqe``                                             ↓      no-reference
musiq       ``musiq`` (KonIQ-10k)                                ↑      no-reference
maniqa      ``maniqa-pipal`` (SeeSR's PIPAL checkpoint; ``metrics.maniqa_checkpoint=koniq`` -> ``maniqa``)  ↑  no-reference
clipiqa     ``clipiqa`` (CLIP RN50, pyiqa's 5 antonym prompt pairs)  ↑  no-reference
==========  ==================================================  ======  =========

PSNR/SSIM pitfalls (§4.2): pyiqa's *default* ``psnr`` is RGB and its Y conversion defaults to YIQ;
sr_lab always passes ``color_space='ycbcr'`` (BT.601 studio swing, = BasicSR). pyiqa's PSNR adds
1e-8 to the MSE (on the [0, 1] scale) and otherwise equals BasicSR's Y-PSNR. pyiqa's SSIM rounds Y
to integers (straight-through round after scaling to 255) and applies a ReLU to the
contrast-structure map, so it differs slightly from BasicSR's SSIM (no rounding, no ReLU) — both
are computed (sr_lab's own BasicSR-formula implementation is :mod:`sr_lab.metrics.psnr_ssim`), one
is reported (``metrics.psnr_ssim_impl``), and the difference is recorded.

A metric that cannot be built (pyiqa missing, a weight file missing, openai-clip's
``pkg_resources`` import failing) is reported *unavailable* with one message; the others run.
Metric networks live only in memory: they are never part of a checkpoint.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sr_lab.metrics.psnr_ssim import psnr_y, ssim_y

from . import weights as W

log = logging.getLogger(__name__)

__all__ = ["MetricSpec", "METRICS", "Metric", "build_metrics", "pyiqa_status"]


@dataclass(frozen=True)
class MetricSpec:
    """Static description of one evaluation metric."""

    name: str
    pyiqa_name: str
    lower_better: bool
    kind: str  # "fr" (per image, needs HR) | "nr" (per image) | "set" (folder level, needs HR)
    label: str
    decimals: int
    options: tuple = ()

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"


_YCBCR = (("test_y_channel", True), ("color_space", "ycbcr"))

#: all metrics sr_lab knows, in the papers' row order
METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("psnr", "psnr", False, "fr", "PSNR", 2, _YCBCR),
    MetricSpec("ssim", "ssim", False, "fr", "SSIM", 4, _YCBCR),
    MetricSpec("lpips", "lpips", True, "fr", "LPIPS", 4),
    MetricSpec("dists", "dists", True, "fr", "DISTS", 4),
    MetricSpec("fid", "fid", True, "set", "FID", 2),
    MetricSpec("niqe", "niqe", True, "nr", "NIQE", 2),
    MetricSpec("musiq", "musiq", False, "nr", "MUSIQ", 2),
    MetricSpec("maniqa", "maniqa-pipal", False, "nr", "MANIQA", 4),
    MetricSpec("clipiqa", "clipiqa", False, "nr", "CLIPIQA", 4),
)}

MANIQA_CHECKPOINTS = {"pipal": "maniqa-pipal", "koniq": "maniqa"}


@dataclass
class Metric:
    """A built metric: ``fn(sr, hr)`` -> per-image scores (B,) for fr/nr, or ``fn(hr_dir, sr_dir)`` -> float for set."""

    spec: MetricSpec
    fn: Callable
    source: str
    impl: str = "pyiqa"  # "pyiqa" | "sr_lab"
    extra: dict = field(default_factory=dict)


def pyiqa_status() -> str | None:
    """None if pyiqa imports, else the reason (one line)."""
    try:
        import pyiqa  # noqa: F401
    except Exception as exc:  # ImportError, or a broken dependency
        return (f"pyiqa is not importable ({type(exc).__name__}: {exc}); install the metrics extra: "
                f"pip install -e .[metrics]")
    return None


def _clip_status() -> str | None:
    """None if openai-clip (used by pyiqa's CLIP-IQA) imports; it needs setuptools' pkg_resources."""
    try:
        import pyiqa.archs.clip_imports  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "pkg_resources":
            return ("metric clipiqa unavailable: openai-clip imports pkg_resources, which this environment "
                    "lacks (setuptools >= 81 removed it); pip install 'setuptools<81'")
        return f"metric clipiqa unavailable: cannot import openai-clip ({exc})"
    except Exception as exc:
        return f"metric clipiqa unavailable: cannot import openai-clip ({type(exc).__name__}: {exc})"
    return None


def _per_image(out) -> torch.Tensor:
    return torch.as_tensor(out).detach().reshape(-1).double().cpu()


def _pyiqa_metric(spec: MetricSpec, pyiqa_name: str, device: torch.device, weights_dir, **opts) -> Metric:
    import pyiqa

    hub = W.stage_files(pyiqa_name, weights_dir)
    with W.offline_loading(hub, vit_pretrained=not pyiqa_name.startswith("maniqa")):
        net = pyiqa.create_metric(pyiqa_name, device=device, **dict(spec.options), **opts)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)

    dtype = torch.float64 if spec.name in ("psnr", "ssim") else torch.float32  # networks run in float32
    if spec.kind == "set":
        def fn(hr_dir: str, sr_dir: str, **kw) -> float:
            with torch.no_grad():
                return float(net(hr_dir, sr_dir, **kw))
    elif spec.kind == "fr":
        def fn(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return _per_image(net(sr.to(device, dtype), hr.to(device, dtype)))
    else:
        def fn(sr: torch.Tensor, hr: torch.Tensor | None = None) -> torch.Tensor:
            with torch.no_grad():
                return _per_image(net(sr.to(device, dtype)))
    opt_txt = ", ".join(f"{k}={v!r}" for k, v in (*spec.options, *opts.items()))
    return Metric(spec, fn, f"pyiqa {pyiqa_name}" + (f" ({opt_txt})" if opt_txt else ""), "pyiqa", {"net": net})


def _srlab_metric(spec: MetricSpec) -> Metric:
    """BasicSR-formula PSNR/SSIM on Y (sr_lab.metrics.psnr_ssim); the crop is applied by the caller."""
    f = psnr_y if spec.name == "psnr" else ssim_y
    return Metric(spec, lambda sr, hr: f(sr, hr, 0).cpu(), f"sr_lab {f.__name__} (BasicSR formulas, Y of YCbCr)", "sr_lab")


def build_metrics(names: list[str], *, device: torch.device, weights_dir=None, maniqa_checkpoint: str = "pipal",
                  psnr_ssim_impl: str = "pyiqa") -> tuple[dict[str, Metric], dict[str, Metric], dict[str, str]]:
    """Build the requested metrics.

    Returns ``(metrics, crosscheck, unavailable)``: the metrics that will be reported, the
    PSNR/SSIM implementation used as a cross-check (the other of pyiqa / sr_lab, when both exist),
    and ``{name: message}`` for metrics that could not be built (each message logged once).
    """
    metrics: dict[str, Metric] = {}
    cross: dict[str, Metric] = {}
    unavailable: dict[str, str] = {}
    no_pyiqa = pyiqa_status()
    for name in names:
        spec = METRICS[name]
        pyiqa_name = MANIQA_CHECKPOINTS[maniqa_checkpoint] if name == "maniqa" else spec.pyiqa_name
        if name in ("psnr", "ssim"):
            own = _srlab_metric(spec)
            other = None if no_pyiqa else _pyiqa_metric(spec, pyiqa_name, device, None)
            if psnr_ssim_impl == "pyiqa" and other is not None:
                metrics[name], cross[name] = other, own
            else:
                if psnr_ssim_impl == "pyiqa":
                    log.warning("%s: pyiqa unavailable, reporting sr_lab's BasicSR-formula value (%s)", name, no_pyiqa)
                metrics[name] = own
                if other is not None:
                    cross[name] = other
            continue
        if no_pyiqa:
            unavailable[name] = f"metric {name} unavailable: {no_pyiqa}"
        elif name == "clipiqa" and _clip_status():
            unavailable[name] = _clip_status()
        elif missing := W.missing_files(pyiqa_name, weights_dir):
            unavailable[name] = W.missing_message(name, missing, weights_dir)
        else:
            try:
                metrics[name] = _pyiqa_metric(spec, pyiqa_name, device, weights_dir)
            except Exception as exc:  # a corrupt/incompatible file must not stop the other metrics
                unavailable[name] = f"metric {name} unavailable: building pyiqa {pyiqa_name} failed: {type(exc).__name__}: {exc}"
        if name in unavailable:
            log.warning("%s", unavailable[name])
    return metrics, cross, unavailable

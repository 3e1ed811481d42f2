"""Real-ESRGAN second-order degradation, batched on the GPU (or CPU) with explicit randomness.

Real-ESRGAN (Wang et al. 2021) "high-order" degradation model as implemented in BasicSR
(``RealESRGANDataset`` for the kernels, ``RealESRGANModel.feed_data`` for the rest) and reused by
StableSR and CCSR; spec §1.2-1.4 (parameters), §1.3 steps 0-9 (order).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .filters import USMSharp, filter2d
from .jpeg import diff_jpeg
from .kernels import KERNEL_TYPES, build_final_sinc_kernels, build_mixed_kernels, sample_final_sinc_params, sample_mixed_kernel_params
from .noise import add_gaussian_noise, add_poisson_noise

__all__ = ["RealESRGANDegradation", "DegradationParams", "StageChoice", "RESIZE_MODES", "finalize_lr", "undegraded_lr"]

#: Interpolation modes drawn uniformly for every resize (BasicSR ``random.choice``; spec §1.3).
RESIZE_MODES = ("area", "bilinear", "bicubic")
_N_CHOICE_DRAWS = 12


@dataclass(frozen=True)
class StageChoice:
    """Decisions that Real-ESRGAN/BasicSR draws once per batch (spec §1.4); one per sample if ``per_sample``."""

    no_degradation: bool
    resize1: float
    mode1: str
    gaussian1: bool
    second_blur: bool
    resize2: float
    mode2: str
    gaussian2: bool
    resize_first: bool  # final stage order (a): resize + sinc, then JPEG; else (b) JPEG first
    mode_final: str


@dataclass(frozen=True)
class DegradationParams:
    """Everything random about one call of :class:`RealESRGANDegradation` except the noise maps (spec §1.2-1.4).

    Per-sample (B,) tensors / (B, 21, 21) kernels, plus ``choices``: one :class:`StageChoice` shared
    by the batch (reference behaviour) or one per sample (``per_sample=True``).
    """

    kernel1: Tensor
    kernel2: Tensor
    sinc_kernel: Tensor
    kernel1_params: dict
    kernel2_params: dict
    sinc_params: dict
    sigma1: Tensor
    gray1: Tensor
    poisson_scale1: Tensor
    jpeg_quality1: Tensor
    sigma2: Tensor
    gray2: Tensor
    poisson_scale2: Tensor
    jpeg_quality2: Tensor
    choices: tuple[StageChoice, ...]

    def select(self, i: int) -> "DegradationParams":
        """Parameters of sample ``i`` alone (batch of one)."""
        take = lambda t: t[i : i + 1]  # noqa: E731
        return replace(
            self,
            kernel1=take(self.kernel1), kernel2=take(self.kernel2), sinc_kernel=take(self.sinc_kernel),
            kernel1_params={k: take(v) for k, v in self.kernel1_params.items()},
            kernel2_params={k: take(v) for k, v in self.kernel2_params.items()},
            sinc_params={k: take(v) for k, v in self.sinc_params.items()},
            sigma1=take(self.sigma1), gray1=take(self.gray1), poisson_scale1=take(self.poisson_scale1),
            jpeg_quality1=take(self.jpeg_quality1), sigma2=take(self.sigma2), gray2=take(self.gray2),
            poisson_scale2=take(self.poisson_scale2), jpeg_quality2=take(self.jpeg_quality2),
            choices=(self.choices[i] if len(self.choices) > 1 else self.choices[0],),
        )


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------
def _prob(name: str, v) -> float:
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: probability must be in [0, 1], got {v}")
    return v


def _dist(name: str, v, n: int | None = None) -> tuple[float, ...]:
    v = tuple(float(p) for p in v)
    if n is not None and len(v) != n:
        raise ValueError(f"{name}: expected {n} probabilities, got {len(v)}")
    if any(not 0.0 <= p <= 1.0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
        raise ValueError(f"{name}: probabilities must be in [0, 1] and sum to 1, got {list(v)}")
    return v


def _range(name: str, v, *, min_lo: float | None = None, lo_open: bool = False, max_hi: float | None = None,
           around_one: bool = False) -> tuple[float, float]:
    v = tuple(float(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name}: expected a [lo, hi] pair, got {list(v)}")
    lo, hi = v
    if lo > hi:
        raise ValueError(f"{name}: need lo <= hi, got {list(v)}")
    if min_lo is not None and (lo < min_lo or (lo_open and lo == min_lo)):
        raise ValueError(f"{name}: lo must be {'>' if lo_open else '>='} {min_lo}, got {list(v)}")
    if max_hi is not None and hi > max_hi:
        raise ValueError(f"{name}: hi must be <= {max_hi}, got {list(v)}")
    if around_one and not lo <= 1.0 <= hi:
        raise ValueError(f"{name}: need lo <= 1 <= hi (draws U(lo, 1) or U(1, hi)), got {list(v)}")
    return v


def _kernel_list(name: str, v) -> tuple[str, ...]:
    v = tuple(str(k) for k in v)
    unknown = [k for k in v if k not in KERNEL_TYPES]
    if not v or unknown:
        raise ValueError(f"{name}: unknown or empty kernel types {unknown or v}; known: {list(KERNEL_TYPES)}")
    return v


def _uniform(u: float, lo: float, hi: float) -> float:
    return lo + u * (hi - lo)


def _mode(u: float) -> str:
    return RESIZE_MODES[min(int(u * len(RESIZE_MODES)), len(RESIZE_MODES) - 1)]


def finalize_lr(lr: Tensor, hw: tuple[int, int], round_lr: bool, resize_lr_to_hr: bool) -> Tensor:
    """Step 9 of spec §1.3 (clamp, optional 8-bit rounding) and the optional bicubic upsampling to ``hw``.

    With ``resize_lr_to_hr`` the upsampling precedes clamp + rounding when ``round_lr`` (CCSR), otherwise
    it is clamp -> upsample -> clamp (StableSR).
    """
    if not round_lr:
        lr = torch.clamp(lr, 0, 1)
    if resize_lr_to_hr:
        lr = F.interpolate(lr, size=hw, mode="bicubic")
    lr = torch.clamp(lr, 0, 1)
    if round_lr:
        lr = torch.round(lr * 255.0) / 255.0
    return lr


def undegraded_lr(target: Tensor, hw: tuple[int, int], scale: int, round_lr: bool, resize_lr_to_hr: bool) -> Tensor:
    """LR of the no-degradation branch (StableSR): the target itself, or its antialiased bicubic downscale."""
    if resize_lr_to_hr:
        lr = target
    else:
        lr = F.interpolate(target, size=(hw[0] // scale, hw[1] // scale), mode="bicubic", antialias=True)
    lr = torch.clamp(lr, 0, 1)
    return torch.round(lr * 255.0) / 255.0 if round_lr else lr


class RealESRGANDegradation(nn.Module):
    """Real-ESRGAN second-order degradation (Wang et al. 2021; BasicSR); spec §1.2-1.4, steps 0-9 of §1.3.

    Defaults are the Real-ESRGAN x4plus numbers (spec tables 1.2/1.3); the StableSR/CCSR presets
    are in ``conf/degradation/``. Call ``deg(hr, generator)`` with ``hr`` (B, 3, H, W) float in
    [0, 1] (H, W divisible by ``scale``) and a ``torch.Generator`` on ``hr``'s device; every random
    draw comes from that generator, so a fixed seed gives identical output (bit-identical on CPU).
    Returns ``{"hr": target, "lr": lr}``, float32 in [0, 1]; ``lr`` is (B, 3, H/scale, W/scale), or
    (B, 3, H, W) with ``resize_lr_to_hr``.

    Order (spec §1.3): 0 USM of the HR (``use_usm``: the degradation input is the USM image;
    ``usm_target``: the returned target is the USM image) -> 1 blur(kernel1) -> 2 random resize
    (scale factor) -> 3 Gaussian or Poisson noise -> 4 clamp + JPEG(jpeg_range) -> 5 blur(kernel2)
    with prob ``second_blur_prob`` -> 6 random resize to (H/scale*s, W/scale*s) -> 7 noise ->
    8 50/50: [resize to H/scale + sinc, clamp + JPEG(jpeg_range2)] or [clamp + JPEG, resize + sinc]
    -> 9 clamp (+ 8-bit rounding if ``round_lr``). With ``resize_lr_to_hr`` the LR is bicubically
    upsampled to (H, W) (StableSR ``resize_lq`` / CCSR ``stage2_scale``): when ``round_lr`` the
    upsampling precedes clamp + rounding (CCSR), otherwise it is clamp -> upsample -> clamp
    (StableSR). With prob ``no_degradation_prob`` (StableSR) LR := target (downscaled by
    antialiased bicubic if not ``resize_lr_to_hr``). Resizes use ``F.interpolate`` without
    antialias (as the reference).

    Randomness granularity (spec §1.4): kernels, noise sigma / Poisson scale, gray flag and JPEG
    quality are per sample; resize direction/scale/mode, Gaussian-vs-Poisson, second blur on/off,
    final order and no-degradation are per batch, unless ``per_sample=True``, which draws them per
    sample (then stages 1-8 run sample by sample, since sizes differ).

    Known differences from the reference: steps 10-11 are not done here (paired random crop lives
    in the data module; the training-pair queue is the data module's ``data.pair_pool_size``
    (:mod:`sr_lab.data.pair_pool`), and ``per_sample=True`` decorrelates a batch without it); random streams are torch's, not numpy's; DiffJPEG at quality exactly 100
    skips quantisation instead of producing NaN (it is not the identity: the 4:2:0 chroma step and the
    output clamp remain).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        kernel_list: Sequence[str] = KERNEL_TYPES,
        kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        sinc_prob: float = 0.1,
        blur_sigma: Sequence[float] = (0.2, 3.0),
        betag_range: Sequence[float] = (0.5, 4.0),
        betap_range: Sequence[float] = (1.0, 2.0),
        kernel_list2: Sequence[str] | None = None,
        kernel_prob2: Sequence[float] | None = None,
        sinc_prob2: float = 0.1,
        blur_sigma2: Sequence[float] = (0.2, 1.5),
        betag_range2: Sequence[float] = (0.5, 4.0),
        betap_range2: Sequence[float] = (1.0, 2.0),
        final_sinc_prob: float = 0.8,
        resize_prob: Sequence[float] = (0.2, 0.7, 0.1),
        resize_range: Sequence[float] = (0.15, 1.5),
        gaussian_noise_prob: float = 0.5,
        noise_range: Sequence[float] = (1.0, 30.0),
        poisson_scale_range: Sequence[float] = (0.05, 3.0),
        gray_noise_prob: float = 0.4,
        jpeg_range: Sequence[float] = (30.0, 95.0),
        second_blur_prob: float = 0.8,
        resize_prob2: Sequence[float] = (0.3, 0.4, 0.3),
        resize_range2: Sequence[float] = (0.3, 1.2),
        gaussian_noise_prob2: float = 0.5,
        noise_range2: Sequence[float] = (1.0, 25.0),
        poisson_scale_range2: Sequence[float] = (0.05, 2.5),
        gray_noise_prob2: float = 0.4,
        jpeg_range2: Sequence[float] = (30.0, 95.0),
        use_usm: bool = True,
        usm_target: bool = True,
        round_lr: bool = True,
        resize_lr_to_hr: bool = False,
        no_degradation_prob: float = 0.0,
        per_sample: bool = False,
        gray_noise_shared_across_batch: bool = True,
    ):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
            raise ValueError(f"scale: must be a positive int, got {scale!r}")
        self.scale = scale
        self.kernel_list = _kernel_list("kernel_list", kernel_list)
        self.kernel_prob = _dist("kernel_prob", kernel_prob, len(self.kernel_list))
        self.kernel_list2 = _kernel_list("kernel_list2", kernel_list2 if kernel_list2 is not None else self.kernel_list)
        self.kernel_prob2 = _dist("kernel_prob2", kernel_prob2 if kernel_prob2 is not None else self.kernel_prob,
                                  len(self.kernel_list2))
        self.sinc_prob = _prob("sinc_prob", sinc_prob)
        self.sinc_prob2 = _prob("sinc_prob2", sinc_prob2)
        self.blur_sigma = _range("blur_sigma", blur_sigma, min_lo=0.0, lo_open=True)
        self.blur_sigma2 = _range("blur_sigma2", blur_sigma2, min_lo=0.0, lo_open=True)
        self.betag_range = _range("betag_range", betag_range, min_lo=0.0, lo_open=True, around_one=True)
        self.betag_range2 = _range("betag_range2", betag_range2, min_lo=0.0, lo_open=True, around_one=True)
        self.betap_range = _range("betap_range", betap_range, min_lo=0.0, lo_open=True, around_one=True)
        self.betap_range2 = _range("betap_range2", betap_range2, min_lo=0.0, lo_open=True, around_one=True)
        self.final_sinc_prob = _prob("final_sinc_prob", final_sinc_prob)

        self.resize_prob = _dist("resize_prob", resize_prob, 3)
        self.resize_range = _range("resize_range", resize_range, min_lo=0.0, lo_open=True, around_one=True)
        self.gaussian_noise_prob = _prob("gaussian_noise_prob", gaussian_noise_prob)
        self.noise_range = _range("noise_range", noise_range, min_lo=0.0)
        self.poisson_scale_range = _range("poisson_scale_range", poisson_scale_range, min_lo=0.0)
        self.gray_noise_prob = _prob("gray_noise_prob", gray_noise_prob)
        self.jpeg_range = _range("jpeg_range", jpeg_range, min_lo=0.0, lo_open=True, max_hi=100.0)
        self.second_blur_prob = _prob("second_blur_prob", second_blur_prob)
        self.resize_prob2 = _dist("resize_prob2", resize_prob2, 3)
        self.resize_range2 = _range("resize_range2", resize_range2, min_lo=0.0, lo_open=True, around_one=True)
        self.gaussian_noise_prob2 = _prob("gaussian_noise_prob2", gaussian_noise_prob2)
        self.noise_range2 = _range("noise_range2", noise_range2, min_lo=0.0)
        self.poisson_scale_range2 = _range("poisson_scale_range2", poisson_scale_range2, min_lo=0.0)
        self.gray_noise_prob2 = _prob("gray_noise_prob2", gray_noise_prob2)
        self.jpeg_range2 = _range("jpeg_range2", jpeg_range2, min_lo=0.0, lo_open=True, max_hi=100.0)

        self.use_usm = bool(use_usm)
        self.usm_target = bool(usm_target)
        self.round_lr = bool(round_lr)
        self.resize_lr_to_hr = bool(resize_lr_to_hr)
        self.no_degradation_prob = _prob("no_degradation_prob", no_degradation_prob)
        self.per_sample = bool(per_sample)
        self.gray_noise_shared_across_batch = bool(gray_noise_shared_across_batch)
        self.usm = USMSharp()

    # ------------------------------------------------------------------------------------------
    # random draws
    # ------------------------------------------------------------------------------------------
    def _choice(self, u: Sequence[float]) -> StageChoice:
        """Turn 12 uniforms into the per-batch decisions of spec §1.3 (steps 2, 3, 5, 6, 7, 8)."""

        def resize(ud: float, us: float, probs, rng) -> float:
            if ud < probs[0]:
                return _uniform(us, 1.0, rng[1])
            if ud < probs[0] + probs[1]:
                return _uniform(us, rng[0], 1.0)
            return 1.0

        return StageChoice(
            no_degradation=u[0] < self.no_degradation_prob,
            resize1=resize(u[1], u[2], self.resize_prob, self.resize_range),
            mode1=_mode(u[3]),
            gaussian1=u[4] < self.gaussian_noise_prob,
            second_blur=u[5] < self.second_blur_prob,
            resize2=resize(u[6], u[7], self.resize_prob2, self.resize_range2),
            mode2=_mode(u[8]),
            gaussian2=u[9] < self.gaussian_noise_prob2,
            resize_first=u[10] < 0.5,
            mode_final=_mode(u[11]),
        )

    def sample_params(self, batch: int, generator: torch.Generator) -> DegradationParams:
        """Draw all per-sample and per-batch parameters for a batch (spec §1.2-1.4) from ``generator``.

        One device->host transfer: the per-batch uniforms (one row, or one per sample with
        ``per_sample``). Kernels and per-sample values stay on ``generator.device``.
        """
        g = generator
        rows = batch if self.per_sample else 1
        u = torch.rand((rows, _N_CHOICE_DRAWS), generator=g, device=g.device, dtype=torch.float64).tolist()
        choices = tuple(self._choice(r) for r in u)

        k1 = sample_mixed_kernel_params(batch, g, kernel_list=self.kernel_list, kernel_prob=self.kernel_prob,
                                        sinc_prob=self.sinc_prob, blur_sigma=self.blur_sigma,
                                        betag_range=self.betag_range, betap_range=self.betap_range)
        k2 = sample_mixed_kernel_params(batch, g, kernel_list=self.kernel_list2, kernel_prob=self.kernel_prob2,
                                        sinc_prob=self.sinc_prob2, blur_sigma=self.blur_sigma2,
                                        betag_range=self.betag_range2, betap_range=self.betap_range2)
        ks = sample_final_sinc_params(batch, g, self.final_sinc_prob)

        v = torch.rand((8, batch), generator=g, device=g.device)
        lo_hi = lambda r, i: r[0] + v[i] * (r[1] - r[0])  # noqa: E731
        return DegradationParams(
            kernel1=build_mixed_kernels(k1), kernel2=build_mixed_kernels(k2), sinc_kernel=build_final_sinc_kernels(ks),
            kernel1_params=k1, kernel2_params=k2, sinc_params=ks,
            sigma1=lo_hi(self.noise_range, 0), gray1=(v[1] < self.gray_noise_prob).float(),
            poisson_scale1=lo_hi(self.poisson_scale_range, 2), jpeg_quality1=lo_hi(self.jpeg_range, 3),
            sigma2=lo_hi(self.noise_range2, 4), gray2=(v[5] < self.gray_noise_prob2).float(),
            poisson_scale2=lo_hi(self.poisson_scale_range2, 6), jpeg_quality2=lo_hi(self.jpeg_range2, 7),
            choices=choices,
        )

    # ------------------------------------------------------------------------------------------
    # stages
    # ------------------------------------------------------------------------------------------
    def _noise(self, x: Tensor, gaussian: bool, sigma, gray, poisson_scale, g: torch.Generator) -> Tensor:
        if gaussian:
            return add_gaussian_noise(x, sigma, gray, g, gray_shared_across_batch=self.gray_noise_shared_across_batch)
        return add_poisson_noise(x, poisson_scale, gray, g)

    @staticmethod
    def _resize_to(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x  # F.interpolate to the same size is the identity for these modes
        return F.interpolate(x, size=size, mode=mode)

    def _degrade(self, x: Tensor, p: DegradationParams, c: StageChoice, g: torch.Generator, hw: tuple[int, int]) -> Tensor:
        """Steps 1-8 of spec §1.3 for a group sharing the per-batch decisions ``c``."""
        h, w = hw
        s = self.scale
        # ---- first order
        out = filter2d(x, p.kernel1)
        if c.resize1 != 1.0:
            out = F.interpolate(out, scale_factor=c.resize1, mode=c.mode1)
        out = self._noise(out, c.gaussian1, p.sigma1, p.gray1, p.poisson_scale1, g)
        out = diff_jpeg(torch.clamp(out, 0, 1), p.jpeg_quality1)
        # ---- second order
        if c.second_blur:
            out = filter2d(out, p.kernel2)
        size2 = (max(1, int(h / s * c.resize2)), max(1, int(w / s * c.resize2)))
        out = self._resize_to(out, size2, c.mode2)
        out = self._noise(out, c.gaussian2, p.sigma2, p.gray2, p.poisson_scale2, g)
        # ---- final stage: two orders
        lr_size = (h // s, w // s)
        if c.resize_first:
            out = filter2d(self._resize_to(out, lr_size, c.mode_final), p.sinc_kernel)
            out = diff_jpeg(torch.clamp(out, 0, 1), p.jpeg_quality2)
        else:
            out = diff_jpeg(torch.clamp(out, 0, 1), p.jpeg_quality2)
            out = filter2d(self._resize_to(out, lr_size, c.mode_final), p.sinc_kernel)
        return out

    def _finalize(self, lr: Tensor, hw: tuple[int, int]) -> Tensor:
        return finalize_lr(lr, hw, self.round_lr, self.resize_lr_to_hr)

    def _undegraded(self, target: Tensor, hw: tuple[int, int]) -> Tensor:
        return undegraded_lr(target, hw, self.scale, self.round_lr, self.resize_lr_to_hr)

    def degrade(self, hr: Tensor, params: DegradationParams, generator: torch.Generator) -> dict[str, Tensor]:
        """Apply the degradation described by ``params`` (from :meth:`sample_params`) to ``hr``.

        Noise maps are drawn from ``generator`` as they are needed. See the class docstring.
        """
        hw = tuple(hr.shape[-2:])
        x = hr.float()
        usm = self.usm(x) if (self.use_usm or self.usm_target) else None
        src = usm if self.use_usm else x
        target = usm if self.usm_target else x

        if len(params.choices) == 1:
            c = params.choices[0]
            lr = self._undegraded(target, hw) if c.no_degradation else self._finalize(self._degrade(src, params, c, generator, hw), hw)
        else:
            outs = []
            for i, c in enumerate(params.choices):
                if c.no_degradation:
                    outs.append(self._undegraded(target[i : i + 1], hw))
                else:
                    outs.append(self._finalize(self._degrade(src[i : i + 1], params.select(i), c, generator, hw), hw))
            lr = torch.cat(outs, dim=0)
        return {"hr": target, "lr": lr.contiguous()}

    def forward(self, hr: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Degrade ``hr`` (B, 3, H, W) in [0, 1] with randomness from ``generator``; see the class docstring."""
        if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
            raise ValueError(f"hr: expected a float tensor (B, 3, H, W), got {tuple(hr.shape)} {hr.dtype}")
        h, w = hr.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"hr: H and W ({h}, {w}) must be divisible by scale={self.scale}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != hr.device.type:
            raise ValueError(f"generator: on {generator.device}, but hr is on {hr.device}")
        params = self.sample_params(hr.shape[0], generator)
        return self.degrade(hr, params, generator)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, use_usm={self.use_usm}, usm_target={self.usm_target}, round_lr={self.round_lr}, "
                f"resize_lr_to_hr={self.resize_lr_to_hr}, per_sample={self.per_sample}")

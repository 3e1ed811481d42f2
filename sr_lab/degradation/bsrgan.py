"""BSRGAN degradation (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep Blind
Image Super-Resolution"), in torch with explicit ``torch.Generator`` randomness.

Spec ``degradation_and_metrics.md`` §2 (cszn/BSRGAN ``utils/utils_blindsr.py`` at 5ce1a9c). Own
implementation; every block runs on the image's device except the JPEG codec, which is a real
8-bit libjpeg round trip on the host (torchvision ``encode_jpeg``/``decode_jpeg``; bit-identical to
the reference's OpenCV ``imencode``/``imdecode`` on the same uint8 input, which is tested).

Building blocks (§2.1), each on a (1, 3, H, W) float tensor in [0, 1]:

* :func:`add_blur` — wd2 = 4 + sf, wd = 2 + 0.2 sf; prob 0.5 anisotropic Gaussian (size
  2·randint(2, 11) + 3, theta ~ U(0, pi), eigenvalues l1, l2 ~ U(0, wd2) as variances), else an
  isotropic ``fspecial('gaussian')`` (same sizes, sigma ~ U(0, wd)); mirror-mode convolution.
* :func:`add_resize` (BSRGAN+) — r ~ U(0, 1): r > 0.8 up by U(1, 2), r < 0.7 down by U(0.5/sf, 1),
  else keep; random cv2 interpolation; clip.
* :func:`add_gaussian_noise` — level = randint(2, 25) (0-255 units); r > 0.6 colour noise, r < 0.4
  gray noise, else channel-correlated noise with covariance |L² Uᵀ D U| (L = 25/255, D = diag of
  three U(0, 1), U = orth of a U(0, 1) 3×3 matrix), sampled as numpy's ``multivariate_normal``
  does (SVD square root); clip.
* :func:`add_speckle_noise` — the same three branches, multiplicative (img + img·n); clip.
* :func:`add_poisson_noise` — quantise to 8 bit; vals = 10^(2·U(0, 1) + 2); prob 0.5 colour Poisson,
  else gray (0.299/0.587/0.114, quantised) Poisson noise added to every channel; clip.
* :func:`add_jpeg_noise` — quality = randint(30, 95), 8-bit JPEG round trip.
* :func:`add_sharpening` — Real-ESRGAN USM (weight 0.5, radius 50 -> 51, threshold 10).

Pipelines: :func:`degradation_bsrgan` (§2.2, 7 shuffled ops, op 2 "downsample2" always before op 3
"downsample3") and :func:`degradation_bsrgan_plus` (§2.3, 13 ops, full shuffle with prob
``shuffle_prob``, else natural order with ops 2..5 and 9..12 shuffled among themselves).
:class:`BSRGANDegradation` wraps them with the call signature of
:class:`~sr_lab.degradation.RealESRGANDegradation`.

Differences from the reference: the random streams are torch's (so the same seed does not give the
reference's numbers); there is no camera ISP model (none is shipped with BSRGAN): the ISP ops
draw their probability and are then skipped, as in the reference with ``isp_model=None``; cv2
resizes are reproduced in torch (see :mod:`sr_lab.degradation.resize`); kernel variances / sigmas
are floored at 1e-12 so a draw of exactly 0 gives a delta kernel instead of a division by zero.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .filters import filter2d, usm_sharp
from .resize import CV2_INTERPOLATIONS, imresize_matlab, resize_cv2

__all__ = [
    "BSRGANRandom", "fspecial_gaussian", "anisotropic_gaussian", "shift_kernel", "convolve_mirror",
    "add_blur", "add_resize", "add_gaussian_noise", "add_speckle_noise", "add_poisson_noise",
    "jpeg_roundtrip", "add_jpeg_noise", "add_sharpening", "downsample2", "downsample3",
    "bsrgan_order", "bsrgan_plus_order", "degradation_bsrgan", "degradation_bsrgan_plus",
    "BSRGANDegradation",
]

_TINY = 1e-12
_EPS64 = float(torch.finfo(torch.float64).eps)


class BSRGANRandom:
    """Scalar and tensor draws from one ``torch.Generator`` (the reference's ``random``/``np.random``)."""

    def __init__(self, generator: torch.Generator):
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        self.g = generator
        self.device = generator.device

    def rand(self) -> float:
        """U(0, 1) (``random.random()`` / ``np.random.rand()``)."""
        return float(torch.rand((), generator=self.g, device=self.device, dtype=torch.float64))

    def uniform(self, lo: float, hi: float) -> float:
        """U(lo, hi) (``random.uniform``)."""
        return lo + (hi - lo) * self.rand()

    def randint(self, lo: int, hi: int) -> int:
        """Integer in [lo, hi], both inclusive (``random.randint``)."""
        return int(torch.randint(lo, hi + 1, (), generator=self.g, device=self.device))

    def choice(self, seq: Sequence[Any]) -> Any:
        """Uniform element of ``seq`` (``random.choice``)."""
        return seq[self.randint(0, len(seq) - 1)]

    def permutation(self, items: Sequence[int]) -> list[int]:
        """A uniformly random ordering of ``items`` (``random.sample(items, len(items))``)."""
        perm = torch.randperm(len(items), generator=self.g, device=self.device).tolist()
        return [items[i] for i in perm]

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> Tensor:
        return torch.randn(tuple(shape), generator=self.g, device=self.device, dtype=dtype)

    def rand_tensor(self, shape: Sequence[int], dtype=torch.float64) -> Tensor:
        return torch.rand(tuple(shape), generator=self.g, device=self.device, dtype=dtype)

    def poisson(self, rate: Tensor) -> Tensor:
        return torch.poisson(rate, generator=self.g)


# ----------------------------------------------------------------------------------------------
# kernels and filtering (spec §2.1 add_blur, §2.2 op 2)
# ----------------------------------------------------------------------------------------------
def _grid(size: int, device=None) -> tuple[Tensor, Tensor]:
    """Offsets ``(x, y)`` of a size×size kernel, centred (BSRGAN ``gm_blur_kernel`` / ``fspecial``)."""
    ax = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def fspecial_gaussian(size: int, sigma: float, device=None) -> Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)``: exp(-(x²+y²)/(2σ²)), values < eps·max zeroed, sum 1."""
    x, y = _grid(size, device)
    h = torch.exp(-(x * x + y * y) / (2 * max(float(sigma), _TINY) ** 2))
    h = torch.where(h < _EPS64 * h.max(), torch.zeros_like(h), h)
    return h / h.sum()


def anisotropic_gaussian(size: int, theta: float, l1: float, l2: float, device=None) -> Tensor:
    """BSRGAN ``anisotropic_Gaussian``: covariance Σ = V diag(l1, l2) V⁻¹ with v = R(θ)·[1, 0],
    V = [[v0, v1], [v1, -v0]] (l1, l2 are variances); kernel ∝ exp(-½ [x y] Σ⁻¹ [x y]ᵀ), sum 1."""
    c, s = math.cos(theta), math.sin(theta)
    v = torch.tensor([[c, s], [s, -c]], dtype=torch.float64, device=device)  # symmetric, V⁻¹ = V
    inv_d = torch.diag(torch.tensor([1.0 / max(l1, _TINY), 1.0 / max(l2, _TINY)], dtype=torch.float64,
                                    device=device))
    inv_sigma = v @ inv_d @ v
    x, y = _grid(size, device)
    q = inv_sigma[0, 0] * x * x + (inv_sigma[0, 1] + inv_sigma[1, 0]) * x * y + inv_sigma[1, 1] * y * y
    k = torch.exp(-0.5 * q)
    return k / k.sum()


def _shift_matrix(n: int, shift: float, device=None) -> Tensor:
    """(n, n) linear-interpolation matrix sampling index i at clip(i + shift, 0, n-1)."""
    pos = (torch.arange(n, device=device, dtype=torch.float64) + shift).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.double()
    m = torch.zeros(n, n, device=device, dtype=torch.float64)
    rows = torch.arange(n, device=device)
    m[rows, lo] += 1 - frac
    m[rows, hi] += frac
    return m


def shift_kernel(k: Tensor, sf: int) -> Tensor:
    """BSRGAN ``shift_pixel(k, sf)``: bilinear resampling of ``k`` at (i + (sf-1)/2, j + (sf-1)/2),
    coordinates clipped to the kernel (scipy ``interp2d`` linear on the integer grid). Not renormalised."""
    shift = (sf - 1) * 0.5
    mh = _shift_matrix(k.shape[0], shift, k.device)
    mw = _shift_matrix(k.shape[1], shift, k.device)
    return mh @ k.double() @ mw.T


def convolve_mirror(img: Tensor, k: Tensor) -> Tensor:
    """``scipy.ndimage.convolve(img, k, mode='mirror')`` per channel: a true convolution (flipped
    kernel) with reflect padding (scipy 'mirror' = torch 'reflect'); ``img`` (B, C, H, W)."""
    return filter2d(img, k.flip(-2, -1).to(img.dtype))


def add_blur(img: Tensor, sf: int, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """BSRGAN ``add_blur`` (spec §2.1)."""
    wd2, wd = 4.0 + sf, 2.0 + 0.2 * sf
    if rng.rand() < 0.5:
        l1, l2 = wd2 * rng.rand(), wd2 * rng.rand()
        size = 2 * rng.randint(2, 11) + 3
        theta = rng.rand() * math.pi
        k = anisotropic_gaussian(size, theta, l1, l2, img.device)
        info = {"op": "blur", "kind": "aniso", "size": size, "theta": theta, "l1": l1, "l2": l2}
    else:
        size = 2 * rng.randint(2, 11) + 3
        sigma = wd * rng.rand()
        k = fspecial_gaussian(size, sigma, img.device)
        info = {"op": "blur", "kind": "iso", "size": size, "sigma": sigma}
    return convolve_mirror(img, k), info


# ----------------------------------------------------------------------------------------------
# resizing (spec §2.1 add_resize, §2.2 ops 2 and 3)
# ----------------------------------------------------------------------------------------------
def add_resize(img: Tensor, sf: int, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """BSRGAN+ ``add_resize`` (spec §2.1)."""
    r = rng.rand()
    if r > 0.8:
        sf1 = rng.uniform(1, 2)
    elif r < 0.7:
        sf1 = rng.uniform(0.5 / sf, 1)
    else:
        sf1 = 1.0
    h, w = img.shape[-2:]
    interp = rng.choice(CV2_INTERPOLATIONS)
    size = (max(1, int(sf1 * h)), max(1, int(sf1 * w)))
    return resize_cv2(img, size, interp).clamp(0, 1), {"op": "resize", "factor": sf1, "interp": interp, "size": size}


def downsample2(img: Tensor, sf: int, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """BSRGAN op 2 (spec §2.2): prob 0.75 cv2 resize by 1/sf1, sf1 ~ U(1, 2 sf), random
    interpolation; else 25×25 Gaussian (sigma ~ U(0.1, 0.6 sf)) shifted by (sf-1)/2 px,
    renormalised, mirror convolution, then nearest sub-sampling every sf px; clip."""
    h, w = img.shape[-2:]
    if rng.rand() < 0.75:
        sf1 = rng.uniform(1, 2 * sf)
        interp = rng.choice(CV2_INTERPOLATIONS)
        size = (max(1, int(1 / sf1 * h)), max(1, int(1 / sf1 * w)))
        out = resize_cv2(img, size, interp)
        info = {"op": "downsample2", "kind": "resize", "factor": sf1, "interp": interp, "size": size}
    else:
        sigma = rng.uniform(0.1, 0.6 * sf)
        k = shift_kernel(fspecial_gaussian(25, sigma, img.device), sf)
        k = k / k.sum()
        out = convolve_mirror(img, k)[..., 0::sf, 0::sf]
        info = {"op": "downsample2", "kind": "shifted_blur_nearest", "sigma": sigma, "size": tuple(out.shape[-2:])}
    return out.clamp(0, 1), info


def downsample3(img: Tensor, size_before_op2: tuple[int, int], sf: int, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """BSRGAN op 3 (spec §2.2): cv2 resize to exactly (H/sf, W/sf) of the size *before op 2*; clip."""
    b, a = size_before_op2  # reference names: a = width, b = height
    interp = rng.choice(CV2_INTERPOLATIONS)
    size = (max(1, int(1 / sf * b)), max(1, int(1 / sf * a)))
    return resize_cv2(img, size, interp).clamp(0, 1), {"op": "downsample3", "interp": interp, "size": size}


# ----------------------------------------------------------------------------------------------
# noise (spec §2.1)
# ----------------------------------------------------------------------------------------------
def _orth(a: Tensor) -> Tensor:
    """``scipy.linalg.orth``: orthonormal basis of the range of ``a`` (left singular vectors)."""
    u, s, _ = torch.linalg.svd(a)
    rank = int((s > s.max() * max(a.shape) * _EPS64).sum())
    return u[:, :rank]


def _correlated_noise(h: int, w: int, level_max: int, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """(1, 3, H, W) noise with covariance |L² Uᵀ D U| (L = level_max/255), numpy ``multivariate_normal``
    style: x = z · (sqrt(s)[:, None] · Vh) with (U, s, Vh) = svd(cov)."""
    big_l = level_max / 255.0
    d = torch.diag(rng.rand_tensor((3,)))
    u = _orth(rng.rand_tensor((3, 3)))
    cov = (big_l ** 2 * (u.T @ d @ u)).abs()
    _, s, vh = torch.linalg.svd(cov)
    z = rng.randn((h * w, 3), dtype=torch.float64)
    x = z @ (s.sqrt()[:, None] * vh)
    return x.T.reshape(1, 3, h, w).float(), {"cov": cov.tolist()}


def _noise_map(img: Tensor, level_max: int, rng: BSRGANRandom, r: float, level: int) -> tuple[Tensor, dict]:
    """The three noise branches of BSRGAN (spec §2.1): r > 0.6 colour, r < 0.4 gray, else correlated."""
    h, w = img.shape[-2:]
    if r > 0.6:
        return rng.randn((1, 3, h, w)) * (level / 255.0), {"kind": "color"}
    if r < 0.4:
        return rng.randn((1, 1, h, w)) * (level / 255.0), {"kind": "gray"}
    n, extra = _correlated_noise(h, w, level_max, rng)
    return n, {"kind": "correlated", **extra}


def add_gaussian_noise(img: Tensor, rng: BSRGANRandom, level_range: tuple[int, int] = (2, 25)) -> tuple[Tensor, dict]:
    """BSRGAN ``add_Gaussian_noise`` (spec §2.1)."""
    lo, hi = level_range
    level = rng.randint(lo, hi)
    r = rng.rand()
    n, info = _noise_map(img, hi, rng, r, level)
    out = (img + n.to(img.dtype)).clamp(0, 1)
    return out, {"op": "gaussian_noise", "level": level, **info}


def add_speckle_noise(img: Tensor, rng: BSRGANRandom, level_range: tuple[int, int] = (2, 25)) -> tuple[Tensor, dict]:
    """BSRGAN ``add_speckle_noise`` (spec §2.1): img + img·noise, clipped before and after."""
    lo, hi = level_range
    level = rng.randint(lo, hi)
    img = img.clamp(0, 1)
    r = rng.rand()
    n, info = _noise_map(img, hi, rng, r, level)
    out = (img + img * n.to(img.dtype)).clamp(0, 1)
    return out, {"op": "speckle_noise", "level": level, **info}


def _quantise(x: Tensor) -> Tensor:
    return torch.clamp(torch.round(x * 255.0), 0, 255) / 255.0


def add_poisson_noise(img: Tensor, rng: BSRGANRandom) -> tuple[Tensor, dict]:
    """BSRGAN ``add_Poisson_noise`` (spec §2.1)."""
    img = _quantise(img)
    vals = 10 ** (2 * rng.rand() + 2.0)
    if rng.rand() < 0.5:
        out = rng.poisson(img * vals) / vals
        kind = "color"
    else:
        wts = torch.tensor([0.299, 0.587, 0.114], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
        gray = _quantise((img * wts).sum(dim=1, keepdim=True))
        out = img + (rng.poisson(gray * vals) / vals - gray)
        kind = "gray"
    return out.clamp(0, 1), {"op": "poisson_noise", "vals": vals, "kind": kind}


# ----------------------------------------------------------------------------------------------
# JPEG and sharpening (spec §2.1)
# ----------------------------------------------------------------------------------------------
def jpeg_roundtrip(img: Tensor, quality: int) -> Tensor:
    """8-bit JPEG encode/decode of ``img`` (B, 3, H, W) in [0, 1] at integer ``quality``.

    ``uint8 = round(clip(img, 0, 1) * 255)`` (BSRGAN ``single2uint``), libjpeg via torchvision on
    the host (4:2:0 chroma, as OpenCV's default), decoded back to float on ``img``'s device.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    q8 = torch.round(img.detach().clamp(0, 1) * 255.0).to(torch.uint8).cpu()
    out = [decode_jpeg(encode_jpeg(x.contiguous(), quality=int(quality)), mode=ImageReadMode.RGB) for x in q8]
    return (torch.stack(out).to(device=img.device, dtype=img.dtype)) / 255.0


def add_jpeg_noise(img: Tensor, rng: BSRGANRandom, quality_range: tuple[int, int] = (30, 95)) -> tuple[Tensor, dict]:
    """BSRGAN ``add_JPEG_noise`` (spec §2.1): quality = randint(30, 95), real 8-bit JPEG."""
    q = rng.randint(*quality_range)
    return jpeg_roundtrip(img, q), {"op": "jpeg", "quality": q}


def add_sharpening(img: Tensor) -> Tensor:
    """BSRGAN ``add_sharpening`` = Real-ESRGAN USM (weight 0.5, radius 50 -> 51, threshold 10; spec §2.1, §1.5)."""
    return usm_sharp(img, radius=50, weight=0.5, threshold=10)


# ----------------------------------------------------------------------------------------------
# op orders (spec §2.2 step 3, §2.3 step 2)
# ----------------------------------------------------------------------------------------------
def bsrgan_order(rng: BSRGANRandom) -> list[int]:
    """Random permutation of ops 0..6, then ops 2 and 3 swapped if 3 came first (downsample3 after 2)."""
    order = rng.permutation(list(range(7)))
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:
        order[i2], order[i3] = order[i3], order[i2]
    return order


def bsrgan_plus_order(rng: BSRGANRandom, shuffle_prob: float) -> list[int]:
    """With prob ``shuffle_prob`` a full permutation of ops 0..12; else the natural order with
    ops 2..5 shuffled among themselves and ops 9..12 shuffled among themselves."""
    if rng.rand() < shuffle_prob:
        return rng.permutation(list(range(13)))
    order = list(range(13))
    order[2:6] = rng.permutation(order[2:6])
    order[9:13] = rng.permutation(order[9:13])
    return order


# ----------------------------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------------------------
def _modcrop(img: Tensor, sf: int) -> Tensor:
    h, w = img.shape[-2:]
    return img[..., : h - h % sf, : w - w % sf]


def _check_size(img: Tensor, sf: int, lq_patchsize: int | None) -> None:
    h, w = img.shape[-2:]
    if lq_patchsize is not None and (h < lq_patchsize * sf or w < lq_patchsize * sf):
        raise ValueError(f"img size ({h}x{w}) is too small for lq_patchsize={lq_patchsize} at sf={sf}")


def _random_crop(lq: Tensor, hq: Tensor, sf: int, lq_patchsize: int | None, rng: BSRGANRandom) -> tuple[Tensor, Tensor]:
    """BSRGAN ``random_crop``: LQ patch lq_patchsize, HQ patch at sf times the same place."""
    if lq_patchsize is None:
        return lq, hq
    h, w = lq.shape[-2:]
    top, left = rng.randint(0, h - lq_patchsize), rng.randint(0, w - lq_patchsize)
    lq = lq[..., top : top + lq_patchsize, left : left + lq_patchsize]
    hq = hq[..., top * sf : (top + lq_patchsize) * sf, left * sf : (left + lq_patchsize) * sf]
    return lq, hq


def degradation_bsrgan(img: Tensor, sf: int, rng: BSRGANRandom, *, lq_patchsize: int | None = None,
                       jpeg_prob: float = 0.9, scale2_prob: float = 0.25, isp_prob: float = 0.25,
                       noise_level_range: tuple[int, int] = (2, 25),
                       jpeg_quality_range: tuple[int, int] = (30, 95)) -> tuple[Tensor, Tensor, list[dict]]:
    """BSRGAN ``degradation_bsrgan`` (spec §2.2) on ``img`` (1, 3, H, W) in [0, 1].

    Returns ``(lq, hq, trace)``: lq (1, 3, H/sf, W/sf) (or the ``lq_patchsize`` crop), hq the
    mod-cropped input (or its matching crop), and the list of applied ops with their parameters.
    """
    sf_ori = sf
    img = _modcrop(img, sf)
    _check_size(img, sf, lq_patchsize)
    hq = img.clone()
    trace: list[dict] = []
    if sf == 4 and rng.rand() < scale2_prob:  # downsample1
        h, w = img.shape[-2:]
        if rng.rand() < 0.5:
            interp = rng.choice(CV2_INTERPOLATIONS)
            img = resize_cv2(img, (int(1 / 2 * h), int(1 / 2 * w)), interp)
            trace.append({"op": "downsample1", "kind": "cv2", "interp": interp})
        else:
            img = imresize_matlab(img, 1 / 2)
            trace.append({"op": "downsample1", "kind": "matlab_bicubic"})
        img = img.clamp(0, 1)
        sf = 2
    order = bsrgan_order(rng)
    trace.append({"op": "order", "order": list(order)})
    size_before_op2 = tuple(img.shape[-2:])
    for i in order:
        if i in (0, 1):
            img, info = add_blur(img, sf, rng)
        elif i == 2:
            size_before_op2 = tuple(img.shape[-2:])
            img, info = downsample2(img, sf, rng)
        elif i == 3:
            img, info = downsample3(img, size_before_op2, sf, rng)
        elif i == 4:
            img, info = add_gaussian_noise(img, rng, noise_level_range)
        elif i == 5:
            if rng.rand() < jpeg_prob:
                img, info = add_jpeg_noise(img, rng, jpeg_quality_range)
            else:
                info = {"op": "jpeg", "skipped": True}
        else:  # i == 6: camera ISP noise, needs an ISP model (none is shipped)
            info = {"op": "isp", "skipped": True, "drawn": rng.rand() < isp_prob}
        trace.append(info)
    img, info = add_jpeg_noise(img, rng, jpeg_quality_range)
    trace.append({**info, "final": True})
    lq, hq = _random_crop(img, hq, sf_ori, lq_patchsize, rng)
    return lq, hq, trace


def degradation_bsrgan_plus(img: Tensor, sf: int, rng: BSRGANRandom, *, shuffle_prob: float = 0.5,
                            use_sharp: bool = True, lq_patchsize: int | None = None,
                            poisson_prob: float = 0.1, speckle_prob: float = 0.1, isp_prob: float = 0.1,
                            noise_level_range: tuple[int, int] = (2, 25),
                            jpeg_quality_range: tuple[int, int] = (30, 95)) -> tuple[Tensor, Tensor, list[dict]]:
    """BSRGAN ``degradation_bsrgan_plus`` (spec §2.3) on ``img`` (1, 3, H, W) in [0, 1].

    Ops: 0 blur, 1 resize, 2 Gaussian noise, 3 Poisson (prob 0.1), 4 speckle (prob 0.1), 5 ISP,
    6 JPEG, 7 blur, 8 resize, 9 Gaussian noise, 10 Poisson, 11 speckle, 12 ISP; then a resize to
    (H/sf, W/sf) of the HQ with random interpolation and a final JPEG. Returns ``(lq, hq, trace)``.
    """
    img = _modcrop(img, sf)
    _check_size(img, sf, lq_patchsize)
    if use_sharp:
        img = add_sharpening(img)
    hq = img.clone()
    order = bsrgan_plus_order(rng, shuffle_prob)
    trace: list[dict] = [{"op": "order", "order": list(order)}]
    for i in order:
        if i in (0, 7):
            img, info = add_blur(img, sf, rng)
        elif i in (1, 8):
            img, info = add_resize(img, sf, rng)
        elif i in (2, 9):
            img, info = add_gaussian_noise(img, rng, noise_level_range)
        elif i in (3, 10):
            if rng.rand() < poisson_prob:
                img, info = add_poisson_noise(img, rng)
            else:
                info = {"op": "poisson_noise", "skipped": True}
        elif i in (4, 11):
            if rng.rand() < speckle_prob:
                img, info = add_speckle_noise(img, rng, noise_level_range)
            else:
                info = {"op": "speckle_noise", "skipped": True}
        elif i in (5, 12):
            info = {"op": "isp", "skipped": True, "drawn": rng.rand() < isp_prob}
        else:  # i == 6
            img, info = add_jpeg_noise(img, rng, jpeg_quality_range)
        trace.append(info)
    h, w = hq.shape[-2:]
    interp = rng.choice(CV2_INTERPOLATIONS)
    img = resize_cv2(img, (int(1 / sf * h), int(1 / sf * w)), interp)
    trace.append({"op": "final_resize", "interp": interp})
    img, info = add_jpeg_noise(img, rng, jpeg_quality_range)
    trace.append({**info, "final": True})
    lq, hq = _random_crop(img, hq, sf, lq_patchsize, rng)
    return lq, hq, trace


# ----------------------------------------------------------------------------------------------
# module with the RealESRGANDegradation call signature
# ----------------------------------------------------------------------------------------------
def _prob(name: str, v) -> float:
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: probability must be in [0, 1], got {v}")
    return v


def _int_range(name: str, v, lo: int, hi: int) -> tuple[int, int]:
    v = tuple(int(x) for x in v)
    if len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
        raise ValueError(f"{name}: expected [a, b] with {lo} <= a <= b <= {hi}, got {list(v)}")
    return v


class BSRGANDegradation(nn.Module):
    """BSRGAN / BSRGAN+ degradation (Zhang et al. 2021; spec §2) as a batched module.

    ``deg(hr, generator)`` with ``hr`` (B, 3, H, W) float in [0, 1], H and W divisible by
    ``scale``, and a ``torch.Generator`` on ``hr``'s device: every sample runs its own pipeline
    (own op order and parameters) with draws taken in turn from ``generator``, so a fixed seed gives
    identical output. Returns ``{"hr": hq, "lr": lr}`` float32: ``hq`` is the input (USM-sharpened for
    ``variant='bsrgan_plus'`` with ``use_sharp``), ``lr`` is (B, 3, H/scale, W/scale) and already 8-bit
    (the final JPEG), or bicubically upsampled to (H, W) with ``resize_lr_to_hr``. ``lq_patchsize``
    enables the reference's final random crop (then sizes change; None keeps the whole image).
    The per-sample op traces of the last call are kept in ``last_traces``.
    """

    def __init__(self, *, scale: int = 4, variant: str = "bsrgan", lq_patchsize: int | None = None,
                 jpeg_prob: float = 0.9, scale2_prob: float = 0.25, isp_prob: float = 0.25,
                 shuffle_prob: float = 0.5, use_sharp: bool = True, poisson_prob: float = 0.1,
                 speckle_prob: float = 0.1, isp_prob_plus: float = 0.1,
                 noise_level_range: Sequence[int] = (2, 25), jpeg_quality_range: Sequence[int] = (30, 95),
                 resize_lr_to_hr: bool = False):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
            raise ValueError(f"scale: must be a positive int, got {scale!r}")
        if variant not in ("bsrgan", "bsrgan_plus"):
            raise ValueError(f"variant: must be 'bsrgan' or 'bsrgan_plus', got {variant!r}")
        if lq_patchsize is not None and (not isinstance(lq_patchsize, int) or lq_patchsize < 1):
            raise ValueError(f"lq_patchsize: must be null or a positive int, got {lq_patchsize!r}")
        self.scale, self.variant, self.lq_patchsize = scale, variant, lq_patchsize
        self.jpeg_prob = _prob("jpeg_prob", jpeg_prob)
        self.scale2_prob = _prob("scale2_prob", scale2_prob)
        self.isp_prob = _prob("isp_prob", isp_prob)
        self.shuffle_prob = _prob("shuffle_prob", shuffle_prob)
        self.poisson_prob = _prob("poisson_prob", poisson_prob)
        self.speckle_prob = _prob("speckle_prob", speckle_prob)
        self.isp_prob_plus = _prob("isp_prob_plus", isp_prob_plus)
        self.use_sharp = bool(use_sharp)
        self.noise_level_range = _int_range("noise_level_range", noise_level_range, 0, 255)
        self.jpeg_quality_range = _int_range("jpeg_quality_range", jpeg_quality_range, 1, 100)
        self.resize_lr_to_hr = bool(resize_lr_to_hr)
        self.last_traces: list[list[dict]] = []

    def degrade_one(self, img: Tensor, rng: BSRGANRandom) -> tuple[Tensor, Tensor, list[dict]]:
        """Run the configured pipeline on one image (1, 3, H, W)."""
        if self.variant == "bsrgan":
            return degradation_bsrgan(img, self.scale, rng, lq_patchsize=self.lq_patchsize, jpeg_prob=self.jpeg_prob,
                                      scale2_prob=self.scale2_prob, isp_prob=self.isp_prob,
                                      noise_level_range=self.noise_level_range,
                                      jpeg_quality_range=self.jpeg_quality_range)
        return degradation_bsrgan_plus(img, self.scale, rng, shuffle_prob=self.shuffle_prob, use_sharp=self.use_sharp,
                                       lq_patchsize=self.lq_patchsize, poisson_prob=self.poisson_prob,
                                       speckle_prob=self.speckle_prob, isp_prob=self.isp_prob_plus,
                                       noise_level_range=self.noise_level_range,
                                       jpeg_quality_range=self.jpeg_quality_range)

    def forward(self, hr: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Degrade ``hr`` (B, 3, H, W) in [0, 1]; see the class docstring."""
        if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
            raise ValueError(f"hr: expected a float tensor (B, 3, H, W), got {tuple(hr.shape)} {hr.dtype}")
        h, w = hr.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"hr: H and W ({h}, {w}) must be divisible by scale={self.scale}")
        rng = BSRGANRandom(generator)
        if generator.device.type != hr.device.type:
            raise ValueError(f"generator: on {generator.device}, but hr is on {hr.device}")
        lrs, hqs, traces = [], [], []
        for i in range(hr.shape[0]):
            lq, hq, trace = self.degrade_one(hr[i : i + 1].float(), rng)
            lrs.append(lq)
            hqs.append(hq)
            traces.append(trace)
        self.last_traces = traces
        lr, hq = torch.cat(lrs), torch.cat(hqs)
        if self.resize_lr_to_hr:
            lr = F.interpolate(lr, size=tuple(hq.shape[-2:]), mode="bicubic").clamp(0, 1)
        return {"hr": hq.contiguous(), "lr": lr.contiguous()}

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, variant={self.variant}, lq_patchsize={self.lq_patchsize}, "
                f"resize_lr_to_hr={self.resize_lr_to_hr}")

"""Batched, on-device blur-kernel synthesis for the Real-ESRGAN degradation.

Real-ESRGAN (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure
Synthetic Data") draws three kernels per training image on the CPU (BasicSR
``basicsr/data/degradations.py`` and ``realesrgan_dataset.py``); spec §1.2. Here the same
distributions are drawn for a whole batch at once, on the batch's device, from an explicit
``torch.Generator``.

Every kernel lives on a fixed 21x21 grid (integer offsets -10..10). A per-sample kernel size
k in {7, 9, ..., 21} is realised by zeroing everything outside the central k x k support and
renormalising, which equals the reference's "normalise a k x k kernel, then zero-pad to 21".

Grid convention (as in BasicSR's ``mesh_grid``): ``kernel[i, j]`` is the value at offset
``x = j - k//2`` (column, horizontal) and ``y = i - k//2`` (row, vertical).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "KERNEL_TYPES",
    "KERNEL_GRID_SIZE",
    "KERNEL_SIZES",
    "kernel_grid",
    "quadratic_form",
    "gaussian_profile",
    "generalized_gaussian_profile",
    "plateau_profile",
    "sinc_profile",
    "normalize_kernel",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "sinc_kernel",
    "pulse_kernel",
    "support_mask",
    "sample_mixed_kernel_params",
    "build_mixed_kernels",
    "random_mixed_kernels",
    "sample_final_sinc_params",
    "build_final_sinc_kernels",
    "random_final_sinc_kernels",
]

#: The six "mixed" kernel types of Real-ESRGAN (spec §1.2), in canonical order; the ``kind``
#: tensors returned by :func:`sample_mixed_kernel_params` index into this tuple.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
#: Size of the common grid every kernel is padded to (BasicSR pads all kernels to 21x21).
KERNEL_GRID_SIZE = 21
#: Odd kernel sizes drawn uniformly per sample (BasicSR ``kernel_range = [2v+1 for v in 3..10]``).
KERNEL_SIZES = tuple(range(7, 22, 2))

_GENERALIZED = (KERNEL_TYPES.index("generalized_iso"), KERNEL_TYPES.index("generalized_aniso"))
_PLATEAU = (KERNEL_TYPES.index("plateau_iso"), KERNEL_TYPES.index("plateau_aniso"))
_ISOTROPIC = (KERNEL_TYPES.index("iso"), KERNEL_TYPES.index("generalized_iso"), KERNEL_TYPES.index("plateau_iso"))


# ----------------------------------------------------------------------------------------------
# closed-form profiles (shared by the single-kernel functions and the batched path)
# ----------------------------------------------------------------------------------------------
def kernel_grid(k: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Integer offset grid ``(x, y)`` of shape (k, k), centred on 0 (BasicSR ``mesh_grid``; spec §1.2).

    ``x`` varies along columns, ``y`` along rows.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k: kernel size must be a positive odd integer, got {k}")
    ax = torch.arange(k, device=device, dtype=dtype) - (k // 2)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def quadratic_form(x: Tensor, y: Tensor, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor) -> Tensor:
    """Mahalanobis form ``q = [x y] Sigma^-1 [x y]^T`` with ``Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T``.

    Real-ESRGAN (Wang et al. 2021) bivariate kernels, BasicSR ``sigma_matrix2``/``pdf2``; spec §1.2.
    ``sigma_x``, ``sigma_y``, ``theta`` have shape (B,) (or are 0-d); ``x``, ``y`` shape (k, k);
    the result has shape (B, k, k). Uses the closed form ``u = c x + s y``, ``v = -s x + c y``,
    ``q = u^2/sx^2 + v^2/sy^2`` (the rotated coordinates ``R^T [x y]``).
    """
    sx = sigma_x.reshape(-1, 1, 1)
    sy = sigma_y.reshape(-1, 1, 1)
    c = torch.cos(theta).reshape(-1, 1, 1)
    s = torch.sin(theta).reshape(-1, 1, 1)
    u = c * x + s * y
    v = -s * x + c * y
    return (u / sx) ** 2 + (v / sy) ** 2


def gaussian_profile(q: Tensor) -> Tensor:
    """Unnormalised bivariate Gaussian ``exp(-q/2)`` (Real-ESRGAN ``iso``/``aniso``; spec §1.2)."""
    return torch.exp(-0.5 * q)


def generalized_gaussian_profile(q: Tensor, beta: Tensor) -> Tensor:
    """Unnormalised generalised Gaussian ``exp(-q^beta / 2)`` (Real-ESRGAN ``generalized_*``; spec §1.2)."""
    return torch.exp(-0.5 * q.pow(beta.reshape(-1, 1, 1)))


def plateau_profile(q: Tensor, beta: Tensor) -> Tensor:
    """Unnormalised plateau kernel ``1 / (1 + q^beta)`` (Real-ESRGAN ``plateau_*``; spec §1.2)."""
    return 1.0 / (1.0 + q.pow(beta.reshape(-1, 1, 1)))


def sinc_profile(x: Tensor, y: Tensor, omega_c: Tensor) -> Tensor:
    """Unnormalised circular low-pass (jinc) ``omega J1(omega r) / (2 pi r)``, centre ``omega^2/(4 pi)``.

    Real-ESRGAN (Wang et al. 2021) sinc filter, BasicSR ``circular_lowpass_kernel``; spec §1.2
    (the centre value is the r -> 0 limit). Uses ``torch.special.bessel_j1``; result (B, k, k).
    """
    w = omega_c.reshape(-1, 1, 1)
    r = torch.sqrt(x * x + y * y)
    centre = r == 0
    r_safe = torch.where(centre, torch.ones_like(r), r)
    val = w * torch.special.bessel_j1(w * r_safe) / (2 * math.pi * r_safe)
    return torch.where(centre, w * w / (4 * math.pi), val)


def normalize_kernel(kernel: Tensor) -> Tensor:
    """Divide each (…, k, k) kernel by its sum (all Real-ESRGAN kernels sum to 1; spec §1.2)."""
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


# ----------------------------------------------------------------------------------------------
# single-kernel closed forms (used by tests and by hand; batched over parameters when given tensors)
# ----------------------------------------------------------------------------------------------
def _params(*vals, device=None) -> tuple[list[Tensor], bool]:
    """Turn floats / 0-d / 1-d tensors into float32 (B,) tensors on one device; report scalar-ness."""
    scalar = all(not isinstance(v, Tensor) or v.ndim == 0 for v in vals)
    if device is None:
        device = next((v.device for v in vals if isinstance(v, Tensor)), torch.device("cpu"))
    out = [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1) for v in vals]
    n = max(t.numel() for t in out)
    return [t.expand(n) for t in out], scalar


def _finish(kernel: Tensor, scalar: bool) -> Tensor:
    kernel = normalize_kernel(kernel)
    return kernel[0] if scalar else kernel


def gaussian_kernel(k: int, sigma_x, sigma_y=None, theta=0.0, *, device=None) -> Tensor:
    """Normalised (an)isotropic Gaussian kernel of size k x k.

    Real-ESRGAN (Wang et al. 2021) ``iso`` (``sigma_y=None``: sigma_y = sigma_x, theta ignored)
    and ``aniso`` kernels, BasicSR ``bivariate_Gaussian``; spec §1.2. Float arguments give a
    (k, k) kernel, (B,) tensors give (B, k, k).
    """
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    (sx, sy, th), scalar = _params(sigma_x, sigma_y, theta, device=device)
    x, y = kernel_grid(k, device=sx.device)
    return _finish(gaussian_profile(quadratic_form(x, y, sx, sy, th)), scalar)


def generalized_gaussian_kernel(k: int, sigma_x, sigma_y=None, theta=0.0, beta=1.0, *, device=None) -> Tensor:
    """Normalised generalised Gaussian kernel ``exp(-q^beta / 2)`` of size k x k.

    Real-ESRGAN (Wang et al. 2021) ``generalized_iso``/``generalized_aniso``, BasicSR
    ``bivariate_generalized_Gaussian``; spec §1.2. ``sigma_y=None`` means isotropic.
    """
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    (sx, sy, th, b), scalar = _params(sigma_x, sigma_y, theta, beta, device=device)
    x, y = kernel_grid(k, device=sx.device)
    return _finish(generalized_gaussian_profile(quadratic_form(x, y, sx, sy, th), b), scalar)


def plateau_kernel(k: int, sigma_x, sigma_y=None, theta=0.0, beta=1.0, *, device=None) -> Tensor:
    """Normalised plateau kernel ``1 / (1 + q^beta)`` of size k x k.

    Real-ESRGAN (Wang et al. 2021) ``plateau_iso``/``plateau_aniso``, BasicSR
    ``bivariate_plateau``; spec §1.2. ``sigma_y=None`` means isotropic.
    """
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    (sx, sy, th, b), scalar = _params(sigma_x, sigma_y, theta, beta, device=device)
    x, y = kernel_grid(k, device=sx.device)
    return _finish(plateau_profile(quadratic_form(x, y, sx, sy, th), b), scalar)


def sinc_kernel(k: int, omega_c, *, device=None) -> Tensor:
    """Normalised circular sinc (jinc) low-pass kernel of size k x k with cutoff ``omega_c`` (radians).

    Real-ESRGAN (Wang et al. 2021) sinc kernel, BasicSR ``circular_lowpass_kernel``; spec §1.2.
    """
    (w,), scalar = _params(omega_c, device=device)
    x, y = kernel_grid(k, device=w.device)
    return _finish(sinc_profile(x, y, w), scalar)


def pulse_kernel(k: int = KERNEL_GRID_SIZE, *, batch: int | None = None, device=None) -> Tensor:
    """Delta ("pulse") kernel: 1 at the centre, 0 elsewhere, i.e. the identity filter.

    Real-ESRGAN (Wang et al. 2021) final-stage kernel when no sinc is drawn; spec §1.2.
    Returns (k, k), or (batch, k, k) when ``batch`` is given.
    """
    kernel = torch.zeros(k, k, device=device)
    kernel[k // 2, k // 2] = 1.0
    return kernel if batch is None else kernel.expand(batch, k, k).clone()


def support_mask(sizes: Tensor, grid: int = KERNEL_GRID_SIZE) -> Tensor:
    """Boolean (B, grid, grid) mask of the centred k x k support for per-sample odd sizes ``sizes`` (B,).

    Realises Real-ESRGAN's per-sample kernel size on a common grid (spec §1.2 / §3).
    """
    x, y = kernel_grid(grid, device=sizes.device)
    half = (sizes // 2).reshape(-1, 1, 1).to(x.dtype)
    return (x.abs() <= half) & (y.abs() <= half)


# ----------------------------------------------------------------------------------------------
# batched random kernels
# ----------------------------------------------------------------------------------------------
def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + u * (hi - lo)


def _draw_sizes(u: Tensor) -> Tensor:
    idx = torch.clamp((u * len(KERNEL_SIZES)).long(), max=len(KERNEL_SIZES) - 1)
    return KERNEL_SIZES[0] + 2 * idx


def _draw_beta(u_half: Tensor, u_val: Tensor, beta_range: Sequence[float]) -> Tensor:
    """BasicSR beta rule: with prob 0.5 ``U(lo, 1)``, else ``U(1, hi)`` (spec §1.2)."""
    lo, hi = float(beta_range[0]), float(beta_range[1])
    return torch.where(u_half < 0.5, _uniform(u_val, lo, 1.0), _uniform(u_val, 1.0, hi))


def sample_mixed_kernel_params(
    batch: int,
    generator: torch.Generator,
    *,
    kernel_list: Sequence[str] = KERNEL_TYPES,
    kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sinc_prob: float = 0.1,
    blur_sigma: Sequence[float] = (0.2, 3.0),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> dict[str, Tensor]:
    """Draw per-sample parameters of Real-ESRGAN's first/second-order blur kernels.

    Real-ESRGAN (Wang et al. 2021), BasicSR ``RealESRGANDataset.__getitem__`` + ``random_mixed_kernels``;
    spec §1.2. Per sample: size ~ U{7,9,...,21}; sinc with prob ``sinc_prob`` (omega_c ~ U(pi/3, pi)
    if size < 13 else U(pi/5, pi)); otherwise a type from ``kernel_list`` with weights
    ``kernel_prob``, sigma_x, sigma_y ~ U(blur_sigma), theta ~ U(-pi, pi) (isotropic types:
    sigma_y = sigma_x, theta = 0), beta by the 50/50 rule from ``betag_range`` (generalised) or
    ``betap_range`` (plateau). All draws come from ``generator`` on its device, in one call.

    Returns a dict of (B,) tensors: ``size`` (long), ``is_sinc`` (bool), ``kind`` (long index into
    :data:`KERNEL_TYPES`), ``sigma_x``, ``sigma_y``, ``theta``, ``beta`` (1 for Gaussian types),
    ``omega`` (sinc cutoff; only meaningful where ``is_sinc``).
    """
    device = generator.device
    u = torch.rand((10, batch), generator=generator, device=device)
    size = _draw_sizes(u[0])
    is_sinc = u[1] < sinc_prob

    # categorical draw over kernel_list (inverse CDF with python-float thresholds: no host copies)
    pos = torch.zeros(batch, dtype=torch.long, device=device)
    total, acc = float(sum(kernel_prob)), 0.0
    for p in kernel_prob[:-1]:
        acc += float(p) / total
        pos += (u[2] >= acc).long()
    kind = torch.zeros_like(pos)
    for j, name in enumerate(kernel_list):
        kind = torch.where(pos == j, KERNEL_TYPES.index(name), kind)

    sigma_x = _uniform(u[3], float(blur_sigma[0]), float(blur_sigma[1]))
    sigma_y = _uniform(u[4], float(blur_sigma[0]), float(blur_sigma[1]))
    theta = _uniform(u[5], -math.pi, math.pi)
    iso = (kind == _ISOTROPIC[0]) | (kind == _ISOTROPIC[1]) | (kind == _ISOTROPIC[2])
    sigma_y = torch.where(iso, sigma_x, sigma_y)
    theta = torch.where(iso, torch.zeros_like(theta), theta)

    beta_g = _draw_beta(u[6], u[7], betag_range)
    beta_p = _draw_beta(u[6], u[8], betap_range)
    is_gen = (kind == _GENERALIZED[0]) | (kind == _GENERALIZED[1])
    is_plat = (kind == _PLATEAU[0]) | (kind == _PLATEAU[1])
    beta = torch.where(is_gen, beta_g, torch.where(is_plat, beta_p, torch.ones_like(beta_g)))

    omega_lo = torch.where(size < 13, math.pi / 3, math.pi / 5)
    omega = omega_lo + u[9] * (math.pi - omega_lo)
    return dict(size=size, is_sinc=is_sinc, kind=kind, sigma_x=sigma_x, sigma_y=sigma_y,
                theta=theta, beta=beta, omega=omega)


def build_mixed_kernels(params: dict[str, Tensor], grid: int = KERNEL_GRID_SIZE) -> Tensor:
    """Evaluate the kernels described by :func:`sample_mixed_kernel_params` -> (B, grid, grid).

    Real-ESRGAN (Wang et al. 2021) mixed/sinc kernels; spec §1.2. All candidate profiles are
    evaluated for every sample (cheap on a 21x21 grid) and selected per sample, then masked to the
    per-sample k x k support and normalised to sum 1.
    """
    x, y = kernel_grid(grid, device=params["sigma_x"].device)
    q = quadratic_form(x, y, params["sigma_x"], params["sigma_y"], params["theta"])
    kind = params["kind"].reshape(-1, 1, 1)
    beta = params["beta"]
    is_gen = (kind == _GENERALIZED[0]) | (kind == _GENERALIZED[1])
    is_plat = (kind == _PLATEAU[0]) | (kind == _PLATEAU[1])
    kernel = torch.where(
        is_gen,
        generalized_gaussian_profile(q, beta),
        torch.where(is_plat, plateau_profile(q, beta), gaussian_profile(q)),
    )
    kernel = torch.where(params["is_sinc"].reshape(-1, 1, 1), sinc_profile(x, y, params["omega"]), kernel)
    kernel = kernel * support_mask(params["size"], grid)
    return normalize_kernel(kernel)


def random_mixed_kernels(batch: int, generator: torch.Generator, **kwargs) -> Tensor:
    """Draw a batch of Real-ESRGAN blur kernels (B, 21, 21): sinc with prob ``sinc_prob``, else mixed.

    Real-ESRGAN (Wang et al. 2021) ``kernel1``/``kernel2``; spec §1.2. Keyword arguments as in
    :func:`sample_mixed_kernel_params`.
    """
    return build_mixed_kernels(sample_mixed_kernel_params(batch, generator, **kwargs))


def sample_final_sinc_params(batch: int, generator: torch.Generator, final_sinc_prob: float = 0.8) -> dict[str, Tensor]:
    """Draw per-sample parameters of Real-ESRGAN's final-stage kernel.

    Real-ESRGAN (Wang et al. 2021) ``sinc_kernel``; spec §1.2: with prob ``final_sinc_prob`` a sinc of
    size ~ U{7..21} and omega_c ~ U(pi/3, pi) (no size-dependent range), else a 21x21 pulse.
    Returns (B,) tensors ``is_sinc`` (bool), ``size`` (long), ``omega``.
    """
    u = torch.rand((3, batch), generator=generator, device=generator.device)
    return dict(is_sinc=u[0] < final_sinc_prob, size=_draw_sizes(u[1]), omega=_uniform(u[2], math.pi / 3, math.pi))


def build_final_sinc_kernels(params: dict[str, Tensor], grid: int = KERNEL_GRID_SIZE) -> Tensor:
    """Evaluate :func:`sample_final_sinc_params` draws -> (B, grid, grid) sinc-or-pulse kernels (spec §1.2)."""
    x, y = kernel_grid(grid, device=params["omega"].device)
    sinc = normalize_kernel(sinc_profile(x, y, params["omega"]) * support_mask(params["size"], grid))
    pulse = ((x == 0) & (y == 0)).to(sinc.dtype)
    return torch.where(params["is_sinc"].reshape(-1, 1, 1), sinc, pulse)


def random_final_sinc_kernels(batch: int, generator: torch.Generator, final_sinc_prob: float = 0.8) -> Tensor:
    """Draw Real-ESRGAN's final sinc kernels (B, 21, 21): sinc with prob ``final_sinc_prob``, else pulse.

    Real-ESRGAN (Wang et al. 2021); spec §1.2.
    """
    return build_final_sinc_kernels(sample_final_sinc_params(batch, generator, final_sinc_prob))

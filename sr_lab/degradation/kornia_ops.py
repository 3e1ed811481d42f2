"""Pure, batched, differentiable image degradations built on kornia's *functional* API (kornia 0.9.0).

Every function takes ``x`` (B, C, H, W), float in [0, 1], and per-sample parameter tensors of shape (B,)
(or (B, 2)); a Python number, a 0-d or a (1,) tensor is broadcast to the batch. Parameters are moved to
``x``'s device and dtype. No randomness is drawn here (the caller samples the parameters) and kornia's
augmentation classes / global RNG are never used. Outputs have the input's shape.

Where a kernel size depends on a parameter (motion length, disk radius, Gaussian sigma), the batch
maximum is read on the host (one ``.item()``/``.tolist()``): a convolution kernel's size is a shape,
so this synchronisation is unavoidable. kornia itself also reads some parameters on the host
(``gaussian_blur2d``'s sigma-positivity check, ``get_motion_kernel2d``'s nearest rotation, which runs
on the CPU, ``jpeg_codec_differentiable``'s quality range check).

Reflect filtering: ``kornia.filters.filter2d(..., border_type='reflect')`` and sr_lab's
:func:`sr_lab.degradation.filters.filter2d` (BasicSR ``filter2D``) run the same sequence of torch ops
(``F.pad(mode='reflect')`` by ``k//2``, then the same grouped ``conv2d``), and are bit-identical
(``torch.equal``) wherever kornia works, i.e. ``k//2 < H`` and ``k//2 < W`` (tested). When the
padding reaches the image size kornia (``F.pad``) raises, while sr_lab's ``reflect_pad`` repeats the
reflection periodically; the blurs here therefore use kornia's filter where it works and sr_lab's
otherwise (:func:`filter2d_reflect`), with identical results on the common domain.
"""
from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from .filters import filter2d as _sr_filter2d

__all__ = [
    "motion_kernel",
    "motion_blur",
    "disk_kernel",
    "disk_blur",
    "gaussian_blur",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_gamma",
    "adjust_saturation",
    "chromatic_aberration",
    "jpeg_kornia",
    "filter2d_kornia",
    "filter2d_reflect",
]


# --------------------------------------------------------------------------------------------- helpers


def _per_sample(param, x: Tensor, name: str, trailing: tuple[int, ...] = ()) -> Tensor:
    """``param`` as a float tensor of shape ``(B, *trailing)`` on ``x``'s device and dtype.

    Accepts a Python number (only when ``trailing == ()``), or a tensor of shape ``trailing``,
    ``(1, *trailing)`` or ``(B, *trailing)``; the first two are broadcast to the batch.
    """
    b = x.shape[0]
    p = torch.as_tensor(param, device=x.device, dtype=x.dtype)
    if p.ndim == len(trailing):
        p = p.unsqueeze(0)
    if p.ndim != len(trailing) + 1 or tuple(p.shape[1:]) != tuple(trailing) or p.shape[0] not in (1, b):
        want = ", ".join(str(t) for t in (b, *trailing))
        raise ValueError(f"{name}: expected shape ({want}), got {tuple(torch.as_tensor(param).shape)}")
    return p.expand(b, *trailing)


def _check_image(x: Tensor, name: str = "x", channels: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]}")


def filter2d_reflect(x: Tensor, kernel: Tensor) -> Tensor:
    """Reflect-padded cross-correlation with a (B, k, k) or (1, k, k) odd kernel.

    ``kornia.filters.filter2d(x, kernel, border_type='reflect')`` when ``k//2 < H, W``; otherwise sr_lab's
    :func:`sr_lab.degradation.filters.filter2d`, whose ``reflect_pad`` also handles padding wider than
    the image. The two are bit-identical where both run (module docstring).
    """
    pad = kernel.shape[-1] // 2
    if pad < x.shape[-2] and pad < x.shape[-1]:
        return kornia.filters.filter2d(x, kernel, border_type="reflect")
    return _sr_filter2d(x, kernel)


def _centre_pad(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad (N, k, k) kernels, k odd, symmetrically to (N, size, size)."""
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (p, p, p, p)) if p else kernel


# --------------------------------------------------------------------------------------------- blurs


def motion_kernel(length, angle, direction, *, like: Tensor, mode: str = "nearest") -> Tensor:
    """Per-sample motion-blur kernels (B, K, K), K = the batch-maximum length.

    Each sample's kernel is ``kornia.filters.get_motion_kernel2d(L_i, angle_i, direction_i, mode)`` built at
    its own odd size ``L_i`` and zero-padded, centred, to ``K``. ``L_i = 1`` gives the 1x1 identity (kornia
    requires ``L >= 3``). kornia takes ``kernel_size`` as a Python int, so the kernels are built with one
    kornia call per *distinct* length (a loop over the few distinct lengths, not over the batch); the lengths
    are read on the host for that. ``like`` gives the device and dtype.
    """
    x = like
    lengths = _per_sample(length, x, "length")
    angle = _per_sample(angle, x, "angle")
    direction = _per_sample(direction, x, "direction")
    values = lengths.detach().to("cpu", torch.float64).tolist()
    ints = [int(round(v)) for v in values]
    if any(abs(v - i) > 1e-6 or i < 1 or i % 2 == 0 for v, i in zip(values, ints)):
        raise ValueError(f"length: expected odd integers >= 1, got {values}")
    size = max(ints)
    b = lengths.shape[0]
    uniq = sorted(set(ints))
    if len(uniq) == 1:  # the common case: one kornia call for the whole batch, exactly kornia's kernel
        if size == 1:
            return torch.ones(b, 1, 1, device=x.device, dtype=x.dtype) * (1 + 0 * direction[:, None, None])
        return kornia.filters.get_motion_kernel2d(size, angle, direction, mode)
    ints_t = torch.tensor(ints, device=x.device)
    kernel = x.new_zeros(b, size, size)
    for n in uniq:
        idx = (ints_t == n).nonzero(as_tuple=True)[0]
        if n == 1:
            k = torch.ones(idx.numel(), 1, 1, device=x.device, dtype=x.dtype)
        else:
            k = kornia.filters.get_motion_kernel2d(n, angle[idx], direction[idx], mode)
        kernel = kernel.index_put((idx,), _centre_pad(k.to(x.dtype), size))
    return kernel


def motion_blur(x: Tensor, length, angle, direction, *, mode: str = "nearest") -> Tensor:
    """Linear motion blur with per-sample length, angle and direction; reflect border.

    Implements ``kornia.filters.motion_blur`` = ``filter2d(x, get_motion_kernel2d(L, angle, direction),
    border_type='reflect')``, generalised to a per-sample length ``L_i`` (see :func:`motion_kernel`: each
    kernel built at its own size, zero-padded centred to the batch maximum, then one per-sample filter2d).

    Args:
        x: (B, C, H, W) in [0, 1].
        length: (B,) odd integers >= 1 (float or long); 1 is the identity.
        angle: (B,) degrees, counter-clockwise as displayed (kornia's convention).
        direction: (B,) in [-1, 1] (clamped by kornia): the tap weights fall linearly along the line,
            ``direction=0`` is uniform; at ``+-1`` one end tap has weight 0, so the streak is ``L - 1`` long.
        mode: kornia's kernel rotation, ``'nearest'`` (default, as kornia) or ``'bilinear'``.

    When every length is equal the result is exactly ``kornia.filters.motion_blur(x, L, angle, direction,
    border_type='reflect', mode=mode)`` (same kernel, same filter2d call; tested with ``torch.equal``). With mixed
    lengths a sample differs from kornia's single-sample call only by float summation order over the zero
    taps (tested to 1e-6). sr_lab has no motion blur of its own; when ``K//2 >= H`` or ``W`` the filter falls
    back to sr_lab's ``filter2d`` (periodic reflection; kornia would raise). Differentiable in ``x`` and
    ``direction``; the nearest-rotated kernel has zero gradient in ``angle`` (as in kornia).
    """
    _check_image(x)
    return filter2d_reflect(x, motion_kernel(length, angle, direction, like=x, mode=mode))


def disk_kernel(radius, *, like: Tensor, kernel_size: int | None = None, subsamples: int = 16) -> Tensor:
    """Antialiased, normalised disk (pillbox / defocus) kernels (B, K, K), one per radius.

    Pixel ``(i, j)`` (offset ``(u, v)`` from the centre) gets the fraction of its ``subsamples x subsamples``
    sub-pixel centres ``(u - 1/2 + (s + 1/2)/S, v - 1/2 + (t + 1/2)/S)`` that lie in the closed disk
    ``u'^2 + v'^2 <= r^2`` (deterministic supersampled pixel coverage of the circle; the sub-pixel positions
    are dyadic for power-of-two ``S``, hence exact in float). Each kernel is divided by its sum. A radius
    whose disk holds no sub-pixel centre (``r = 0``, or ``r < sqrt(2)/(2S)``) gives the identity (a delta),
    which is also the ``r -> 0`` limit: for ``r <= 1/2`` all the coverage is in the centre pixel anyway.
    ``K = 2*ceil(max r) + 1`` unless ``kernel_size`` is given. Coverage is a step function of ``r``, so the
    kernel has zero gradient in ``radius``. sr_lab has no disk kernel (its ``sinc`` kernel is a jinc low-pass).
    """
    x = like
    r = _per_sample(radius, x, "radius")
    rmax = float(r.detach().max())
    if not rmax >= 0 or not bool((r >= 0).all()):
        raise ValueError(f"radius: expected values >= 0, got {r.tolist()}")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(rmax) + 1
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size}")
    s = int(subsamples)
    half = kernel_size // 2
    pos = (torch.arange(kernel_size * s, device=x.device, dtype=x.dtype) + 0.5) / s - 0.5 - half
    d2 = pos[:, None] ** 2 + pos[None, :] ** 2  # (K*S, K*S)
    inside = (d2[None] <= (r * r)[:, None, None]).to(x.dtype)  # (B, K*S, K*S)
    cover = F.avg_pool2d(inside[:, None], s)[:, 0]  # (B, K, K) pixel coverage in [0, 1]
    total = cover.sum(dim=(-2, -1), keepdim=True)
    delta = torch.zeros_like(cover)
    delta[:, half, half] = 1.0
    return torch.where(total > 0, cover / total.clamp_min(torch.finfo(x.dtype).tiny), delta)


def disk_blur(x: Tensor, radius, *, subsamples: int = 16) -> Tensor:
    """Defocus blur: per-sample antialiased disk kernel (:func:`disk_kernel`), reflect border.

    ``filter2d(x, disk_kernel(radius), border_type='reflect')`` with ``kornia.filters.filter2d`` (sr_lab's
    bit-identical ``filter2d`` when the padding reaches the image size). Kernel size ``2*ceil(max r) + 1``;
    ``r = 0`` is exactly the identity. kornia 0.9.0 has no disk/defocus kernel, so the kernel is built
    here. Differentiable in ``x``, not in ``radius`` (coverage is a step function).
    """
    _check_image(x)
    return filter2d_reflect(x, disk_kernel(radius, like=x, subsamples=subsamples))


def gaussian_blur(x: Tensor, sigma, kernel_size: int | None = None) -> Tensor:
    """Isotropic Gaussian blur with per-sample ``sigma`` (B,) > 0, reflect border.

    ``kornia.filters.gaussian_blur2d(x, (k, k), sigma=stack([sigma, sigma], -1), border_type='reflect')``:
    separable; each 1-D kernel is ``g_n = exp(-n^2 / (2 sigma^2))``, ``n = -k//2 .. k//2``, normalised to
    sum 1. ``k = 2*ceil(3*max sigma) + 1`` by default (one size for the batch; a sample's kernel is its own
    sigma's Gaussian truncated to that window and renormalised). Same maths as sr_lab's
    ``kernels.gaussian_kernel(k, sigma)`` (2-D Gaussian normalised over the k x k window = outer product of
    the normalised 1-D kernels) + ``filters.filter2d``; kornia filters separably, so the two agree to float
    rounding (~1e-7), not bitwise. When ``k//2 >= H`` or ``W`` (kornia's reflect pad would raise) the
    outer-product kernel is applied with sr_lab's ``filter2d`` (periodic reflection). Differentiable in
    ``x`` and ``sigma``. kornia checks ``sigma > 0`` on the host.
    """
    _check_image(x)
    s = _per_sample(sigma, x, "sigma")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3.0 * float(s.detach().max())) + 1
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size}")
    pad = kernel_size // 2
    if pad < x.shape[-2] and pad < x.shape[-1]:
        return kornia.filters.gaussian_blur2d(x, (kernel_size, kernel_size), torch.stack([s, s], -1), "reflect")
    g = kornia.filters.get_gaussian_kernel1d(kernel_size, s[:, None])  # (B, k)
    return _sr_filter2d(x, g[:, :, None] * g[:, None, :])


# --------------------------------------------------------------------------------------------- colour


def adjust_brightness(x: Tensor, delta) -> Tensor:
    """Additive brightness: ``clamp(x + delta_i, 0, 1)`` (``kornia.enhance.adjust_brightness``, Szeliski's
    additive convention). sr_lab has no brightness op. Differentiable (zero gradient where clamped)."""
    _check_image(x)
    d = _per_sample(delta, x, "delta")
    return kornia.enhance.adjust_brightness(x, d, clip_output=True).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor) -> Tensor:
    """Contrast as kornia defines it: *multiplicative*, ``clamp(x * factor_i, 0, 1)``
    (``kornia.enhance.adjust_contrast``, Szeliski's convention), i.e. a gain about 0, not the PIL/torchvision
    blend with the mean grey (that is ``kornia.enhance.adjust_contrast_with_mean_subtraction``). ``factor >= 0``
    (kornia asserts it asynchronously). sr_lab has no contrast op."""
    _check_image(x)
    f = _per_sample(factor, x, "factor")
    return kornia.enhance.adjust_contrast(x, f, clip_output=True).clamp(0.0, 1.0)


def adjust_gamma(x: Tensor, gamma, gain=1.0) -> Tensor:
    """Gamma: ``clamp(gain_i * x ** gamma_i, 0, 1)`` (``kornia.enhance.adjust_gamma``); ``gamma, gain >= 0``
    (kornia asserts it). ``gain`` is a float or (B,). The gradient in ``x`` is infinite at ``x = 0`` for
    ``gamma < 1`` (the power's derivative). sr_lab has no gamma op."""
    _check_image(x)
    g = _per_sample(gamma, x, "gamma")
    k = _per_sample(gain, x, "gain")
    return kornia.enhance.adjust_gamma(x, g, k).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor) -> Tensor:
    """HSV saturation scaling (``kornia.enhance.adjust_saturation``): hue and value ``v = max(R, G, B)``
    are kept and the HSV saturation ``s = (max - min) / max`` becomes ``s' = clamp(s * factor_i, 0, 1)``;
    per pixel ``out_c = (c - min) * v s' / (max - min) + v (1 - s')``. Note ``factor = 0`` gives
    ``max(R, G, B)`` in every channel, not the luma grey of PIL/torchvision (that is
    ``kornia.enhance.adjust_saturation_with_gray_subtraction``). RGB input (C = 3). Clamped to [0, 1].
    sr_lab has no saturation op."""
    _check_image(x, channels=3)
    f = _per_sample(factor, x, "factor")
    return kornia.enhance.adjust_saturation(x, f).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- geometry


def _source_index(idx: Tensor, n: int, padding_mode: str) -> Tensor:
    """Map integer sample positions outside ``[0, n)`` into the image: ``border`` clamps (replicate);
    ``reflection`` mirrors about the edge pixel centres without repeating them (period ``2(n-1)``),
    i.e. ``grid_sample(padding_mode='reflection', align_corners=True)`` = ``F.pad(mode='reflect')``."""
    if padding_mode == "border" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - idx)


def _translate_1d(img: Tensor, shift: Tensor, dim: int, padding_mode: str) -> Tensor:
    """Linear-interpolated translation of ``img`` (N, H, W) along ``dim`` (-1: x, -2: y) by ``shift`` (N,)
    pixels: ``out[j] = (1 - w) img[i0] + w img[i0 + 1]`` with ``s = j - shift``, ``i0 = floor(s)``,
    ``w = s - i0`` (gathers, so exact: ``w = 0`` for integer shifts)."""
    n = img.shape[dim]
    pos = torch.arange(n, device=img.device, dtype=img.dtype)[None, :] - shift[:, None]  # (N, n)
    i0 = torch.floor(pos)
    w = pos - i0
    i0 = i0.long()
    i1 = _source_index(i0 + 1, n, padding_mode)
    i0 = _source_index(i0, n, padding_mode)
    if dim == -1:
        shape = img.shape
        v0 = img.gather(-1, i0[:, None, :].expand(shape))
        v1 = img.gather(-1, i1[:, None, :].expand(shape))
        w = w[:, None, :]
    else:
        shape = img.shape
        v0 = img.gather(-2, i0[:, :, None].expand(shape))
        v1 = img.gather(-2, i1[:, :, None].expand(shape))
        w = w[:, :, None]
    return (1 - w) * v0 + w * v1


def chromatic_aberration(x: Tensor, shift_r, shift_b, *, padding_mode: str = "border") -> Tensor:
    """Lateral chromatic aberration: translate the red and blue channels by per-sample sub-pixel shifts.

    ``shift_r``, ``shift_b``: (B, 2) = ``(dx, dy)`` in pixels, positive = content moves right / down
    (``out(x, y) = in(x - dx, y - dy)``, the convention of ``kornia.geometry.transform.translate``). Green is
    returned unchanged. Bilinear interpolation, ``padding_mode`` ``'border'`` (replicate, default) or
    ``'reflection'`` (mirror about the edge pixel centres, ``F.pad``'s ``'reflect'``).

    Implementation choice: kornia's ``translate`` (``warp_affine`` -> ``grid_sample``, align_corners=True)
    gives the same bilinear translation (tested to 1e-5), but its pixel -> normalised -> pixel grid round
    trip is inexact: a zero shift moves values by ~1e-6 (measured 9e-7) and integer shifts are not exact
    rolls. A pure translation is separable and bilinear interpolation factorises, so it is computed here as
    two 1-D linear interpolations with exact integer gathers (x, then y): zero shift is exactly the
    identity, integer shifts are exact rolls in the interior, a half-pixel shift gives exact midpoints.
    Fully vectorised over the batch (R and B processed together). Differentiable in ``x`` and in the
    shifts (piecewise linear). RGB input (C = 3). sr_lab has no such op.
    """
    _check_image(x, channels=3)
    modes = {"border": "border", "replicate": "border", "reflection": "reflection", "reflect": "reflection"}
    if padding_mode not in modes:
        raise ValueError(f"padding_mode: expected one of {sorted(modes)}, got {padding_mode!r}")
    pm = modes[padding_mode]
    b, _, h, w = x.shape
    sr = _per_sample(shift_r, x, "shift_r", (2,))
    sb = _per_sample(shift_b, x, "shift_b", (2,))
    shifts = torch.stack([sr, sb], 1).reshape(2 * b, 2)  # (2B, 2): [r_0, b_0, r_1, b_1, ...]
    rb = x[:, [0, 2]].reshape(2 * b, h, w)
    rb = _translate_1d(rb, shifts[:, 0], -1, pm)
    rb = _translate_1d(rb, shifts[:, 1], -2, pm).reshape(b, 2, h, w)
    return torch.stack([rb[:, 0], x[:, 1], rb[:, 1]], 1)


# --------------------------------------------------------------------------------------------- JPEG


def jpeg_kornia(x: Tensor, quality) -> Tensor:
    """Differentiable JPEG round trip via ``kornia.enhance.jpeg_codec_differentiable`` (Reich et al. 2024).

    ``quality``: (B,) in [1, 100] (kornia checks [0, 100] on the host). ``x`` (B, 3, H, W) in [0, 1];
    output same shape, in [0, 1]. Sizes: kornia 0.9.0 itself replicate-pads bottom/right to multiples of 16
    and crops back; the same padding is done here explicitly (so any H, W works whatever a kornia version
    does internally), which leaves kornia's own padding a no-op - the result is bit-identical to calling
    kornia directly (tested).

    kornia's codec (read from kornia 0.9.0 ``enhance/jpeg.py``) versus sr_lab's BasicSR-style
    :func:`sr_lab.degradation.jpeg.diff_jpeg` (``DiffJPEG``, Real-ESRGAN):

    * Quantisation tables: both start from the Annex-K luma/chroma tables. kornia scales libjpeg-style,
      ``s = floor(5000/q if q < 50 else 200 - 2q)``, ``T' = floor(clip((T*s + 50)/100, 1, 255))``, with a
      polynomial floor ``floor(v) + (v - floor(v) - 1/2)^3`` and a soft exponential clip (so entries are
      within +-0.125 of libjpeg's, and at q >= ~96, where libjpeg clips to 1, kornia's soft clip then
      polynomial floor gives ~0.12). sr_lab uses the continuous BasicSR factor ``T * s / 100`` with no floor,
      no +50 rounding and no [1, 255] clip, so at low quality its tables are far coarser (q = 1: up to
      4950 versus kornia's ~255).
    * Table orientation: kornia uses Annex K as printed (row = vertical frequency); sr_lab by default uses
      BasicSR's transposed luma table (``transpose_luma_table=True``).
    * Rounding: kornia always uses the cubic "differentiable" rounding ``round(v) + (v - round(v))^3``, so
      gradients reach ``x``; sr_lab's default (``differentiable=False``, the training pipelines' setting) is
      hard ``torch.round``, whose gradient is zero (the same cubic rounding is available there on request).
    * Colour: kornia's ``rgb_to_ycbcr`` uses Cb = 0.564 (B - Y), Cr = 0.713 (R - Y) (rounded JFIF
      coefficients 0.5643 / 0.7133) and its exact inverse; sr_lab uses the JFIF matrix.
    * Chroma 4:2:0: kornia blurs Cb/Cr with a 3x3 Gaussian (sigma 0.5, reflect; ``rescale(antialias=True)``)
      before the 2x bilinear downscale (= 2x2 mean) and upsamples bilinearly; sr_lab takes the 2x2 mean and
      upsamples by pixel repetition (BasicSR). This is the main difference at high quality.
    * Padding to 16: kornia replicate, sr_lab zeros (changes the border blocks of non-multiple-of-16 images).
    * Clamping: kornia's ``ycbcr_to_rgb`` hard-clamps to [0, 1]; the soft [0, 255] clip kornia applies
      afterwards therefore never acts. sr_lab hard-clamps to [0, 255] / 255. Both outputs lie in [0, 1].
    * Quality 100: kornia's scale is ``floor_poly(0) = -0.125``, giving table entries ~0.12: every DCT
      coefficient is still quantised (step ~0.12, cubic rounding), so q = 100 is nearly, not exactly,
      lossless before chroma subsampling. sr_lab skips quantisation at q = 100 (BasicSR would divide by 0).
      Neither is the identity (chroma 4:2:0 remains).

    Measured (float32, four 64x64 crops of scikit-image ``astronaut``, mean |kornia - sr_lab| in 8-bit
    levels, sr_lab at its defaults): q=10: 3.90, q=50: 2.50, q=90: 1.84, q=100: 1.10 (max 65 / 49 / 43 /
    33 levels, at sharp colour edges). Error to the input: kornia 8.03 / 4.37 / 2.67 / 1.57, sr_lab 9.06 / 4.83 / 3.06 /
    1.55. sr_lab with ``transpose_luma_table=False, differentiable=True`` is within 1.1-1.7 of kornia.
    """
    _check_image(x, channels=3)
    q = _per_sample(quality, x, "quality").contiguous()
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
    y = kornia.enhance.jpeg_codec_differentiable(xp, q)
    return y[..., :h, :w].clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- filter2d


def filter2d_kornia(x: Tensor, kernel: Tensor) -> Tensor:
    """``kornia.filters.filter2d(x, kernel, border_type='reflect')`` (cross-correlation, ``padding='same'``).

    ``kernel``: (B, k, k) per-sample or (1, k, k) / (k, k) shared. Versus sr_lab's
    :func:`sr_lab.degradation.filters.filter2d` (BasicSR ``filter2D``): for odd square kernels with
    ``k//2 < H`` and ``k//2 < W`` both run ``F.pad(mode='reflect')`` then the same grouped ``conv2d`` and
    the outputs are bit-identical (``torch.equal``; tested on float32 and float64, shared and per-sample
    kernels, k from 3 to 21). When ``k//2 >= H`` or ``W`` kornia cannot reflect-pad (``F.pad`` raises)
    and this raises ``ValueError``; sr_lab's ``reflect_pad`` handles it (periodic reflection). Use sr_lab's
    filter2d where the padding may reach the image size.
    """
    _check_image(x)
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0)
    pad_h, pad_w = (kernel.shape[-2] - 1) // 2, (kernel.shape[-1] - 1) // 2
    rear_h, rear_w = kernel.shape[-2] - 1 - pad_h, kernel.shape[-1] - 1 - pad_w
    if max(pad_h, rear_h) >= x.shape[-2] or max(pad_w, rear_w) >= x.shape[-1]:
        raise ValueError(
            f"filter2d_kornia: reflect padding of a {tuple(kernel.shape[-2:])} kernel needs H, W > k//2, got "
            f"{tuple(x.shape[-2:])}; use sr_lab.degradation.filters.filter2d (periodic reflection)"
        )
    return kornia.filters.filter2d(x, kernel, border_type="reflect")

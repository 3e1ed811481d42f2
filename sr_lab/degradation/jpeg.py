"""JPEG compression simulation in the style of BasicSR's ``DiffJPEG(differentiable=False)``.

Used by Real-ESRGAN (Wang et al. 2021) for both JPEG stages; spec §1.6. Own implementation:

1. RGB [0,1] -> x255 -> JFIF full-range YCbCr (0.299/0.587/0.114, Cb/Cr offset 128).
2. Chroma 4:2:0 by 2x2 average pooling; luma kept at full resolution.
3. 8x8 blocks, orthonormal 2-D DCT-II of (value - 128).
4. Quantisation with the Annex-K luma/chroma tables scaled by the *continuous* factor
   ``(5000/q if q < 50 else 200 - 2q) / 100`` (no floor, no [1, 255] clipping of table entries);
   hard ``torch.round`` (or BasicSR's cubic "differentiable" rounding on request).
5. Dequantise, inverse DCT, chroma upsampling by 2x2 pixel repetition, YCbCr -> RGB,
   clamp to [0, 255], /255.
The image is zero-padded (bottom/right) to multiples of 16 and cropped back. The quality may be a
float or a per-sample float tensor (B,).

Why not ``kornia.enhance.jpeg_codec_differentiable`` (spec §3.1): it always uses the polynomial
rounding ``round(x) + (x - round(x))^3``, a differentiable floor and soft [1, 255] clip of the
scaled tables (libjpeg-like), antialiased-bilinear chroma downsampling and bilinear upsampling,
replicate padding to 16, and a hard [0, 1] clamp inside its YCbCr -> RGB (kornia 0.9.0); it is therefore not BasicSR's
DiffJPEG, which the Real-ESRGAN/StableSR/CCSR training pipelines use.

Layout note: BasicSR stores the luma table *transposed* relative to Annex K (``y_table = ... .T``)
and applies it to coefficient blocks indexed [vertical freq, horizontal freq]. We reproduce that by
default (``transpose_luma_table=True``); set it False for the standard orientation. The chroma table
is symmetric. At q = 100 exactly BasicSR divides by a zero table (NaN output); here a zero table
entry means "no quantisation", the q -> 100 limit.

Quality 100 is *not* the identity: with no quantisation the DCT round trip is lossless (to float
rounding), but the chroma 4:2:0 step (2x2 average of Cb/Cr, then 2x2 repetition) and the [0, 255]
clamp after YCbCr -> RGB still act, so every colour edge changes. On a 64x64 crop of scikit-image's
``astronaut`` (float32) the change is 1.45/255 on average and 15.8/255 at most (tested); it is ~0
only on images whose chroma is constant on 2x2 blocks. Nothing is rounded at q = 100 (the
coefficients are left unquantised, and input and output are never rounded to 8 bits at any
quality), unlike a real JPEG codec at quality 100, which also rounds coefficients and pixels.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "JPEG_LUMA_TABLE",
    "JPEG_CHROMA_TABLE",
    "quality_to_factor",
    "rgb_to_ycbcr_jfif",
    "ycbcr_jfif_to_rgb",
    "dct_matrix",
    "block_dct",
    "block_idct",
    "diff_jpeg",
    "DiffJPEG",
]

#: ITU-T T.81 Annex K, Table K.1 (luminance), row = vertical frequency, column = horizontal.
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
#: ITU-T T.81 Annex K, Table K.2 (chrominance).
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136, -0.714136),
    (1.0, 1.772, 0.0),
)


def quality_to_factor(quality: Tensor) -> Tensor:
    """Continuous quantisation-table scale for JPEG quality ``q`` (BasicSR ``quality_to_factor``; spec §1.6).

    ``(5000/q if q < 50 else 200 - 2q) / 100``, element-wise, no rounding or clipping.
    """
    return torch.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality) / 100.0


def rgb_to_ycbcr_jfif(x: Tensor) -> Tensor:
    """JFIF full-range RGB -> YCbCr on (B, 3, H, W) in [0, 255] (spec §1.6)."""
    c = _constants(x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", c["rgb_to_ycbcr"], x) + c["shift"]


def ycbcr_jfif_to_rgb(x: Tensor) -> Tensor:
    """JFIF full-range YCbCr -> RGB on (B, 3, H, W) in [0, 255] (inverse of :func:`rgb_to_ycbcr_jfif`)."""
    c = _constants(x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", c["ycbcr_to_rgb"], x - c["shift"])


def dct_matrix(n: int = 8, device=None, dtype=torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix ``D[u, x] = c_u cos((2x+1) u pi / 2n)`` (JPEG's 8x8 DCT; spec §1.6).

    ``D @ X @ D.T`` is the 2-D JPEG forward DCT of a block ``X``, ``D.T @ F @ D`` its inverse.
    """
    u = torch.arange(n, dtype=torch.float64).view(-1, 1)
    x = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos((2 * x + 1) * u * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def _to_blocks(plane: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H/8, W/8, 8, 8)."""
    b, c, h, w = plane.shape
    return plane.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)


def _from_blocks(blocks: Tensor) -> Tensor:
    """(B, C, H/8, W/8, 8, 8) -> (B, C, H, W)."""
    b, c, nh, nw = blocks.shape[:4]
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * 8, nw * 8)


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Tables and matrices, built once per (device, dtype) so no host->device copy happens per call."""
    d = dct_matrix(8, dtype=torch.float64)
    luma = torch.tensor(JPEG_LUMA_TABLE, dtype=dtype)
    consts = {
        "dct_kron": torch.kron(d, d).to(dtype),  # row-major vec(D X D^T) = kron(D, D) vec(X)
        "luma": luma,
        "luma_t": luma.T.contiguous(),
        "chroma": torch.tensor(JPEG_CHROMA_TABLE, dtype=dtype),
        "rgb_to_ycbcr": torch.tensor(_RGB_TO_YCBCR, dtype=dtype),
        "ycbcr_to_rgb": torch.tensor(_YCBCR_TO_RGB, dtype=dtype),
        "shift": torch.tensor((0.0, 128.0, 128.0), dtype=dtype).view(1, 3, 1, 1),
    }
    return {k: v.to(device) for k, v in consts.items()}


def _dct_kron(device, dtype) -> Tensor:
    """(64, 64) matrix ``kron(D, D)``: row-major ``vec(D @ X @ D.T) = kron(D, D) @ vec(X)``."""
    return _constants(device, dtype)["dct_kron"]


def block_dct(blocks: Tensor) -> Tensor:
    """Orthonormal 2-D DCT ``D @ X @ D.T`` of the trailing 8x8 dims (JPEG forward DCT, no -128 shift; spec §1.6).

    Computed as one (N, 64) x (64, 64) matrix product for speed.
    """
    k = _dct_kron(blocks.device, blocks.dtype)
    return (blocks.reshape(-1, 64) @ k.T).reshape(blocks.shape)


def block_idct(coeffs: Tensor) -> Tensor:
    """Inverse of :func:`block_dct` (``D.T @ F @ D``), JPEG 8x8 IDCT as in BasicSR DiffJPEG (spec §1.6)."""
    k = _dct_kron(coeffs.device, coeffs.dtype)
    return (coeffs.reshape(-1, 64) @ k).reshape(coeffs.shape)


def _round(x: Tensor, differentiable: bool) -> Tensor:
    r = torch.round(x)
    return r + (x - r) ** 3 if differentiable else r


def _quantise_plane(plane: Tensor, table: Tensor, differentiable: bool) -> Tensor:
    """DCT -> quantise/dequantise with ``table`` (B, 1, 1, 1, 8, 8) -> IDCT, on a level-shifted plane."""
    coeffs = block_dct(_to_blocks(plane - 128.0))
    quantised = _round(coeffs / torch.where(table > 0, table, torch.ones_like(table)), differentiable) * table
    coeffs = torch.where(table > 0, quantised, coeffs)
    return _from_blocks(block_idct(coeffs)) + 128.0


def diff_jpeg(
    x: Tensor,
    quality: float | Tensor,
    *,
    differentiable: bool = False,
    transpose_luma_table: bool = True,
) -> Tensor:
    """JPEG-compress and decode ``x`` (B, 3, H, W) in [0, 1] at ``quality`` (float or (B,) tensor).

    Own implementation of BasicSR ``DiffJPEG`` as used by Real-ESRGAN (Wang et al. 2021); spec §1.6
    (see the module docstring for every step, and for why kornia's JPEG is not used). Output in
    [0, 1], same shape. ``differentiable=False`` (the training pipelines' setting) uses hard
    ``torch.round``. The input is not clamped (the pipeline clamps before calling). Quality 100
    skips quantisation but is not the identity (chroma 4:2:0 and the output clamp remain; see the
    module docstring).
    """
    b, c, h, w = x.shape
    if c != 3:
        raise ValueError(f"x: expected 3 channels, got {c}")
    q = torch.as_tensor(quality, dtype=x.dtype, device=x.device).reshape(-1)
    if q.numel() not in (1, b):
        raise ValueError(f"quality: expected a float or a tensor of shape ({b},), got {tuple(q.shape)}")
    factor = quality_to_factor(q).expand(b).reshape(b, 1, 1, 1, 1, 1)

    consts = _constants(x.device, x.dtype)
    luma = consts["luma_t"] if transpose_luma_table else consts["luma"]
    chroma = consts["chroma"]

    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(x, (0, pw, 0, ph), mode="constant", value=0.0)
    ycc = rgb_to_ycbcr_jfif(x * 255.0)
    y = _quantise_plane(ycc[:, :1], luma * factor, differentiable)
    cbcr = F.avg_pool2d(ycc[:, 1:], kernel_size=2, stride=2)
    cbcr = _quantise_plane(cbcr, chroma * factor, differentiable)
    cbcr = cbcr.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    rgb = ycbcr_jfif_to_rgb(torch.cat([y, cbcr], dim=1))
    return (torch.clamp(rgb, 0.0, 255.0) / 255.0)[..., :h, :w]


class DiffJPEG(nn.Module):
    """Module wrapper of :func:`diff_jpeg` (BasicSR ``DiffJPEG``-style, Real-ESRGAN; spec §1.6)."""

    def __init__(self, differentiable: bool = False, transpose_luma_table: bool = True):
        super().__init__()
        self.differentiable = bool(differentiable)
        self.transpose_luma_table = bool(transpose_luma_table)

    def forward(self, x: Tensor, quality: float | Tensor) -> Tensor:
        """Compress/decode ``x`` (B, 3, H, W) in [0, 1] at per-sample ``quality``."""
        return diff_jpeg(x, quality, differentiable=self.differentiable, transpose_luma_table=self.transpose_luma_table)

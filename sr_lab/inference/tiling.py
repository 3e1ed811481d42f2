"""Tiled inference: StableSR progressive patch aggregation for the denoiser, tiled VAE encode/decode.

**Aggregation sampling** (StableSR paper 001, Sec. 3.3, Eq. 7, Alg. 1, App. B). At every sampler call
the latent Z^(t) is split into overlapping tiles Ω_n, the model runs on every tile (several tiles per
batched call), and the tile predictions are merged as

    ε(Z^(t), F, t) = Σ_n  w_Ωn / ŵ ⊙ f(ε(Z_Ωn^(t), F_Ωn, t)),   ŵ = Σ_n w_Ωn,

with w_Ωn a Gaussian weight map inside Ω_n (0 outside) and f the zero padding to the full latent. The
sampler then takes its step on the whole latent, so every sampler works unchanged (Alg. 1, line 8).
The last row/column of tiles is shifted inward to end at the border (App. B, Fig. 19: the overlap at
the right/bottom grows) so the size never changes. :class:`TiledModel` wraps any
``model(x, t, cond) -> ε``; condition tensors that are spatial — last two dims equal to the latent's,
or an integer multiple k of them (pixel-space maps) — are cropped to each tile (box × k), other
batch-shaped tensors (``context``) are repeated per tile.

Gaussian weights (:func:`gaussian_weights`): per axis of length L, index i = 0..L−1,
g(i) = exp(−(i − c)² / L² / (2 · var)) / sqrt(2π · var), var = 0.01, and w = outer(g_rows, g_cols).
The authors' ``_gaussian_weights`` (IceClear/StableSR ``ldm/models/diffusion/ddpm.py``, ``ddim.py`` and
``scripts/util_image.py``) uses c = (W − 1)/2 for the columns but c = H/2 for the rows (``midpoint =
latent_height / 2``), i.e. their map is shifted half a pixel downwards. sr_lab's default
``centre="symmetric"`` uses c = (L − 1)/2 on both axes (the map is invariant under flips, so the top
and bottom of a tile are weighted alike); ``centre="authors"`` reproduces their map exactly. Columns
are identical; row i of the authors' map is the symmetric row times exp((a − 1/4) / (2 · var · H²))
with a = i − (H − 1)/2, e.g. for H = 64, var = 0.01 from ×0.68 (top row) to ×1.46 (bottom row), so
the tiled output differs wherever tiles overlap vertically (one tile covering the latent: identical).

**Tiled VAE** (a separate need for large images, methods.md): :func:`tiled_encode` and
:func:`tiled_decode` split the image (pixel space, tiles and overlaps multiples of the VAE factor) or
the latent into overlapping tiles, run the encoder/decoder per tile and blend with feathered (linear
ramp) weights normalised by their per-pixel sum. :func:`tiled_vae_encode` temporarily routes
``backbone.encode`` through the tiled version so every adapter's ``condition`` uses it unchanged.

When one tile covers the whole input all of these equal the untiled call (to float rounding).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

Box = tuple[int, int, int, int]  # (y0, x0, height, width)
NOT_SPATIAL = ("context", "uncond_context")


# -- tile layout --------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` with at least ``overlap`` shared pixels along an axis of
    ``length``; the last tile is shifted inward to end exactly at ``length`` (StableSR App. B)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """Row-major tiles covering a (height, width) map; all tiles have the same size."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


CENTRES = ("symmetric", "authors")


def _check_centre(centre: str) -> str:
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
    return centre


def gaussian_weights(height: int, width: int, var: float = 0.01, device=None,
                     dtype: torch.dtype = torch.float32, centre: str = "symmetric") -> torch.Tensor:
    """Gaussian weight map w_Ω of StableSR Eq. 7 for one (height, width) tile, computed in float64.

    Per axis of length L: g(i) = exp(−(i − c)² / L² / (2 var)) / sqrt(2π var); w = outer(g_rows, g_cols).

    * ``centre="symmetric"`` (default): c = (L − 1)/2 on both axes, the exact centre of the index range,
      so the map is symmetric under vertical and horizontal flips (a mathematically centred window).
      It is the default because the authors' own comment on the width (``(latent_width - 1) / 2  #
      -1 because index goes from 0 to latent_width - 1``) states this intent; their row centre lacks
      the ``- 1``, an off-by-half in rows only.
    * ``centre="authors"``: IceClear/StableSR ``_gaussian_weights`` as written (columns centred at
      (W − 1)/2, rows at H/2 via ``midpoint = latent_height / 2``; same float64 formula, equal to
      float64 rounding), to reproduce their aggregation outputs.
    """
    _check_centre(centre)

    def axis(n: int, mid: float) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        return torch.exp(-(i - mid) ** 2 / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)

    row_mid = height / 2 if centre == "authors" else (height - 1) / 2
    return torch.outer(axis(height, row_mid), axis(width, (width - 1) / 2)).to(device=device, dtype=dtype)


def feather_weights(height: int, width: int, ramp: int, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear-ramp (feathered) weights, 1 inside and falling to 1/(ramp+1) at the tile border over
    ``ramp`` pixels; strictly positive."""
    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        edge = torch.minimum(i + 1, n - i)
        return (edge / (ramp + 1)).clamp(max=1.0) if ramp > 0 else torch.ones(n, dtype=torch.float64)

    return torch.outer(axis(height), axis(width)).to(device=device, dtype=dtype)


def weight_sum(boxes: list[Box], weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ŵ = Σ_n w_Ωn (zero padded) over the full map."""
    total = torch.zeros(height, width, dtype=weight.dtype, device=weight.device)
    for y, x, th, tw in boxes:
        total[y:y + th, x:x + tw] += weight
    return total


def aggregation_weights(height: int, width: int, tile: int, overlap: int, var: float = 0.01,
                        centre: str = "symmetric") -> tuple[list[Box], list[torch.Tensor]]:
    """The normalised full-size maps w_Ωn / ŵ of StableSR Eq. 7 (they sum to 1 at every pixel);
    ``centre`` as in :func:`gaussian_weights`."""
    boxes = tile_boxes(height, width, tile, overlap)
    w = gaussian_weights(boxes[0][2], boxes[0][3], var, dtype=torch.float64, centre=centre)
    total = weight_sum(boxes, w, height, width)
    maps = []
    for y, x, th, tw in boxes:
        m = torch.zeros(height, width, dtype=torch.float64)
        m[y:y + th, x:x + tw] = w
        maps.append(m / total)
    return boxes, maps


# -- aggregation sampling -----------------------------------------------------------------------
def _spatial_factor(v: torch.Tensor, height: int, width: int) -> int:
    """k >= 1 if the last two dims of ``v`` are k × (height, width), else 0."""
    if v.ndim != 4:
        return 0
    h, w = v.shape[-2:]
    if h % height or w % width or h // height != w // width:
        return 0
    return h // height


def crop_condition(value: Any, boxes: list[Box], batch: int, height: int, width: int, key: str = "") -> Any:
    """Per-tile condition for a batched call over ``boxes`` (tile-major: rows of tile 0, tile 1, ...):
    spatial tensors are cropped, other batch-shaped tensors repeated, everything else kept."""
    if torch.is_tensor(value):
        if value.ndim == 0 or value.shape[0] != batch:
            return value
        k = 0 if key in NOT_SPATIAL else _spatial_factor(value, height, width)
        if k:
            return torch.cat([value[..., y * k:(y + th) * k, x * k:(x + tw) * k] for y, x, th, tw in boxes])
        return torch.cat([value] * len(boxes))
    if isinstance(value, dict):
        return {k: crop_condition(v, boxes, batch, height, width, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(crop_condition(v, boxes, batch, height, width, key) for v in value)
    return value


class TiledModel:
    """``model(x, t, cond) -> ε`` evaluated by progressive patch aggregation (StableSR Eq. 7, Alg. 1).

    ``tile_size``/``overlap`` are in latent pixels (authors: 64 = 512 px tiles, overlap 32);
    ``tile_batch`` tiles are stacked into one model call. ``centre`` selects the Gaussian weight map
    (:func:`gaussian_weights`): ``"symmetric"`` (default) or ``"authors"`` (StableSR's map as written,
    rows centred at H/2). ``static_batch``: when the tiles take several calls, the last call is padded to
    ``tile_batch`` tiles (copies of its last tile, their outputs dropped), so every call has one shape and a
    compiled model (``speed.compile``) compiles once; the result is the same.
    """

    def __init__(self, model: Callable, tile_size: int = 64, overlap: int = 32, tile_batch: int = 4,
                 var: float = 0.01, centre: str = "symmetric", static_batch: bool = False):
        tile_starts(tile_size + 1, tile_size, overlap)  # validates
        if tile_batch < 1:
            raise ValueError(f"tile_batch={tile_batch} must be >= 1")
        self.model, self.tile_size, self.overlap = model, int(tile_size), int(overlap)
        self.tile_batch, self.var, self.centre = int(tile_batch), float(var), _check_centre(centre)
        self.static_batch = bool(static_batch)
        self._cache: dict = {}

    def layout(self, height: int, width: int, device, dtype) -> tuple[list[Box], torch.Tensor, torch.Tensor]:
        key = (height, width, str(device), dtype)
        if key not in self._cache:
            boxes = tile_boxes(height, width, self.tile_size, self.overlap)
            w = gaussian_weights(boxes[0][2], boxes[0][3], self.var, device=device, dtype=dtype,
                                 centre=self.centre)
            self._cache[key] = (boxes, w, weight_sum(boxes, w, height, width))
        return self._cache[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, height, width = x.shape
        boxes, w, total = self.layout(height, width, x.device, torch.float32)
        out = None
        pad = self.static_batch and len(boxes) > self.tile_batch
        for i in range(0, len(boxes), self.tile_batch):
            chunk = boxes[i:i + self.tile_batch]
            run = chunk + [chunk[-1]] * (self.tile_batch - len(chunk)) if pad else chunk
            xs = torch.cat([x[..., y:y + th, x0:x0 + tw] for y, x0, th, tw in run])
            ts = torch.cat([t] * len(run)) if t.ndim else t
            eps = self.model(xs, ts, crop_condition(cond, run, b, height, width)).float()
            if out is None:
                out = torch.zeros(b, eps.shape[1], height, width, device=x.device, dtype=torch.float32)
            for j, (y, x0, th, tw) in enumerate(chunk):
                out[..., y:y + th, x0:x0 + tw] += eps[j * b:(j + 1) * b] * w
        return out / total


# -- tiled VAE ----------------------------------------------------------------------------------
def _check_vae_tiles(tile: int, overlap: int, factor: int) -> None:
    if tile % factor or overlap % factor or not 0 <= overlap < tile:
        raise ValueError(f"VAE tile={tile}, overlap={overlap} must be multiples of the VAE factor {factor} "
                         f"with 0 <= overlap < tile")


def tiled_encode(encode_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
                 overlap: int, factor: int) -> torch.Tensor:
    """Encode (B, 3, H, W) (H, W multiples of ``factor``) tile by tile in pixel space (``tile`` and
    ``overlap`` in pixels) and blend the latent tiles with feathered weights."""
    _check_vae_tiles(tile, overlap, factor)
    height, width = image.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
    boxes = tile_boxes(height, width, tile, overlap)
    if len(boxes) == 1:
        return encode_fn(image)
    lh, lw = height // factor, width // factor
    out = total = w = None
    for y, x, th, tw in boxes:
        z = encode_fn(image[..., y:y + th, x:x + tw]).float()
        if out is None:
            out = torch.zeros(z.shape[0], z.shape[1], lh, lw, device=z.device)
            w = feather_weights(z.shape[-2], z.shape[-1], overlap // factor, device=z.device)
            total = torch.zeros(lh, lw, device=z.device)
        ly, lx = y // factor, x // factor
        out[..., ly:ly + z.shape[-2], lx:lx + z.shape[-1]] += z * w
        total[ly:ly + z.shape[-2], lx:lx + z.shape[-1]] += w
    return out / total


def tiled_decode(decode_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], latent: torch.Tensor,
                 image_cond: torch.Tensor | None, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Decode a latent tile by tile (``tile``/``overlap`` in output pixels) with
    ``decode_fn(latent_tile, image_cond_tile)``; ``image_cond`` (the upsampled LR at the output size,
    for decoders that use it, e.g. StableSR's CFW) is cropped to each tile. Feathered blending."""
    _check_vae_tiles(tile, overlap, factor)
    lh, lw = latent.shape[-2:]
    boxes = tile_boxes(lh, lw, tile // factor, overlap // factor)
    if len(boxes) == 1:
        return decode_fn(latent, image_cond)
    out = total = w = None
    for y, x, th, tw in boxes:
        cond = None if image_cond is None else \
            image_cond[..., y * factor:(y + th) * factor, x * factor:(x + tw) * factor]
        img = decode_fn(latent[..., y:y + th, x:x + tw], cond).float()
        if out is None:
            out = torch.zeros(img.shape[0], img.shape[1], lh * factor, lw * factor, device=img.device)
            w = feather_weights(img.shape[-2], img.shape[-1], overlap, device=img.device)
            total = torch.zeros(lh * factor, lw * factor, device=img.device)
        py, px = y * factor, x * factor
        out[..., py:py + img.shape[-2], px:px + img.shape[-1]] += img * w
        total[py:py + img.shape[-2], px:px + img.shape[-1]] += w
    return out / total


@contextmanager
def tiled_vae_encode(backbone, tile: int, overlap: int) -> Iterator[None]:
    """Within the block, ``backbone.encode(image01, generator, sample)`` runs tile by tile (pixel tiles
    of ``tile`` with ``overlap``), so adapters' ``condition`` methods get the tiled encoder unchanged."""
    factor = int(backbone.vae_factor)
    _check_vae_tiles(tile, overlap, factor)
    had_own = "encode" in backbone.__dict__
    original = backbone.encode

    def encode(image01: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        return tiled_encode(lambda im: original(im, generator=generator, sample=sample), image01, tile, overlap, factor)

    backbone.__dict__["encode"] = encode
    try:
        yield
    finally:
        if had_own:
            backbone.__dict__["encode"] = original
        else:
            del backbone.__dict__["encode"]

"""Robust image reading for HR training data.

``read_rgb_uint8`` always returns an ``H x W x 3`` uint8 array, converting what a photo folder may
contain in practice, and says what it converted:

* grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ... -> RGB;
* images with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) are **composited on a white
  background** (dropping alpha would expose whatever colour hides under transparent pixels, often
  black or garbage);
* 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) images are scaled to 8 bit (``/257``);
  ``I`` images whose values all fit in 0..255 are taken as 8-bit data; float (``F``) images in [0,1]
  are scaled by 255, otherwise clipped;
* 48/64-bit RGB(A) files are reduced to 8 bit per channel by Pillow when decoding (high byte kept);
* multi-frame files (TIFF, animated GIF/WebP, ...) use their first frame; GIF frames are palette
  images, converted as above (transparent pixels on white).

Truncated or undecodable files raise :class:`ImageReadError` with the reason; Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced to ``False`` while decoding, so a half-written file is
never silently padded with grey. EXIF orientation is not applied (irrelevant for random square crops).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFile

__all__ = ["ImageReadError", "read_rgb_uint8", "probe_image"]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReadError(OSError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _probe(path: str | os.PathLike) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return int(w), int(h), im.mode
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` read from the file header; raises :class:`ImageReadError` if unreadable."""
    w, h, _ = _probe(path)
    return w, h


def _decode(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """Fully decode the first frame; also report whether the file stores 16 bits per RGB channel."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.seek(0)
            args = im.tile[0].args if im.tile else ""
            raw = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
            rgb16 = im.mode in ("RGB", "RGBA") and ";16" in raw
            im.load()
            return im, rgb16
    except Exception as e:  # OSError("image file is truncated"), SyntaxError, zlib errors, ...
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _int_to_uint8(a: np.ndarray, is16: bool) -> np.ndarray:
    a = a.astype(np.float64)
    if is16 or a.max(initial=0) > 255:
        a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def read_rgb_uint8(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """Decode ``path`` to ``(H x W x 3 uint8 array, note)``; ``note`` says what was converted
    (``None`` for plain 8-bit RGB). Raises :class:`ImageReadError` for truncated/undecodable files."""
    im, rgb16 = _decode(path)
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode_note = f"palette ({mode}) -> RGB"
    else:
        mode_note = None

    if im.mode == "RGB":
        arr = np.asarray(im, dtype=np.uint8)
        note = mode_note
        if note is None and rgb16:
            note = "16-bit per channel RGB -> 8-bit RGB"
    elif im.mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        arr = np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        note = f"{mode}{' (16-bit per channel)' if rgb16 else ''} -> RGB composited on white"
    elif im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        is16 = im.mode.startswith("I;16")
        kind = "16-bit" if is16 or a.max(initial=0) > 255 else "8-bit-range"
        arr = np.repeat(_int_to_uint8(a, is16)[..., None], 3, axis=2)
        note = f"{mode} ({kind} integer) grayscale -> 8-bit RGB"
    elif im.mode == "F":
        f = np.asarray(im, dtype=np.float64)
        f = f * 255.0 if f.max(initial=0) <= 1.0 else f
        g = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        arr = np.repeat(g[..., None], 3, axis=2)
        note = "F (float) grayscale -> 8-bit RGB"
    else:  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        note = mode_note or f"{mode} -> RGB"
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(path, f"unexpected decoded shape {arr.shape} (mode {mode})")
    return np.ascontiguousarray(arr), note

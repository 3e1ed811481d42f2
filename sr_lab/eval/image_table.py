"""The LR | SR-seed-1 … SR-seed-N | HR image table of an evaluation (PNG and W&B table).

Each row is one test image (the first ``max_rows`` images scored in every run, sorted by key).
Cells are scaled to a common height (LR upscaled with nearest neighbour, as the papers' figures
show it); a missing LR (no ``lr_dir``) or HR leaves a blank cell.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sr_lab.data.paired import pair_key
from sr_lab.data.samples import find_images

from .score import EvalResult, load_image

__all__ = ["table_cells", "table_png", "table_columns", "save_png"]


def table_columns(result: EvalResult) -> list[str]:
    return ["LR"] + [f"SR {r.name}" for r in result.runs] + ["HR"]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _fit(x: torch.Tensor, height: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    size = (height, max(1, round(w * height / h)))
    if mode == "nearest":
        return F.interpolate(x.float(), size=size, mode="nearest")
    return F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)


def table_cells(result: EvalResult, lr_dir: str | None, max_rows: int = 4, height: int = 192) -> list[tuple[str, list[np.ndarray | None]]]:
    """``[(image key, [LR, SR run 1, …, SR run N, HR] uint8 HxWx3 or None)]`` for up to ``max_rows`` images."""
    lr_by_key = {pair_key(f): f for f in find_images(lr_dir, recursive=False)} if lr_dir else {}
    by = {(r["image"], r["run"]): r for r in result.rows}
    rows = []
    for key in result.common_images[:max_rows]:
        first = by[(key, result.runs[0].name)]
        cells: list[np.ndarray | None] = []
        lr = lr_by_key.get(key)
        cells.append(_to_uint8(_fit(load_image(lr), height, "nearest")) if lr else None)
        for run in result.runs:
            cells.append(_to_uint8(_fit(load_image(by[(key, run.name)]["sr_path"]), height, "smooth")))
        hr = first.get("hr_path")
        cells.append(_to_uint8(_fit(load_image(hr), height, "smooth")) if hr else None)
        rows.append((key, cells))
    return rows


def _header(columns: list[str], widths: list[int], pad: int, height: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (sum(w + 2 * pad for w in widths), height), "white")
    draw = ImageDraw.Draw(strip)
    x = 0
    for name, w in zip(columns, widths):
        draw.text((x + pad + 2, 1), name, fill=(0, 0, 0))
        x += w + 2 * pad
    return np.asarray(strip)


def table_png(rows: list[tuple[str, list[np.ndarray | None]]], pad: int = 2,
              columns: list[str] | None = None) -> np.ndarray | None:
    """Stack the cells into one HxWx3 uint8 grid (white padding, blank for missing cells), with a
    header strip naming ``columns`` if given."""
    if not rows:
        return None
    ncol = len(rows[0][1])
    widths = [max((c.shape[1] for _, cells in rows if (c := cells[j]) is not None), default=24) for j in range(ncol)]
    out_rows = []
    for _, cells in rows:
        h = max(c.shape[0] for c in cells if c is not None)
        parts = []
        for j, c in enumerate(cells):
            tile = np.full((h, widths[j], 3), 255, np.uint8)
            if c is not None:
                tile[: c.shape[0], : c.shape[1]] = c
            parts.append(np.pad(tile, ((pad, pad), (pad, pad), (0, 0)), constant_values=255))
        out_rows.append(np.concatenate(parts, axis=1))
    if columns:
        out_rows.insert(0, _header(columns, widths, pad))
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in out_rows]
    return np.concatenate(out_rows, axis=0)


def save_png(img: np.ndarray, path: str | Path) -> Path:
    from sr_lab.utils.atomic import atomic_save_image

    return atomic_save_image(path, img, format="PNG")

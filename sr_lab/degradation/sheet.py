"""``sr-degradation-sheet`` / ``make degradation-sheet``: what a degradation config produces, at a glance.

    make degradation-sheet ARGS="degradation=bsrgan seeds=8 cols=3"
    sr-degradation-sheet degradation=realesrgan image=photo.png crop=384 crop_box=[100,40] out=sheet.png

One HR crop (``crop`` px, the centre unless ``crop_box=[top,left]``) of ``image`` (default: a sample photo
shipped with scikit-image) is degraded ``seeds`` times by the configured ``degradation`` (any option of
the ``conf/degradation`` group, config ``conf/degradation_sheet.yaml``) and rendered as one PNG grid of
``cols`` tiles per row, ``gap`` px apart: first the HR crop (labelled ``HR``), then tile ``i`` = the LR
of ``make_generator(seed, "sheet", i)`` (labelled ``seed i``), upsampled by nearest neighbour to the crop
size so its pixels stay visible. The LR stays at 1/upscale size (``degradation.resize_lr_to_hr`` is
forced off where the degradation has it). The same config, image and device give the same file, byte for
byte. The file is written atomically; one line says where, which degradation and the sheet size. Bad
values (e.g. ``seeds=0``, a crop larger than the image or not a multiple of ``upscale``, an unreadable
image) are one ``config error: ...`` line on stderr, exit status 2.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sr_lab.config.validation import ConfigError
from sr_lab.train import CONF_DIR
from sr_lab.utils.seeding import make_generator

log = logging.getLogger("sr_lab.degradation_sheet")

__all__ = ["SheetResult", "validate_sheet_config", "default_image", "render_sheet", "sheet_size", "main"]

# colourful sample photos, in order of preference (scikit-image's data folder)
PREFERRED_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
BACKGROUND = (255, 255, 255)


class SheetOutputError(ConfigError):
    """``out`` cannot be written: exit 2."""
    kind = "output error"


class SheetResult(NamedTuple):
    path: Path
    width: int
    height: int
    degradation: str


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sheet_size(n_tiles: int, cols: int, crop: int, gap: int) -> tuple[int, int]:
    """(width, height) in px of a sheet of ``n_tiles`` square tiles: ``min(cols, n_tiles)`` per row."""
    c = min(cols, n_tiles)
    r = math.ceil(n_tiles / c)
    return c * crop + (c - 1) * gap, r * crop + (r - 1) * gap


def validate_sheet_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key) on the first invalid value that needs no image."""
    from sr_lab.eval.testset import check_upscale_and_seed

    up = check_upscale_and_seed(cfg)
    for key in ("seeds", "cols"):
        v = _get(cfg, key)
        if not (_int(v) and v >= 1):
            raise ConfigError(f"{key}={v} must be a positive integer")
    crop = _get(cfg, "crop")
    if not (_int(crop) and crop > 0 and crop % up == 0):
        raise ConfigError(f"crop={crop} must be a positive multiple of upscale={up}")
    gap = _get(cfg, "gap", 0)
    if not (_int(gap) and gap >= 0):
        raise ConfigError(f"gap={gap} must be a non-negative integer")
    box = _get(cfg, "crop_box")
    if box is not None:
        box = list(box) if OmegaConf.is_list(box) or isinstance(box, (list, tuple)) else box
        if not (isinstance(box, list) and len(box) == 2 and all(_int(v) and v >= 0 for v in box)):
            raise ConfigError(f"crop_box={box} must be null or [top, left] (non-negative integers)")
    if not isinstance(_get(cfg, "label"), bool):
        raise ConfigError(f"label={_get(cfg, 'label')} must be true or false")
    out = str(_get(cfg, "out") or "").strip()
    if not out:
        raise ConfigError("out is required")
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"out={out} must be a .png file")
    dev = str(_get(cfg, "device"))
    if dev not in ("auto", "cpu") and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev} must be auto, cpu, cuda or cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev} but CUDA is not available on this machine")


def default_image() -> str:
    """A colourful sample photo shipped with scikit-image (the first of :data:`PREFERRED_SAMPLES` present,
    else the first image of the folder)."""
    from sr_lab.data import find_images, sample_image_dir

    try:
        files = find_images(sample_image_dir())
    except FileNotFoundError as exc:
        raise ConfigError(f"image=null: {exc}") from None
    if not files:
        raise ConfigError("image=null: the scikit-image sample folder holds no image; set image=<file>")
    by_stem = {Path(f).stem: f for f in files}
    return next((by_stem[s] for s in PREFERRED_SAMPLES if s in by_stem), files[0])


def _read(path: str) -> np.ndarray:
    from sr_lab.data.images import ImageReadError, read_rgb_uint8

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"image={path} is not a file" if p.exists() else f"image={path} does not exist")
    try:
        arr, _ = read_rgb_uint8(p)
    except ImageReadError as exc:
        raise ConfigError(f"image={path} cannot be read: {exc.reason}") from None
    return arr


def _device(cfg: DictConfig) -> torch.device:
    dev = str(cfg.device)
    if dev == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev)


def _build_degradation(cfg: DictConfig, device: torch.device):
    dcfg = cfg.degradation
    if "resize_lr_to_hr" in dcfg:  # LR at 1/upscale size; only where the degradation has the option
        with open_dict(dcfg):
            dcfg.resize_lr_to_hr = False
    try:
        deg = hydra.utils.instantiate(dcfg)
    except Exception as exc:  # the degradation classes validate their arguments (ValueError naming it)
        raise ConfigError(f"degradation: {exc.__cause__ or exc}") from None
    if hasattr(deg, "resize_lr_to_hr"):
        deg.resize_lr_to_hr = False
    return deg.to(device) if hasattr(deg, "to") else deg


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> H x W x 3 uint8 (as ``sr-make-testset`` saves it)."""
    return (x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _font(crop: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(10, crop // 24))
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the bitmap font
        return ImageFont.load_default()


def _label(tile, text: str, font) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(tile)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = 2
    draw.rectangle((0, 0, x1 - x0 + 2 * pad - 1, y1 - y0 + 2 * pad - 1), fill=(0, 0, 0))
    draw.text((pad - x0, pad - y0), text, fill=(255, 255, 255), font=font)


def render_sheet(cfg: DictConfig, name: str | None = None) -> SheetResult:
    """Render the sheet described by ``cfg`` (``conf/degradation_sheet.yaml``) and write it to ``cfg.out``.

    ``name``: the degradation's name for the summary (the Hydra choice); default: its class name."""
    from PIL import Image

    from sr_lab.utils.atomic import atomic_save_image

    validate_sheet_config(cfg)
    crop, cols, gap, seeds, seed = int(cfg.crop), int(cfg.cols), int(cfg.gap), int(cfg.seeds), int(cfg.seed)
    src = str(cfg.image) if cfg.get("image") is not None else default_image()
    arr = _read(src)
    h, w = arr.shape[:2]
    if crop > h or crop > w:
        raise ConfigError(f"crop={crop} is larger than the image ({w}x{h}, image={src})")
    box = cfg.get("crop_box")
    top, left = ((h - crop) // 2, (w - crop) // 2) if box is None else (int(box[0]), int(box[1]))
    if top + crop > h or left + crop > w:
        raise ConfigError(f"crop_box=[{top}, {left}] with crop={crop} does not fit the image ({w}x{h}, image={src})")
    hr_arr = np.ascontiguousarray(arr[top : top + crop, left : left + crop])

    device = _device(cfg)
    deg = _build_degradation(cfg, device)
    if name is None:
        name = str(_get(cfg, "degradation._target_", type(deg).__name__)).rsplit(".", 1)[-1]
    hr = (torch.from_numpy(hr_arr).permute(2, 0, 1)[None].float() / 255.0).to(device)

    tiles = [("HR", Image.fromarray(hr_arr))]
    for i in range(seeds):
        g = make_generator(seed, "sheet", i, device=device)
        try:
            with torch.no_grad():
                lr = deg(hr, g)["lr"]
        except ValueError as exc:  # e.g. a degradation.scale that does not divide the crop
            raise ConfigError(f"degradation: {exc}") from None
        tile = Image.fromarray(_to_uint8(lr))
        if tile.size != (crop, crop):
            tile = tile.resize((crop, crop), Image.NEAREST)
        tiles.append((f"seed {i}", tile))

    width, height = sheet_size(len(tiles), cols, crop, gap)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    font = _font(crop) if cfg.label else None
    c = min(cols, len(tiles))
    for k, (text, tile) in enumerate(tiles):
        if font is not None:
            _label(tile, text, font)
        r, q = divmod(k, c)
        sheet.paste(tile, (q * (crop + gap), r * (crop + gap)))

    out = Path(str(cfg.out)).expanduser()
    try:
        atomic_save_image(out, sheet, format="PNG")
    except OSError as exc:
        raise SheetOutputError(f"out={out} cannot be written: {exc.strerror or exc}") from None
    return SheetResult(out, width, height, name)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="degradation_sheet")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sr_lab.utils.cli import report_cli_error

    try:
        choice = HydraConfig.get().runtime.choices.get("degradation")
        res = render_sheet(cfg, name=str(choice) if choice else None)
    except ConfigError as exc:
        report_cli_error(log, exc)  # once on stderr (and in the job's log file)
        sys.exit(2)
    print(f"{res.path}: degradation={res.degradation}, {int(cfg.seeds)} seeds, {res.width}x{res.height} px",
          flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

"""Inputs that the chained presets read from earlier stages, made on the tiny backbone for tests.

``preset_inputs(name, tmp_path_factory, backbone)`` returns the overrides a preset needs to compose,
validate and instantiate in isolation: a stage-1 export (``stage1=``, untrained adapter), latent record
shards (``records.dir=``) and, for the decoder-GAN stages, ``perceptual.allow_random_init=true`` (no
LPIPS weights in the test environment; allowed on the tiny backbone only). Artifacts are made once
per test session.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch

from helpers import compose_train

_CACHE: dict[str, Path] = {}


def stage1_export(preset: str, root: Path, backbone) -> Path:
    """``<root>/<preset>/export`` of an untrained stage-1 module of ``preset`` (config + trainable tensors)."""
    from sr_lab.train import export_trainable

    key = f"export:{preset}:{root}"
    if key not in _CACHE:
        out = root / preset
        cfg = compose_train([f"experiment={preset}", "data.crop_size=64"], out)
        module = hydra.utils.instantiate(cfg.module, backbone=backbone)
        export_trainable(module, out / "export", cfg)
        _CACHE[key] = out / "export"
    return _CACHE[key]


def fake_records(root: Path, num: int = 6, shard_size: int = 4, size: int = 64, lr_size: int = 64) -> Path:
    """Random latent records (uint8 LR/HR, float latents) in ``<root>/records``."""
    from sr_lab.data.records import shard_ranges, write_shard

    key = f"records:{root}:{num}:{shard_size}:{size}:{lr_size}"
    if key not in _CACHE:
        d = root / f"records_{num}_{shard_size}_{size}_{lr_size}"
        g = torch.Generator().manual_seed(0)
        for a, b in shard_ranges(num, shard_size):
            n = b - a
            write_shard(d, a, {"hr": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                               "lr": torch.randint(0, 256, (n, 3, lr_size, lr_size), generator=g, dtype=torch.uint8),
                               "latent": torch.randn(n, 4, size // 8, size // 8, generator=g),
                               "index": torch.arange(a, b)})
        _CACHE[key] = d
    return _CACHE[key]


def preset_inputs(name: str, tmp_path_factory, backbone) -> list[str]:
    """Overrides that make preset ``name`` self-contained (empty for presets that need nothing)."""
    if name not in ("stablesr_latents", "stablesr_cfw", "ccsr_stage2", "addsr"):
        return []
    root = _CACHE.get("root") or tmp_path_factory.mktemp("stage_inputs")
    _CACHE["root"] = root
    if name == "stablesr_latents":
        return [f"stage1={stage1_export('stablesr_stage1', root, backbone)}", f"records.dir={root / 'records_out'}"]
    if name == "stablesr_cfw":
        return [f"records.dir={fake_records(root)}", "perceptual.allow_random_init=true"]
    if name == "addsr":
        return [f"teacher={stage1_export('addsr_teacher', root, backbone)}"]
    return [f"stage1={stage1_export('ccsr_stage1', root, backbone)}", "perceptual.allow_random_init=true"]

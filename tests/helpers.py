"""Shared test utilities: compose the Hydra config the way `sr-train` does."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sr_lab.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.iterations=3", "train.val_every=100", "train.ckpt_every=100", "train.log_every=1",
        "data.crop_size=64", "data.batch_size=2", "train.total_batch_size=2", "logger=csv",
        "+trainer.enable_progress_bar=false", "sampler.steps=10"]


def compose_train(overrides: list[str], out_dir: Path | str | None = None) -> DictConfig:
    ov = list(overrides)
    if out_dir is not None:
        ov.append(f"paths.output_dir={out_dir}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose(config_name="train", overrides=ov)


def presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def random_images(b: int, seed: int = 0, size=(24, 40)):
    """``b`` seeded random RGB images in [0, 1]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, *size, generator=g)

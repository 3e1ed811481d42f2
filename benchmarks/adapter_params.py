"""Parameter counts of every control branch of an adapter at SD 2.1-base's real shape, with no weights.

The UNet and VAE are SD 2.1-base's architecture (``backbone=sd21_shape``) built on PyTorch's ``meta``
device (no memory, no download, seconds on a CPU), the adapter's branches are built on them, and the
script prints, per branch, the trainable and total parameters. It is how sr_lab's ClearSR compares with the paper's
"Trainable Param (M)" (ClearSR paper 003, App. E, Table 5: 525 M) and how a new branch's size is checked
before anyone trains it. CLIP towers cannot be built on ``meta`` by open_clip, so an image-prompt branch is
built with the tiny CLIP and its projection is counted at the configured model's embedding width.

    python benchmarks/adapter_params.py                 # adapter=clearsr
    python benchmarks/adapter_params.py adapter=controlnet
"""
from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

def count(module: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def main(overrides: list[str]) -> None:
    from sr_lab.models.backbone import build_sd21_shape
    from sr_lab.train import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="adapter_params"):
        cfg = compose(config_name="train", overrides=["adapter=clearsr", *overrides])
    branches = cfg.adapter.branches
    clip_width = {}
    for name, node in branches.items():  # CLIP towers: tiny on meta, projection counted at the real width
        if OmegaConf.select(node, "model") is not None and "tokens" in node:
            import open_clip

            clip_width[name] = int(open_clip.get_model_config(node.model)["embed_dim"])
            node.tiny, node.allow_random_init = True, True
    bb = build_sd21_shape(device="meta")  # backbone=sd21_shape without weights
    unet, vae = bb.unet, bb.vae
    with torch.device("meta"):
        runner = instantiate(cfg.adapter)(unet, vae=vae)
    print(f"SD 2.1-base shape (meta device): UNet {count(unet, False) / 1e6:.1f} M, "
          f"VAE {count(vae, False) / 1e6:.1f} M")
    print(f"{'branch':<14}{'trainable (M)':>15}{'total (M)':>12}")
    total = 0
    for name, b in runner.branches.items():
        tr, al = count(b, True), count(b, False)
        if name in clip_width:  # Linear(embed -> tokens x width) + LayerNorm(width) at the real embedding width
            proj = clip_width[name] * b.tokens * b.width + b.tokens * b.width + 2 * b.width
            tr, al = proj, proj
            name = f"{name}*"
        total += tr
        print(f"{name:<14}{tr / 1e6:>15.1f}{al / 1e6:>12.1f}")
    print(f"{'total':<14}{total / 1e6:>15.1f}")
    if clip_width:
        print("* projection only, at the CLIP embedding width of the configured model; the frozen CLIP tower "
              "is not counted")


if __name__ == "__main__":
    main(sys.argv[1:])

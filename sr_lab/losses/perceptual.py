"""LPIPS perceptual loss (VGG, v0.1) for the decoder-GAN stages, from LOCAL weights only.

The LDM autoencoder loss that StableSR's CFW and CCSR's stage 2 reuse (``LPIPSWithDiscriminator``)
uses taming's LPIPS: a frozen ImageNet VGG16 trunk plus the LPIPS v0.1 linear heads, on images in
[-1, 1]. sr_lab builds the same network with torchmetrics' LPIPS architecture
(``torchmetrics.functional.image.lpips._NoTrainLpips``; the linear heads ship inside torchmetrics)
and loads the VGG16 trunk from the torchvision file ``vgg16-397923af.pth`` found by
:func:`sr_lab.utils.weights.find_weight` (``$SR_LAB_WEIGHTS``, the torch hub cache, or
``perceptual.weights_dir``). Nothing is downloaded.

A missing trunk raises :class:`~sr_lab.utils.weights.MissingWeights` (the config check calls
:func:`check_lpips_weights` before anything is built) unless ``allow_random_init`` is set — a switch
for smoke runs on the ``tiny`` backbone only (the config check rejects it with a real backbone): the
trunk then keeps a seeded random initialisation and the loss means nothing.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from sr_lab.utils.weights import MissingWeights, find_weight

log = logging.getLogger(__name__)

__all__ = ["LPIPSLoss", "check_lpips_weights", "VGG16_FILE", "VGG16_URL"]

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision vgg16.features index -> torchmetrics/LPIPS slice
_SLICES = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30))]


def check_lpips_weights(weights_dir: str | None = None) -> Path:
    """Path of the VGG16 trunk weights or :class:`MissingWeights` (what to put where)."""
    return find_weight(VGG16_FILE, weights_dir, purpose="LPIPS VGG16 trunk of the decoder GAN loss",
                       url_hint=VGG16_URL)


def _trunk_state(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in torchvision_state.items():
        if not k.startswith("features."):
            continue
        _, idx, name = k.split(".")
        for s, rng in _SLICES:
            if int(idx) in rng:
                out[f"net.slice{s}.{idx}.{name}"] = v
    return out


class LPIPSLoss(nn.Module):
    """``forward(x, y)`` with images in [-1, 1] → LPIPS per image, shape (B,). Frozen, always eval."""

    def __init__(self, net: str = "vgg", weights_dir: str | None = None, allow_random_init: bool = False,
                 seed: int = 0):
        super().__init__()
        if net != "vgg":
            raise ValueError(f"perceptual.net={net!r}: only 'vgg' (the LDM / taming LPIPS) is supported")
        import torchmetrics.functional.image.lpips as tm_lpips

        try:
            path = check_lpips_weights(weights_dir)
        except MissingWeights:
            if not allow_random_init:
                raise
            log.warning("LPIPS: %s not found, using a RANDOM VGG16 trunk (perceptual.allow_random_init=true; "
                        "smoke runs on the tiny backbone only)", VGG16_FILE)
            path = None
        # Built on the meta device (torchvision would otherwise initialise VGG16's 120M-parameter classifier
        # only to drop it), then materialised and filled: trunk from `path`, heads from torchmetrics' file.
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            lpips = tm_lpips._NoTrainLpips(pretrained=False, net="vgg", pnet_rand=True)
        lpips.to_empty(device="cpu")
        lpips.scaling_layer = tm_lpips.ScalingLayer()
        heads = Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth"
        state = {k: v for k, v in torch.load(heads, map_location="cpu", weights_only=True).items()
                 if k.startswith("lin")}
        if path is not None:
            state.update(_trunk_state(torch.load(path, map_location="cpu", weights_only=True)))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for m in lpips.net.modules():
                    if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
        result = lpips.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if (k.startswith("lin") and not k.startswith("lins."))
                   or (path is not None and k.startswith("net."))]
        if missing:
            raise ValueError(f"LPIPS weights incomplete (missing {missing[:3]}; is {path} a torchvision VGG16 file?)")
        self.lpips = lpips
        self.random_trunk = path is None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x.float(), y.float(), normalize=False).reshape(x.shape[0])

"""PatchGAN discriminator, hinge losses and the LDM adaptive generator weight.

The decoder stages (StableSR CFW, CCSR stage 2) train with the loss of the LDM autoencoder (Rombach et
al. 2022; ``LPIPSWithDiscriminator`` in both authors' repositories, ``ldm/modules/losses/contperceptual.py``):
L1 + LPIPS + a PatchGAN hinge loss weighted by λ:

* discriminator: the pix2pix/taming ``NLayerDiscriminator`` — 4×4 convs, stride 2 for the first
  ``n_layers`` layers, BatchNorm, LeakyReLU 0.2, one logit per patch; weights N(0, 0.02) (BatchNorm
  γ ~ N(1, 0.02), β = 0);
* hinge: L_D = ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]), L_G = −E[D(x̂)];
* adaptive weight: λ = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4), clamped to [0, 10⁴], detached, times
  ``disc_weight``, where ``last`` is the weight of the generator's last layer (the VAE decoder's
  ``conv_out``). When that layer is frozen (CFW trains only the fusion layers) the gradient does not
  exist and the authors' code falls back to the fixed ``disc_weight`` — StableSR CFW's λ = 0.025.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NLayerDiscriminator", "weights_init", "hinge_d_loss", "hinge_g_loss", "adaptive_weight"]


def weights_init(module: nn.Module) -> None:
    """taming-transformers initialisation: convs N(0, 0.02); BatchNorm γ ~ N(1, 0.02), β = 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; LDM defaults ``in_channels=3, ndf=64, n_layers=3``)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, seed: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−E[D(x̂)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None,
                    disc_weight: float, max_weight: float = 1e4) -> torch.Tensor:
    """LDM's λ = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4), clamped to [0, max_weight], × ``disc_weight``.

    Falls back to the fixed ``disc_weight`` when ``last_layer`` is ``None`` or does not require grad
    (the authors' ``except RuntimeError`` branch)."""
    if last_layer is None or not last_layer.requires_grad:
        return torch.tensor(float(disc_weight), device=rec_loss.device)
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(rec_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach() * float(disc_weight)

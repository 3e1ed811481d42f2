"""LightningModule: GAN finetune of a latent decoder (StableSR CFW, CCSR stage 2).

Loss (the LDM autoencoder loss both authors reuse, ``LPIPSWithDiscriminator``; see
:mod:`sr_lab.losses.gan`): generator  L_G = l1·‖x − x̂‖₁ + p·LPIPS(x, x̂) + λ·(−E[D(x̂)]),
discriminator  L_D = ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]), with λ either fixed (``disc_weight``;
StableSR CFW: 0.025) or adaptive (LDM: ‖∇_last L_rec‖ / ‖∇_last L_G‖ clamped, × ``disc_weight``;
CCSR stage 2: 0.5). The GAN terms start at iteration ``disc_start`` (StableSR: 501; before it only
L1 + LPIPS train and the discriminator is not updated). Adam with betas (0.5, 0.9) for both (both
authors): ``optimizer(params)`` builds each (the config passes ``optim.optimizer``, which the presets set
to ``torch.optim.Adam``); without it, Adam with ``lr`` / ``betas`` / ``weight_decay``.

What differs between the stages is composed in:

* ``decoder`` — :class:`sr_lab.models.decoders.CFWDecoder` (only fusion layers train; ``w``) or
  :class:`sr_lab.models.decoders.VAEDecoderFinetune` (post_quant_conv + decoder train);
* ``latent_source`` — ``None``: the batch carries ``latent`` (StableSR latent records), or
  :class:`sr_lab.modules.latent_sources.TruncatedSamplerLatents` (CCSR: the frozen stage 1 samples the
  latents on the fly under ``no_grad``).

Optimisation is manual (Lightning 2): per micro-batch the generator half (discriminator toggled off)
then the discriminator half (generator toggled off); with ``accumulate`` micro-batches per iteration
both optimizers step at the end of the iteration, generator first. As in the authors' PL1 loop
(``optimizer_idx`` 0 then 1), the discriminator sees the reconstruction of the generator *after* its
step. Every iteration is two optimizer steps in Lightning's ``global_step`` (the discriminator "step"
before ``disc_start`` has no gradients and changes nothing). Under DDP the reducer is switched off and
each optimizer's gradients are all-reduced by hand before its step (two backward passes per forward,
each leaving the other half's weights without gradients); this, the steps and the accumulation
bookkeeping are the shared :class:`~sr_lab.modules.manual_optimization.ManualOptimization`.

Deviation (both authors): their reconstruction term is ``mean(|x − x̂| + p·LPIPS) / batch_size``; here
it is the plain mean, independent of the batch size (identical for the authors' batch of 1 per GPU in
StableSR CFW). The LDM ``logvar`` (frozen at 0 in both authors' runs, ``kl_weight`` 0) is dropped.

Checkpoints hold only trainable tensors (decoder part + discriminator, with its BatchNorm statistics);
all randomness comes from generators derived from (seed, micro-batch counter, rank), so a resumed run
repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sr_lab.losses.gan import adaptive_weight, hinge_d_loss, hinge_g_loss
from sr_lab.metrics.psnr_ssim import finite_mean, psnr_y, ssim_y
from sr_lab.modules.checkpointing import TrainableOnlyCheckpoint
from sr_lab.modules.manual_optimization import ManualOptimization
from sr_lab.utils.image_log import log_image, make_grid_rows
from sr_lab.utils.seeding import make_generator

log = logging.getLogger(__name__)

__all__ = ["DecoderGANFinetune"]


def _build(component: Any, backbone: nn.Module) -> Any:
    """Complete a partial component with the backbone (Hydra ``_partial_: true``)."""
    if component is None or isinstance(component, nn.Module):
        return component
    return component(backbone)


# both authors' optimiser for generator and discriminator when no ``optimizer`` factory is given
DEFAULT_OPTIMIZER = functools.partial(torch.optim.Adam, lr=5e-5, betas=(0.5, 0.9), weight_decay=0.0)


class DecoderGANFinetune(ManualOptimization, TrainableOnlyCheckpoint, pl.LightningModule):
    """``optimizer``: ``optimizer(params) -> torch.optim.Optimizer``, used for the generator and for the
    discriminator (the config's ``_partial_`` node ``optim.optimizer``); without it Adam
    (:data:`DEFAULT_OPTIMIZER`) with ``lr`` / ``betas`` / ``weight_decay`` where given."""

    capabilities = frozenset({"decoder"})  # a trained latent decoder (sr-infer decoder_checkpoint=)
    # kept float32 when speed.frozen_dtype casts the frozen backbone (sr_lab.models.speed): the trained layers
    # sit in (CFW) or replace (CCSR stage 2) the VAE decoder and are trained against its output
    speed_fp32_modules = ("backbone.vae.decoder", "backbone.vae.post_quant_conv")

    def __init__(self, backbone: nn.Module, decoder: Callable | nn.Module, discriminator: nn.Module,
                 perceptual: Callable | nn.Module | None = None, latent_source: Callable | nn.Module | None = None,
                 *, optimizer: Callable | None = None, lr: float | None = None,
                 betas: tuple[float, float] | None = None, weight_decay: float | None = None,
                 l1_weight: float = 1.0, perceptual_weight: float = 1.0, disc_weight: float = 0.5,
                 adaptive_disc_weight: bool = True, disc_start: int = 0, grad_clip: float | None = None,
                 accumulate: int = 1, seed: int = 0, val_seed: int = 1234, crop_border: int = 4,
                 val_grid_images: int = 4, run_config: dict | None = None):
        super().__init__()
        if disc_start < 0 or disc_weight < 0 or perceptual_weight < 0 or l1_weight < 0:
            raise ValueError("disc_start, disc_weight, perceptual_weight and l1_weight must be >= 0")
        self.init_manual_optimization(accumulate=accumulate, grad_clip=grad_clip, optimizer=optimizer,
                                      default_optimizer=DEFAULT_OPTIMIZER, lr=lr, betas=betas,
                                      weight_decay=weight_decay)
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.backbone = backbone
        self.decoder = _build(decoder, backbone)
        # training-only parts are built when training starts (setup), so a stage loaded for inference
        # never needs their weights or paths: the latent source (CCSR stage 2's frozen stage 1), LPIPS
        self._latent_source_factory = latent_source
        self.latent_source: nn.Module | None = latent_source if isinstance(latent_source, nn.Module) else None
        self.discriminator = discriminator
        self.discriminator.requires_grad_(True)
        # the perceptual net is built when training starts (setup), so a stage loaded for inference
        # never needs its weights
        self._perceptual_factory = perceptual
        self.perceptual: nn.Module | None = perceptual if isinstance(perceptual, nn.Module) else None
        self.l1_weight, self.perceptual_weight = float(l1_weight), float(perceptual_weight)
        self.disc_weight, self.adaptive_disc_weight = float(disc_weight), bool(adaptive_disc_weight)
        self.disc_start = int(disc_start)
        self.seed, self.val_seed = int(seed), int(val_seed)
        self.crop_border, self.val_grid_images = int(crop_border), int(val_grid_images)
        self.run_config = run_config

    # -- the stage interface ------------------------------------------------------------------------
    @property
    def w(self) -> float:
        """CFW fusion weight used by :meth:`decode_latent` (only for decoders that have one)."""
        if not hasattr(self.decoder, "w"):
            raise AttributeError(f"{type(self.decoder).__name__} has no fusion weight w")
        return self.decoder.w

    @w.setter
    def w(self, value: float) -> None:
        if not hasattr(self.decoder, "w"):
            raise AttributeError(f"{type(self.decoder).__name__} has no fusion weight w")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"w={value} must be in [0, 1]")
        self.decoder.w = float(value)

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor, lr01: torch.Tensor | None = None) -> torch.Tensor:
        """Latent (scaled, as sampled) → SR image in [0, 1], with this stage's decoder (CFW at ``w``)."""
        x = self.decoder.reconstruct(self.backbone, latent, lr01)
        return ((x + 1) / 2).clamp(0, 1)

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return 2  # generator + discriminator

    # trainable_parameters / configure_run: ManualOptimization

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.trainable_parameters())

    # -- training -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.latent_source is None and self._latent_source_factory is not None:
            self.latent_source = _build(self._latent_source_factory, self.backbone)
        if stage == "fit" and self.perceptual is None and self._perceptual_factory is not None \
                and self.perceptual_weight > 0:
            self.perceptual = self._perceptual_factory()

    def configure_optimizers(self):
        """[generator, discriminator], each built by ``optimizer_factory`` (Adam for both authors)."""
        gen = self.optimizer_factory(self.generator_parameters())
        disc = self.optimizer_factory(self.discriminator.parameters())
        return [gen, disc]

    # on_train_start (DDP reducer off), on_train_end (replicas in sync; weights, not BN statistics),
    # step_optimizer (all-reduce under DDP, clip, step, zero): ManualOptimization

    def inputs(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent, LR in [0, 1], HR in [0, 1]) of a batch; latents from the batch or the latent source."""
        hr, lr = batch["hr"], batch["lr"]
        if self.latent_source is None:
            if "latent" not in batch:
                raise RuntimeError("this decoder stage samples its latents with a frozen stage 1, built when "
                                   "training starts (setup('fit')); the batch carries no 'latent'")
            latent = batch["latent"]
        else:
            latent = self.latent_source(self.backbone, hr, lr, generator)
        return latent.float(), lr, hr

    def reconstruction_loss(self, rec: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"l1": (rec - x).abs().mean()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            terms["lpips"] = self.perceptual(rec, x).mean()
        return terms

    def gan_active(self, iteration: int) -> bool:
        return iteration >= self.disc_start

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.disable_ddp_reducer()  # Lightning's forward redirection turns it back on after every step
        gen = make_generator(self.seed, "train", self._micro, self.global_rank, device=batch["hr"].device)
        latent, lr, hr = self.inputs(batch, gen)
        x = hr * 2 - 1
        opt_g, opt_d = self.optimizers()
        iteration = self.current_iteration()
        last_micro = self.is_last_micro()
        gan = self.gan_active(iteration)
        b = hr.shape[0]

        # generator half (the discriminator's weights are toggled off)
        self.toggle_optimizer(opt_g)
        rec = self.decoder.reconstruct(self.backbone, latent, lr, w=getattr(self.decoder, "train_w", None))
        terms = self.reconstruction_loss(rec, x)
        rec_loss = self.l1_weight * terms["l1"] + self.perceptual_weight * terms.get("lpips", 0.0)
        loss_g = rec_loss
        logs = {f"train/{k}": v.detach() for k, v in terms.items()}
        if gan:
            g_loss = hinge_g_loss(self.discriminator(rec))
            last = self.decoder.last_layer(self.backbone) if self.adaptive_disc_weight else None
            lam = adaptive_weight(rec_loss, g_loss, last, self.disc_weight)
            loss_g = rec_loss + lam * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": lam.detach()})
        self.manual_backward(loss_g / self.accumulate)
        if last_micro:
            self.step_optimizer(opt_g)
        self.untoggle_optimizer(opt_g)

        # discriminator half (sees the generator after its step, as the authors' PL1 loop)
        if gan:
            self.toggle_optimizer(opt_d)
            with torch.no_grad():
                fake = self.decoder.reconstruct(self.backbone, latent, lr, w=getattr(self.decoder, "train_w", None)) \
                    if last_micro else rec.detach()
            logits_real, logits_fake = self.discriminator(x), self.discriminator(fake)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.manual_backward(d_loss / self.accumulate)
            self.untoggle_optimizer(opt_d)
            logs.update({"train/d_loss": d_loss.detach(), "train/logits_real": logits_real.detach().mean(),
                         "train/logits_fake": logits_fake.detach().mean()})
        if last_micro:
            self.step_optimizer(opt_d)  # before disc_start: no gradients, a counted no-op
        self._micro += 1
        self.log_dict(logs, batch_size=b)
        self.log("train/loss", loss_g.detach(), prog_bar=True, batch_size=b)
        return loss_g.detach()

    # -- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        gen = make_generator(self.val_seed, "val", batch_idx, device=batch["hr"].device)
        with torch.no_grad():
            latent, lr, hr = self.inputs(batch, gen)
            sr = self.decode_latent(latent, lr)
        b = hr.shape[0]
        lr_up = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        metrics = {"val/psnr_y": finite_mean(psnr_y(sr, hr, self.crop_border)),
                   "val/ssim_y": float(ssim_y(sr, hr, self.crop_border).mean()),
                   "val/psnr_y_bicubic": finite_mean(psnr_y(lr_up, hr, self.crop_border))}
        if self.perceptual is not None:
            metrics["val/lpips"] = float(self.perceptual(sr * 2 - 1, hr * 2 - 1).mean())
        if hasattr(self.decoder, "w") and self.decoder.w != 0:
            plain = ((self.decoder.reconstruct(self.backbone, latent, lr, w=0.0) + 1) / 2).clamp(0, 1)
            metrics["val/psnr_y_w0"] = finite_mean(psnr_y(plain, hr, self.crop_border))
        self.log_dict(metrics, sync_dist=True, batch_size=b)
        if batch_idx == 0 and self.trainer is not None and self.val_grid_images > 0:
            n = min(b, self.val_grid_images)
            log_image(self.trainer, "val/lr_sr_hr", make_grid_rows([[lr_up[i], sr[i], hr[i]] for i in range(n)]),
                      caption="LR (bicubic) | SR | HR")

    # -- checkpoints ----------------------------------------------------------------------------------
    # trainable_state_keys / on_save_checkpoint / on_load_checkpoint: TrainableOnlyCheckpoint

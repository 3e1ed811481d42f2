"""LightningModule: train a conditioning adapter on a frozen latent-diffusion backbone.

Serves every "diffusion finetune" stage: CCSR stage 1 (ControlNet + NUTL loss, CCSR paper 000
Sec. 3.2), StableSR stage 1 (time-aware SFT adapter + eps loss), ClearSR (DPM/GSPM adapters). What
differs between them is composed in, never branched on: the backbone, the adapter, the loss (whose
``parts()`` are the loss terms), and the validation sampler (``model(x, t, cond) -> ε̂`` callable).

Optimisation is manual (Lightning 2 has no ``optimizer_idx``):

* ``optimizer_mode="alternate"`` (default, the authors' behaviour): one optimizer (AdamW, as the
  authors) per loss part over the same trainable weights, each with its own state, stepped in turn
  on every batch — CCSR trains the eps part and the t = T part (Eq. 3) with two optimizers
  alternating (PL1 ``optimizer_idx`` 0/1). Lightning counts every optimizer step in ``global_step``,
  so an iteration is ``len(parts)`` global steps.
* ``optimizer_mode="combined"``: the parts are summed into one loss under one optimizer.

The optimizers are built by ``optimizer`` (``optimizer(params) -> Optimizer``; the config passes the
``_partial_`` node ``optim.optimizer``); without it, AdamW with ``lr`` / ``betas`` / ``weight_decay``
(defaults 1e-4, (0.9, 0.999), 0.01).

Gradient accumulation is done here (``accumulate`` micro-batches per iteration) since Lightning's
``accumulate_grad_batches`` does not apply to manual optimisation. With ``accumulate > 1`` in
alternate mode each part's gradients are kept apart and the optimizers step in turn at the end of
the iteration (:meth:`~sr_lab.modules.manual_optimization.ManualOptimization.swap_grads`).

Under DDP the reducer is switched off (``require_backward_grad_sync = False``, what ``no_sync`` does)
and the trainable gradients are all-reduced by hand right before each optimizer step: DDP's reducer
expects one backward per forward, while alternate mode and accumulation make several (the shared
:class:`~sr_lab.modules.manual_optimization.ManualOptimization`). FSDP shards gradients, so it supports
``optimizer_mode="combined"`` with ``accumulate == 1`` only (checked when training starts).

Checkpoints hold only trainable tensors (``on_save_checkpoint``); the frozen backbone is rebuilt from
its source. All randomness (HR latent sampling, timesteps, noise) comes from generators derived from
(seed, micro-batch counter, rank), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from sr_lab.metrics.psnr_ssim import finite_mean, psnr_y, ssim_y
from sr_lab.models.prompts import as_prompt_source
from sr_lab.models.stage_inputs import STARTS, build_condition, start_latent
from sr_lab.modules.checkpointing import TrainableOnlyCheckpoint
from sr_lab.modules.manual_optimization import ManualOptimization
from sr_lab.utils.image_log import log_image, make_grid_rows
from sr_lab.utils.seeding import make_generator

log = logging.getLogger(__name__)


# the optimiser of CCSR / StableSR stage 1 (authors: AdamW) when no ``optimizer`` factory is given
DEFAULT_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)


class DiffusionAdapterFinetune(ManualOptimization, TrainableOnlyCheckpoint, pl.LightningModule):
    """``optimizer``: ``optimizer(params) -> torch.optim.Optimizer`` (the config's ``_partial_`` node
    ``optim.optimizer``); without it AdamW (:data:`DEFAULT_OPTIMIZER`) with ``lr`` / ``betas`` /
    ``weight_decay`` where given (also what exports written before ``optim.optimizer`` pass)."""

    capabilities = frozenset({"denoise"})  # prepare / denoise / decode_latent (sr-infer checkpoint=)

    def __init__(self, backbone: nn.Module, adapter: Callable[[nn.Module], nn.Module] | nn.Module,
                 loss: Any, sampler: Callable, *, optimizer: Callable | None = None, lr: float | None = None,
                 betas: tuple[float, float] | None = None, weight_decay: float | None = None,
                 optimizer_mode: str = "alternate", accumulate: int = 1,
                 grad_clip: float | None = None, prompt: str | Callable | None = "", start: str = "noise",
                 seed: int = 0, val_seed: int = 1234,
                 crop_border: int = 4, val_grid_images: int = 4, run_config: dict | None = None):
        super().__init__()
        if optimizer_mode not in ("alternate", "combined"):
            raise ValueError(f"optimizer_mode={optimizer_mode!r} must be 'alternate' or 'combined'")
        self.init_manual_optimization(accumulate=accumulate, grad_clip=grad_clip, optimizer=optimizer,
                                      default_optimizer=DEFAULT_OPTIMIZER, lr=lr, betas=betas,
                                      weight_decay=weight_decay)
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.backbone = backbone
        self.adapter = adapter(backbone.unet, vae=backbone.vae) if not isinstance(adapter, nn.Module) else adapter
        self.loss = loss
        self.sampler = sampler
        self.optimizer_mode = optimizer_mode
        if start not in STARTS or start == "hr":
            raise ValueError(f"start={start!r} must be 'noise' or 'lr' (the start the stage is validated with)")
        self.prompt_source = as_prompt_source(prompt)
        self.start = start
        self.seed, self.val_seed = int(seed), int(val_seed)
        self.crop_border, self.val_grid_images = int(crop_border), int(val_grid_images)
        self.run_config = run_config

    # -- model ------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """model(x, t, cond) -> ε̂: the frozen UNet steered by the adapter."""
        return self.adapter(self.backbone.unet, x, t, cond["context"], cond).float()

    def prepare(self, lr: torch.Tensor, hr_size: tuple[int, int], prompts: str | Sequence[str] | None = None,
                start: str | None = None, generator=None, hr: torch.Tensor | None = None,
                negative_prompts: str | Sequence[str] | None = None,
                reuse: dict | None = None) -> tuple[dict, torch.Tensor | None]:
        """(condition, x_T) for LR images in [0, 1] (:mod:`sr_lab.models.stage_inputs`): the runner's
        branch conditions, ``context`` (``prompts``: one per row or one for all; default: this stage's
        prompt source), the negative prompt's context for CFG, and — when ``generator`` is given — the
        starting latent for ``start`` (default: the stage's own, e.g. StableSR's noised LR latent).
        Tensors in the condition whose last two dims equal the latent's (or a multiple) are spatial
        (tiling crops them); ``context`` is not. ``reuse``: an earlier condition of the same batch whose
        gradient-free branch entries are kept (only gradient-carrying ones are rebuilt)."""
        if prompts is None:
            prompts = self.prompt_source(lr, hr)
        cond = build_condition(self.backbone, self.adapter, lr, hr_size, prompts, negative_prompts=negative_prompts,
                               reuse=reuse)
        if generator is None:
            return cond, None
        return cond, start_latent(self.backbone, cond, start or self.start, generator, hr01=hr)

    def decode_latent(self, latent: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> SR image in [0, 1]. Decoder stages (CFW, CCSR stage 2) provide their own."""
        return self.backbone.decode(latent)

    @property
    def n_parts(self) -> int:
        return len(self.loss.parts())

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Lightning ``global_step`` increments per training iteration."""
        return self.n_parts if self.optimizer_mode == "alternate" else 1

    # -- training ---------------------------------------------------------------------------------
    # trainable_parameters, configure_run, disable_ddp_reducer, step_optimizer, swap_grads, is_last_micro,
    # on_train_end (replica check): ManualOptimization
    def configure_optimizers(self):
        """One optimizer per loss part (alternate; each keeps its own state) or one (combined)."""
        n = self.n_parts if self.optimizer_mode == "alternate" else 1
        return [self.optimizer_factory(self.trainable_parameters()) for _ in range(n)]

    def on_train_start(self) -> None:
        if self._fsdp() and (self.optimizer_mode != "combined" or self.accumulate != 1):
            raise ValueError("FSDP trains with optim.mode=combined and no accumulation "
                             "(train.total_batch_size = data.batch_size x world size); use trainer=ddp otherwise")
        super().on_train_start()

    def _backward(self, loss: torch.Tensor) -> None:
        self.manual_backward(loss)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.disable_ddp_reducer()  # Lightning re-enables it after every step; step_optimizer all-reduces
        hr, lr = batch["hr"], batch["lr"]
        gen = make_generator(self.seed, "train", self._micro, self.global_rank, device=hr.device)
        x0 = self.backbone.encode(hr, generator=gen, sample=True)
        # a condition that runs trainable weights (e.g. a LoRA'd LR encoder) is rebuilt for every
        # backward pass, so each loss part has its own graph; otherwise it is built once, without grad
        fresh_condition = self.adapter.condition_requires_grad
        cond = None if fresh_condition else self.prepare(lr, tuple(hr.shape[-2:]))[0]
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        last_micro = self.is_last_micro()
        alternate = self.optimizer_mode == "alternate"
        terms: dict[str, torch.Tensor] = {}
        for i, part in enumerate(self.loss.parts()):
            if fresh_condition:  # rebuilt for this part's graph; gradient-free entries come from the first part's
                part_cond = self.prepare(lr, tuple(hr.shape[-2:]), reuse=cond)[0]
                cond = cond if cond is not None else part_cond
            else:
                part_cond = cond
            values = part(self.denoise, x0, part_cond, self.backbone.alphas_cumprod, gen)
            terms.update(values)
            if alternate:
                if self.accumulate > 1:
                    self.swap_grads(i)  # bring back part i's accumulated grads
                self._backward(sum(values.values()) / self.accumulate)
                if self.accumulate == 1:
                    self.step_optimizer(opts[i])  # authors: part i+1 sees the weights after part i's step
                else:
                    self.swap_grads(i)
            else:
                self._backward(sum(values.values()) / self.accumulate)
        if last_micro and not (alternate and self.accumulate == 1):
            for i, opt in enumerate(opts):
                if alternate:
                    self.swap_grads(i)
                self.step_optimizer(opt)
        self._micro += 1
        total = sum(v.detach() for v in terms.values())
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False,
                      batch_size=hr.shape[0])
        self.log("train/loss", total, prog_bar=True, batch_size=hr.shape[0])
        return total

    # -- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor, hr_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """Sample an SR image (B, 3, *hr_size) in [0, 1] from LR with the configured sampler."""
        cond, x_t = self.prepare(lr, hr_size, generator=generator)
        x0 = self.sampler(self.denoise, x_t, cond, self.backbone.alphas_cumprod, generator=generator)
        return self.decode_latent(x0, lr)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hr, lr = batch["hr"], batch["lr"]
        gen = make_generator(self.val_seed, "sample", batch_idx, device=hr.device)
        sr = self.super_resolve(lr, tuple(hr.shape[-2:]), gen)
        b = hr.shape[0]
        lr_up = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic",
                                                align_corners=False).clamp(0, 1)
        metrics = {"val/psnr_y": finite_mean(psnr_y(sr, hr, self.crop_border)),
                   "val/ssim_y": float(ssim_y(sr, hr, self.crop_border).mean()),
                   "val/psnr_y_bicubic": finite_mean(psnr_y(lr_up, hr, self.crop_border))}
        self.log_dict(metrics, sync_dist=True, batch_size=b, prog_bar=False)
        if batch_idx == 0 and self.trainer is not None and self.val_grid_images > 0:
            n = min(b, self.val_grid_images)
            grid = make_grid_rows([[lr_up[i], sr[i], hr[i]] for i in range(n)])
            log_image(self.trainer, "val/lr_sr_hr", grid, caption="LR (bicubic) | SR | HR")

    # -- checkpoints ------------------------------------------------------------------------------
    # trainable_state_keys / on_save_checkpoint / on_load_checkpoint: TrainableOnlyCheckpoint

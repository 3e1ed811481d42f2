"""LightningModule: train a conditioning adapter on a frozen latent-diffusion backbone.

Serves every "diffusion finetune" stage: CCSR stage 1 (ControlNet + NUTL loss, CCSR paper 000
Sec. 3.2), StableSR stage 1 (time-aware SFT adapter + eps loss), ClearSR (DPM/GSPM adapters). What
differs between them is composed in, never branched on: the backbone, the adapter, the loss (whose
``parts()`` are the loss terms), and the validation sampler (``model(x, t, cond) -> ε̂`` callable).

Optimisation is manual (Lightning 2 has no ``optimizer_idx``):

* ``optimizer_mode="alternate"`` (default, the authors' behaviour): one AdamW per loss part over the
  same trainable weights, stepped in turn on every batch — CCSR trains the eps part and the t = T part
  (Eq. 3) with two optimizers alternating (PL1 ``optimizer_idx`` 0/1). Lightning counts every
  optimizer step in ``global_step``, so an iteration is ``len(parts)`` global steps.
* ``optimizer_mode="combined"``: the parts are summed into one loss under one AdamW.

Gradient accumulation is done here (``accumulate`` micro-batches per iteration) since Lightning's
``accumulate_grad_batches`` does not apply to manual optimisation. With ``accumulate > 1`` in
alternate mode each part's gradients are kept apart and the optimizers step in turn at the end of
the iteration.

Under DDP the reducer is switched off (``require_backward_grad_sync = False``, what ``no_sync`` does)
and the trainable gradients are all-reduced by hand right before each optimizer step: DDP's reducer
expects one backward per forward, while alternate mode and accumulation make several. FSDP shards gradients, so it supports ``optimizer_mode="combined"`` with
``accumulate == 1`` only (checked when training starts).

Checkpoints hold only trainable tensors (``on_save_checkpoint``); the frozen backbone is rebuilt from
its source. All randomness (HR latent sampling, timesteps, noise) comes from generators derived from
(seed, micro-batch counter, rank), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sr_lab.metrics.psnr_ssim import finite_mean, psnr_y, ssim_y
from sr_lab.modules.checkpointing import TrainableOnlyCheckpoint
from sr_lab.utils.image_log import log_image, make_grid_rows
from sr_lab.utils.seeding import make_generator

log = logging.getLogger(__name__)


class DiffusionAdapterFinetune(TrainableOnlyCheckpoint, pl.LightningModule):
    def __init__(self, backbone: nn.Module, adapter: Callable[[nn.Module], nn.Module] | nn.Module,
                 loss: Any, sampler: Callable, *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.01, optimizer_mode: str = "alternate", accumulate: int = 1,
                 grad_clip: float | None = None, prompt: str = "", seed: int = 0, val_seed: int = 1234,
                 crop_border: int = 4, val_grid_images: int = 4, run_config: dict | None = None):
        super().__init__()
        if optimizer_mode not in ("alternate", "combined"):
            raise ValueError(f"optimizer_mode={optimizer_mode!r} must be 'alternate' or 'combined'")
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate} must be >= 1")
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.backbone = backbone
        self.adapter = adapter(backbone.unet) if not isinstance(adapter, nn.Module) else adapter
        self.loss = loss
        self.sampler = sampler
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.optimizer_mode, self.accumulate = optimizer_mode, int(accumulate)
        self.grad_clip = grad_clip
        self.prompt, self.seed, self.val_seed = prompt, int(seed), int(val_seed)
        self.crop_border, self.val_grid_images = int(crop_border), int(val_grid_images)
        self.run_config = run_config
        self._micro = 0  # micro-batches trained so far (restored on resume)
        self._stash: list[list[torch.Tensor | None]] = []

    # -- model ------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """model(x, t, cond) -> ε̂: the frozen UNet steered by the adapter."""
        return self.adapter(self.backbone.unet, x, t, cond["context"], cond).float()

    def make_condition(self, lr: torch.Tensor, hr_size: tuple[int, int], prompt: str | None = None) -> dict:
        """Adapter conditioning for LR images in [0, 1] plus ``context``, the embedding of ``prompt``
        (default: the stage's prompt; CFG passes the negative prompt). Tensors in the dict whose last
        two dims equal the latent's are spatial (tiling crops them); ``context`` is not."""
        cond = self.adapter.condition(self.backbone, lr, hr_size)
        cond["context"] = self.backbone.prompt_embedding(self.prompt if prompt is None else prompt, lr.shape[0])
        return cond

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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- training ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        n = self.n_parts if self.optimizer_mode == "alternate" else 1
        return [torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, betas=self.betas,
                                  weight_decay=self.weight_decay) for _ in range(n)]

    def on_train_start(self) -> None:
        name = type(self.trainer.strategy).__name__ if self.trainer is not None else ""
        if "FSDP" in name and (self.optimizer_mode != "combined" or self.accumulate != 1):
            raise ValueError("FSDP trains with optim.mode=combined and no accumulation "
                             "(train.total_batch_size = data.batch_size x world size); use trainer=ddp otherwise")

    def _ddp(self) -> bool:
        return self.trainer is not None and type(self.trainer.strategy).__name__.startswith("DDP") \
            and self.trainer.world_size > 1

    def on_train_end(self) -> None:
        if self._ddp():  # manual gradient sync: prove the replicas ended identical
            flat = torch.cat([p.detach().float().reshape(-1) for p in self.trainable_parameters()])
            digest = torch.stack([flat.sum(), flat.square().sum()])
            gathered = self.all_gather(digest)
            if not torch.allclose(gathered, gathered[0:1].expand_as(gathered), rtol=1e-6, atol=0):
                raise RuntimeError(f"DDP replicas diverged: per-rank weight digests {gathered.tolist()}")
            log.info("DDP replicas in sync (weight digest %s)", digest.tolist())

    def _backward(self, loss: torch.Tensor) -> None:
        self.manual_backward(loss)

    def _all_reduce_grads(self) -> None:
        """Average trainable gradients over ranks (one flat all-reduce)."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _step(self, opt) -> None:
        if self._ddp():
            self._all_reduce_grads()
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _swap_grads(self, i: int) -> None:
        """Exchange the live .grad of every trainable weight with part ``i``'s stash."""
        params = self.trainable_parameters()
        while len(self._stash) <= i:
            self._stash.append([None] * len(params))
        for j, p in enumerate(params):
            p.grad, self._stash[i][j] = self._stash[i][j], p.grad

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._ddp():  # Lightning re-enables the reducer after every step; we all-reduce in _step
            self.trainer.strategy.model.require_backward_grad_sync = False
        hr, lr = batch["hr"], batch["lr"]
        gen = make_generator(self.seed, "train", self._micro, self.global_rank, device=hr.device)
        x0 = self.backbone.encode(hr, generator=gen, sample=True)
        cond = self.make_condition(lr, tuple(hr.shape[-2:]))
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        last_micro = (self._micro + 1) % self.accumulate == 0
        alternate = self.optimizer_mode == "alternate"
        terms: dict[str, torch.Tensor] = {}
        for i, part in enumerate(self.loss.parts()):
            values = part(self.denoise, x0, cond, self.backbone.alphas_cumprod, gen)
            terms.update(values)
            if alternate:
                if self.accumulate > 1:
                    self._swap_grads(i)  # bring back part i's accumulated grads
                self._backward(sum(values.values()) / self.accumulate)
                if self.accumulate == 1:
                    self._step(opts[i])  # authors: part i+1 sees the weights after part i's step
                else:
                    self._swap_grads(i)
            else:
                self._backward(sum(values.values()) / self.accumulate)
        if last_micro and not (alternate and self.accumulate == 1):
            for i, opt in enumerate(opts):
                if alternate:
                    self._swap_grads(i)
                self._step(opt)
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
        cond = self.make_condition(lr, hr_size)
        f = self.backbone.vae_factor
        shape = (lr.shape[0], self.backbone.unet.config.in_channels, hr_size[0] // f, hr_size[1] // f)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(lr.device)
        x0 = self.sampler(self.denoise, noise, cond, self.backbone.alphas_cumprod, generator=generator)
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

"""EMA of a stage's trainable weights (``ema.decay`` in conf/train.yaml; off when null).

AddSR trains its student with EMA 0.99 (authors); any stage can. :class:`EMA` is a Lightning callback
that keeps, next to the live weights, ``ema = decay * ema + (1 - decay) * w`` over exactly the module's
trainable tensors (``module.trainable_state_keys()``):

* **What.** Parameters with ``requires_grad`` of a floating dtype are averaged; the other trainable-state
  tensors (buffers of the modules that own trainable weights, e.g. BatchNorm statistics; integer
  tensors) are copied at every update. The EMA starts as a copy of the weights when training starts
  (no bias correction: after k updates it is ``decay^k w_0 + sum_i (1 - decay) decay^(k-i) w_i``).
  Half-precision weights are averaged in float32.
* **When.** Once per *iteration*, after its optimizer steps: the stage modules optimise by hand and an
  iteration is ``module.optimizer_steps_per_iteration`` Lightning global steps (2 in CCSR's alternate
  mode and for a GAN stage, none between accumulated micro-batches), so the EMA is updated in
  ``on_train_batch_end`` when ``trainer.global_step`` crosses an iteration boundary.
* **Resume.** The averaged tensors and the update count are the callback's ``state_dict`` (Lightning
  stores it in the checkpoint under ``callbacks[EMA_STATE_KEY]``) and are restored on resume, so a
  resumed run's EMA equals an uninterrupted run's exactly.
* **Validation.** With ``use_for_validation`` the EMA weights are swapped in at ``on_validation_start``
  and the live ones back at ``on_validation_end`` (bit-exact: copies, not arithmetic).
* **Export.** :meth:`EMA.export_state` gives the EMA with the keys of ``trainable.safetensors``;
  ``sr_lab.train`` writes it as ``export/trainable_ema.safetensors``, which ``sr-infer`` (and
  :func:`sr_lab.modules.stage_io.read_stage_source`) uses unless ``ema=false``.

Why not Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` or ``torch.optim.swa_utils``:
``AveragedModel`` deep-copies the whole LightningModule (the frozen SD backbone included, a second copy
of it in memory) and averages every parameter; ``WeightAveraging`` replaces ``checkpoint["state_dict"]``
with the *averaged full* state (the live one moved to ``current_model_state``), which defeats sr_lab's
trainable-only checkpoints (:class:`~sr_lab.modules.checkpointing.TrainableOnlyCheckpoint` filters
``state_dict``; the stage layer reads it as the raw weights), copies the average into the model at
``on_train_end`` (so ``trainable.safetensors`` would no longer be the raw weights), and counts updates
per Lightning optimizer step, not per iteration of a manually optimised stage. It also needs
Lightning >= 2.6 (sr_lab allows >= 2.4).

Not supported under FSDP (sharded flat parameters): refused with one line when training starts.
"""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from sr_lab.modules.stage_io import EMA_STATE_KEY

log = logging.getLogger(__name__)

__all__ = ["EMA", "EMA_STATE_KEY"]


class EMA(pl.Callback):
    """Exponential moving average of the trainable weights (see the module doc)."""

    def __init__(self, decay: float, use_for_validation: bool = True):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema.decay={decay} must be a number in (0, 1)")
        self.decay = float(decay)
        self.use_for_validation = bool(use_for_validation)
        self.ema: dict[str, torch.Tensor] | None = None  # name -> averaged (or copied) tensor
        self.averaged: set[str] = set()                  # the names that are averaged (the rest are copied)
        self.updates = 0                                 # iterations absorbed so far
        self._placed = False
        self._backup: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY

    # -- state ------------------------------------------------------------------------------------
    @staticmethod
    def _live(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        named = dict(pl_module.named_parameters())
        named.update(pl_module.named_buffers())
        return named

    def _ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the EMA as a copy of the weights (unless restored from a checkpoint); place it on the
        weights' devices. Called lazily: after any checkpoint restore, before the first validation."""
        if self._placed:
            return
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError("ema.decay is not supported with trainer=fsdp (sharded weights); use trainer=ddp")
        keys = set(pl_module.trainable_state_keys())
        live = self._live(pl_module)
        self.averaged = {n for n, p in pl_module.named_parameters()
                         if n in keys and p.requires_grad and p.is_floating_point()}
        if self.ema is None:
            if trainer.global_step:
                log.warning("EMA: the checkpoint holds no EMA state; starting it from the resumed weights")
            self.ema = {k: self._fresh(k, live[k]) for k in sorted(keys)}
            self.updates = trainer.global_step // pl_module.optimizer_steps_per_iteration
        else:
            if set(self.ema) != keys:
                diff = sorted(set(self.ema) ^ keys)
                raise KeyError(f"EMA state in the checkpoint does not match the trainable tensors, e.g. {diff[:3]}")
            self.ema = {k: v.to(device=live[k].device, dtype=self._dtype(k, live[k])) for k, v in self.ema.items()}
        self._placed = True

    def _dtype(self, name: str, t: torch.Tensor) -> torch.dtype:
        if name in self.averaged and t.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return t.dtype

    def _fresh(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype=self._dtype(name, t), copy=True)

    def state_dict(self) -> dict:
        if self.ema is None:
            return {}
        return {"decay": self.decay, "updates": self.updates, "ema": dict(self.ema)}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if float(state_dict["decay"]) != self.decay:
            log.warning("EMA: resuming with ema.decay=%s, the checkpoint was written with %s",
                        self.decay, state_dict["decay"])
        self.ema = dict(state_dict["ema"])
        self.updates = int(state_dict["updates"])
        self._placed = False

    # -- update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(trainer, pl_module)
        iteration = trainer.global_step // pl_module.optimizer_steps_per_iteration
        if iteration <= self.updates:
            return
        live = self._live(pl_module)
        d = self.decay
        for k, e in self.ema.items():
            w = live[k].detach()
            if k in self.averaged:
                e.mul_(d).add_(w.to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(w)
        self.updates = iteration

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._catch_up(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # ModelCheckpoint runs after this callback (Lightning orders it last); should a checkpoint be
        # written before this batch's update, the update is made here and the stored state refreshed
        if self.ema is not None and trainer.training and self._backup is None:
            self._catch_up(trainer, pl_module)
            if "callbacks" in checkpoint:  # not in a weights-only checkpoint
                checkpoint["callbacks"][self.state_key] = self.state_dict()

    # -- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.use_for_validation:
            return
        self._ensure(trainer, pl_module)
        live = self._live(pl_module)
        self._backup = {k: live[k].detach().clone() for k in self.averaged}
        for k in self.averaged:
            live[k].copy_(self.ema[k])

    @torch.no_grad()
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        live = self._live(pl_module)
        for k, v in self._backup.items():
            live[k].copy_(v)
        self._backup = None

    # -- export -----------------------------------------------------------------------------------
    def export_state(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
        """The EMA on CPU with the keys (and dtypes) of the module's trainable state; None before any."""
        if self.ema is None:
            return None
        live = self._live(pl_module)
        return {k: v.detach().to(device="cpu", dtype=live[k].dtype).contiguous() for k, v in self.ema.items()}

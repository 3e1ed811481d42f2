"""LightningModule: StableSR's CFW data stage — sample latents with a trained stage 1, write records.

StableSR paper 001, Sec. 3.2: CFW cannot be finetuned through the multi-step sampler, so synthetic
LR/HR pairs (the stage-1 degradation) are turned into latent codes Z0 by the finetuned diffusion model
conditioned on the LR, and CFW is trained on (LR, HR, Z0). The authors' script
(``scripts/generate_vqgan_data.py``) starts DDPM (200 respaced steps) from the LR latent noised to
t = T-1 (``q_sample(init_latent, 999)``), not from pure noise; ``start="lr"`` does the same and
``start="noise"`` starts from N(0, I).

Here it is a batched Lightning **predict** loop (``run_mode: predict``): every device takes the shards
``k ≡ rank (mod world size)``; the records themselves depend only on the global record index (HR crop
and degradation seeded by it, sampling noise seeded by the batch's first record index), so a run gives
the same records for any number of devices and after an interruption. Shards already on disk are
skipped (see :class:`sr_lab.data.records.RecordSourceDataModule`); each shard is written atomically
when its last batch has been sampled.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from sr_lab.data.records import FORMAT, shard_ranges, to_uint8, write_meta, write_shard
from sr_lab.modules.stage_io import load_frozen_stage
from sr_lab.utils.seeding import make_generator

log = logging.getLogger(__name__)
# predict_step writes shards and returns nothing on purpose
warnings.filterwarnings("ignore", message=r".*predict returned None.*")

__all__ = ["LatentRecordWriter"]


class LatentRecordWriter(pl.LightningModule):
    """Predict-only stage: ``predict_step`` samples z0 for a batch of (LR, HR) and buffers records until
    a shard is complete, then writes it.

    Args:
        backbone: the frozen backbone (the stage-1 stage is rebuilt on it, frozen).
        stage1: a stage-1 export folder / ``trainable.safetensors`` / ``.ckpt`` (``stablesr_stage1``).
        sampler: ``sampler(model, x_T, cond, alphas_cumprod, generator=...) -> z0`` (DDPM 200 for StableSR).
        records_dir, num_records, shard_size: where and how many (must match the data module's).
        start: ``"lr"`` (authors: x_T = q_sample(LR latent, T-1)) or ``"noise"`` (x_T ~ N(0, I)).
        prompt: ``None`` = the stage-1 training prompt (StableSR: empty).
        crop_size: the HR crop of the records (recorded in ``meta.json``; a folder holds one setting).
    """

    capabilities = frozenset()  # writes records; nothing to load for inference

    def __init__(self, backbone: nn.Module, stage1: str, sampler: Callable, records_dir: str, num_records: int,
                 shard_size: int, start: str = "lr", prompt: str | None = None, seed: int = 0,
                 crop_size: int | None = None, run_config: dict | None = None):
        super().__init__()
        if start not in ("lr", "noise"):
            raise ValueError(f"start={start!r} must be 'lr' or 'noise'")
        self.backbone = backbone
        self.stage = load_frozen_stage(stage1, backbone)  # every tensor stage 1 trained, frozen
        self.stage1 = str(stage1)
        self.sampler = sampler
        self.records_dir, self.num_records, self.shard_size = str(records_dir), int(num_records), int(shard_size)
        self.start, self.seed = start, int(seed)
        self.prompt = None if prompt is None else str(prompt)  # None: the stage's own prompt source
        self.run_config = run_config
        self.accumulate = 1
        self.crop_size = None if crop_size is None else int(crop_size)
        self._ranges = dict(shard_ranges(self.num_records, self.shard_size))  # start -> stop
        self._buffer: list[dict[str, torch.Tensor]] = []
        self.written: list[str] = []
        self.meta = {"format": FORMAT, "num_records": self.num_records, "shard_size": self.shard_size,
                     "stage1": str(Path(self.stage1).expanduser().resolve()), "start": self.start,
                     "prompt": self.prompt if self.prompt is not None else
                     getattr(self.stage.prompt_source, "text", repr(self.stage.prompt_source)), "seed": self.seed, "crop_size": self.crop_size,
                     "backbone": getattr(backbone, "name", "?"), "latent_scale": float(backbone.latent_scale),
                     "sampler": repr(getattr(sampler, "keywords", sampler))}
        self._check_existing_meta()

    def _check_existing_meta(self) -> None:
        """Refuse to add records to a folder written with other settings (records must be one set);
        only ``num_records`` may change (records depend on their index alone)."""
        f = Path(self.records_dir).expanduser() / "meta.json"
        if not f.is_file():
            return
        old = json.loads(f.read_text())
        diff = [k for k in self.meta if k != "num_records" and k in old and old[k] != self.meta[k]]
        if diff:
            k = diff[0]
            raise ValueError(f"records.dir={self.records_dir} holds records written with {k}={old[k]!r}, this run "
                             f"has {k}={self.meta[k]!r}; use another records.dir (or delete that folder)")

    # -- the generic stage interface used by sr_lab.train ------------------------------------------
    @property
    def optimizer_steps_per_iteration(self) -> int:
        return 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def trainable_state_keys(self) -> set[str]:
        return set()

    def configure_run(self, accumulate: int, run_config: dict) -> None:
        """The run contract (:class:`~sr_lab.modules.protocol.TrainableStage`): a predict loop does not
        accumulate, so ``accumulate`` must be 1; the run config is kept as the training stages keep it."""
        if accumulate != 1:
            raise ValueError(f"{type(self).__name__} runs a predict loop and does not accumulate: "
                             f"accumulate={accumulate} must be 1")
        self.accumulate = 1
        self.run_config = run_config

    def train(self, mode: bool = True):  # nothing here ever trains
        return super().train(False)

    def configure_optimizers(self):
        return None

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, lr: torch.Tensor, hr_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """z0 for LR images in [0, 1] (StableSR: DDPM from the LR latent noised to T-1)."""
        cond, x_T = self.stage.prepare(lr, hr_size, prompts=self.prompt, start=self.start, generator=generator)
        return self.sampler(self.stage.denoise, x_T, cond, self.backbone.alphas_cumprod, generator=generator).float()

    # -- predict loop -------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self._buffer = []
        if self.trainer.is_global_zero:
            write_meta(self.records_dir, self.meta)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        hr, lr, index = batch["hr"], batch["lr"], batch["index"]
        first = int(index[0])
        gen = make_generator(self.seed, "records-sample", first, device=hr.device)
        z0 = self.sample_latents(lr, tuple(hr.shape[-2:]), gen)
        self._buffer.append({"lr": to_uint8(lr).cpu(), "hr": to_uint8(hr).cpu(), "latent": z0.cpu(),
                             "index": index.detach().cpu().to(torch.int64)})
        self._flush()
        return None

    def _flush(self) -> None:
        start = int(self._buffer[0]["index"][0])
        stop = self._ranges.get(start)
        if stop is None:
            raise RuntimeError(f"record {start} does not start a shard of size {self.shard_size}")
        have = sum(int(b["index"].shape[0]) for b in self._buffer)
        if have < stop - start:
            return
        if have > stop - start:
            raise RuntimeError(f"batches straddle the shard [{start}, {stop}); "
                               f"shard_size must be a multiple of the batch size")
        shard = {k: torch.cat([b[k] for b in self._buffer]) for k in ("lr", "hr", "latent", "index")}
        if not torch.equal(shard["index"], torch.arange(start, stop)):
            raise RuntimeError(f"shard [{start}, {stop}) received records out of order")
        path = write_shard(self.records_dir, start, shard, {"stage1": self.stage1})
        self.written.append(path.name)
        self._buffer = []
        log.info("wrote %s", path)

    def on_predict_end(self) -> None:
        if self._buffer:
            left = sum(int(b["index"].shape[0]) for b in self._buffer)
            log.warning("records: %d buffered record(s) did not complete a shard and were not written", left)
            self._buffer = []

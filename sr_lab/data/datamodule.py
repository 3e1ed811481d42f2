"""``SRDataModule``: HR crops on CPU workers, degradation on the device, resumable by a sample counter.

Resume design (stateless): every training sample is addressed by a global *sample counter*
``n = 0, 1, 2, ...``. ``HRFolderDataset[n]`` derives the image (epoch permutation) and the crop/flip
from ``(seed, n)``; the device-side degradation of a batch uses a generator derived from
``(seed, "degrade", first counter of the batch, rank)``. The only state is ``consumed_samples``, the
number of counters already turned into training batches, saved by Lightning through
``state_dict()`` / ``load_state_dict()`` (and also exposed on the train DataLoader, so Lightning treats
it as resumable mid-epoch). A resumed run therefore produces exactly the batches an uninterrupted run
would have produced next, whatever ``num_workers``, prefetching or the point of interruption.

Data epochs are blocks of ``samples_per_epoch`` counters: ``[e*S, (e+1)*S)``. Each iteration of the
train DataLoader covers the rest of the current block from ``consumed_samples`` on, so after a
mid-epoch resume the first epoch is short and later ones are full.

Distributed (DDP) slicing: with ``world_size`` W, one optimisation step consumes a *global* batch of
``batch_size * W`` consecutive counters; rank ``r`` reads counters ``start + k*W + r`` (k = 0, 1, ...),
so ranks read disjoint interleaved slices whose union is the consecutive block. ``consumed_samples``
advances by ``batch_size * W`` per training batch on every rank (it is identical on all ranks).

Training-pair pool (``pair_pool_size > 0``, off by default): Real-ESRGAN's queue (BasicSR
``RealESRGANModel._dequeue_and_enqueue``, :mod:`sr_lab.data.pair_pool`) after the degradation of every
training batch; its permutation comes from ``(seed, "pair_pool", first counter, rank)`` and its contents
are part of ``state_dict()`` (each rank's pool under DDP), so a resumed run still repeats an
uninterrupted one exactly.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from sr_lab.utils.seeding import make_generator

from .folder import HRFolderDataset
from .pair_pool import PairPool, check_pool_size
from .samples import find_images, sample_image_dir

__all__ = ["SRDataModule", "CounterSampler", "collate_hr"]

log = logging.getLogger("sr_lab.data")

Degradation = Callable[[torch.Tensor, torch.Generator], dict]
Dirs = str | os.PathLike | Sequence[str | os.PathLike] | None


class CounterSampler(DistributedSampler):
    """Yields the global sample counters of one data-epoch for one rank.

    Each ``iter()`` reads ``start = start_fn()`` (the datamodule's ``consumed_samples``) and covers
    ``[start, next multiple of samples_per_epoch)`` in whole global batches (``batch_size * world_size``
    counters); rank ``r`` yields ``start + k*world_size + r``. If less than one global batch is left in
    the data-epoch, it starts at the next one. ``len()`` is the per-rank sample count of a full
    data-epoch (a resumed first epoch yields fewer; Lightning's restored batch progress accounts for it).

    It subclasses ``DistributedSampler`` only so that Lightning does not wrap it in a sampler of its own
    under DDP; it does not use ``torch.distributed``.
    """

    def __init__(
        self,
        start_fn: Callable[[], int] | int,
        samples_per_epoch: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
    ):
        Sampler.__init__(self)
        gb = batch_size * world_size
        if samples_per_epoch < gb:
            raise ValueError(
                f"samples_per_epoch ({samples_per_epoch}) must be >= the global batch "
                f"(batch_size {batch_size} x world_size {world_size} = {gb})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.start_fn = start_fn if callable(start_fn) else (lambda s=int(start_fn): s)
        self.samples_per_epoch, self.batch_size = int(samples_per_epoch), int(batch_size)
        # attributes DistributedSampler users (Lightning) may read
        self.num_replicas, self.rank, self.shuffle, self.drop_last, self.epoch, self.seed = world_size, rank, False, True, 0, 0

    def span(self) -> tuple[int, int]:
        """Global counters ``[start, stop)`` the next iteration covers (all ranks together)."""
        s, gb = self.samples_per_epoch, self.batch_size * self.num_replicas
        start = int(self.start_fn())
        end = (start // s + 1) * s
        if end - start < gb:
            start, end = end, end + s
        return start, start + (end - start) // gb * gb

    def __iter__(self):
        start, stop = self.span()
        return iter(range(start + self.rank, stop, self.num_replicas))

    def __len__(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.num_replicas) * self.batch_size

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this; the data order ignores it
        self.epoch = epoch


def collate_hr(samples: list[dict]) -> dict:
    """``{"hr": uint8 Bx3xCxC, "index": int64 B, "first_index": int, "skipped": list[int]}``.

    ``first_index`` and ``skipped`` stay Python values so the device hook never syncs to read them.
    """
    return {
        "hr": torch.stack([s["hr"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "first_index": int(samples[0]["index"]),
        "skipped": [int(s["skipped"]) for s in samples if s["skipped"] >= 0],
    }


class _ResumableLoader(DataLoader):
    """Train DataLoader that exposes the datamodule's counter, so Lightning knows it resumes mid-epoch."""

    # only the counter: the datamodule's own checkpoint entry carries the rest (e.g. the pair pool), which
    # would otherwise be written twice
    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.sr_datamodule.consumed_samples)}

    def load_state_dict(self, state: dict) -> None:
        self.sr_datamodule.consumed_samples = int(state["consumed_samples"])


class SRDataModule(LightningDataModule):
    """HR folder(s) -> random crops (CPU workers) -> uint8 batches -> device degradation per batch.

    Batches after ``on_after_batch_transfer`` are ``{"hr": float Bx3xHxW in [0,1], "lr": float in [0,1],
    "index": int64 B}`` (``"lr"`` is absent when no degradation is set). ``hr``/``lr`` are what the
    degradation returns. The LightningModule must not override ``on_after_batch_transfer`` (Lightning
    calls the datamodule's).

    Args:
        hr_dirs: folder(s) of HR images, searched recursively; ``None`` -> scikit-image's sample photos.
        crop_size: square training crop; must be a positive multiple of ``crop_multiple``.
        batch_size: per-process batch size.
        num_workers, pin_memory, persistent_workers: DataLoader options.
        val_dirs: validation folder(s); ``None`` -> the training files.
        num_val_images: validation uses the first ``num_val_images`` usable files, centre-cropped.
        val_batch_size: defaults to ``batch_size``.
        seed: base seed of permutations, crops and training degradations.
        val_seed: base seed of validation degradations (validation LR is identical on every call).
        samples_per_epoch: data-epoch length in samples; ``None`` -> number of usable images rounded
            down to a multiple of the global batch (``batch_size * world_size``), at least one global batch.
        degradation: ``degradation(hr, generator) -> {"hr", "lr"}`` on the device.
        val_degradation: for validation/test/predict batches; ``None`` -> ``degradation``.
        crop_multiple: required divisor of ``crop_size`` (VAE factor x SR scale).
        pair_pool_size: Real-ESRGAN's training-pair pool (BasicSR ``queue_size``, x4plus 180) applied to
            training batches after the degradation; a multiple of ``batch_size``; 0 = off (the default).
            A full pool is saved in checkpoints: ``pair_pool_size`` x (HR + LR) float32, e.g. about 0.6 GB
            for 180 pairs at 512 crops with a x4 LR (1.1 GB when the LR is resized back to the HR size).

    Declared for the config check (:mod:`sr_lab.config.validation`, read from the class, nothing built):
    ``needs_hr_folders`` (``data.hr_dirs`` / the sample photos are probed), ``reads_latent_records`` and
    :meth:`validate_config` (the module's own keys; subclasses extend it).
    """

    needs_hr_folders: bool = True
    reads_latent_records: bool = False

    @classmethod
    def validate_config(cls, cfg: Any, error: type[Exception]) -> None:
        """Check this data module's own keys of the composed ``cfg``; raise ``error`` (one line naming the
        key). The HR folders themselves are probed by the shared check (``needs_hr_folders``)."""
        from omegaconf import OmegaConf

        size = OmegaConf.select(cfg, "data.pair_pool_size", default=0)
        why = check_pool_size(size, OmegaConf.select(cfg, "data.batch_size", default=None))
        if why:
            raise error(f"data.pair_pool_size={size} {why}")

    def __init__(
        self,
        hr_dirs: Dirs = None,
        crop_size: int = 128,
        batch_size: int = 4,
        num_workers: int = 0,
        val_dirs: Dirs = None,
        num_val_images: int = 4,
        val_batch_size: int | None = None,
        seed: int = 0,
        val_seed: int = 1234,
        samples_per_epoch: int | None = None,
        degradation: Degradation | None = None,
        val_degradation: Degradation | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        crop_multiple: int = 32,
        pair_pool_size: int = 0,
    ):
        super().__init__()
        if not isinstance(crop_multiple, int) or crop_multiple < 1:
            raise ValueError(f"crop_multiple must be a positive int, got {crop_multiple!r}")
        if not isinstance(crop_size, int) or crop_size <= 0 or crop_size % crop_multiple:
            raise ValueError(f"crop_size must be a positive multiple of crop_multiple={crop_multiple}, got {crop_size!r}")
        for name, v in [("batch_size", batch_size), ("num_val_images", num_val_images)]:
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name, v in [("val_batch_size", val_batch_size), ("samples_per_epoch", samples_per_epoch)]:
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        why = check_pool_size(pair_pool_size, batch_size)
        if why:
            raise ValueError(f"pair_pool_size={pair_pool_size!r} {why}")
        self.hr_dirs, self.val_dirs = hr_dirs, val_dirs
        self.crop_size, self.batch_size, self.num_workers = crop_size, batch_size, num_workers
        self.num_val_images, self.val_batch_size = num_val_images, val_batch_size or batch_size
        self.seed, self.val_seed, self.samples_per_epoch = int(seed), int(val_seed), samples_per_epoch
        self.degradation, self.val_degradation = degradation, val_degradation
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.consumed_samples = 0
        self.pair_pool = PairPool(pair_pool_size, batch_size) if pair_pool_size else None
        self.train_dataset: HRFolderDataset | None = None
        self.val_dataset: HRFolderDataset | None = None
        self._load_failures: dict[str, str] = {}  # path -> reason, files that failed at load time (this process)
        self._exclusions: tuple[Any, Any, dict[str, str]] | None = None  # (train ds, val ds, their exclusions)

    # ---- distributed context ------------------------------------------------------------------
    def _context(self) -> tuple[bool, int, int]:
        """``(training, world_size, rank)``; without a trainer: training, single process."""
        t = self.trainer
        if t is None:
            return True, 1, 0
        return bool(t.training), int(t.world_size), int(t.global_rank)

    # ---- datasets -----------------------------------------------------------------------------
    def _dataset(self, dirs: Dirs, train: bool, max_items: int | None = None) -> HRFolderDataset:
        samples = dirs is None
        roots = [sample_image_dir()] if samples else ([dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs))
        source = ", ".join(str(r) for r in roots)
        quiet = samples or self._context()[2] != 0
        return HRFolderDataset(
            find_images(roots), self.crop_size, self.seed, train=train, max_items=max_items, source=source, quiet=quiet
        )

    def setup(self, stage: str | None = None) -> None:
        """Probe the folders and build the datasets (raises ``ValueError`` if no usable image)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.hr_dirs, train=True)
        if self.val_dataset is None:
            if self.val_dirs is None and self.train_dataset is not None:
                files = self.train_dataset.files[: self.num_val_images]
                self.val_dataset = HRFolderDataset(
                    files, self.crop_size, self.seed, train=False, source=self.train_dataset.source, quiet=True
                )
            else:
                dirs = self.val_dirs if self.val_dirs is not None else self.hr_dirs
                self.val_dataset = self._dataset(dirs, train=False, max_items=self.num_val_images)

    # ---- loaders ------------------------------------------------------------------------------
    def effective_samples_per_epoch(self) -> int:
        _, ws, _ = self._context()
        gb = self.batch_size * ws
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        if self.train_dataset is None:
            self.setup("fit")
        return max(gb, len(self.train_dataset) // gb * gb)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        ds = self.train_dataset
        _, ws, rank = self._context()
        sampler = CounterSampler(lambda: self.consumed_samples, self.effective_samples_per_epoch(), self.batch_size, ws, rank)
        loader = _ResumableLoader(
            ds, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers,
            collate_fn=collate_hr, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
        loader.sr_datamodule = self
        return loader

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        ds = self.val_dataset
        workers = min(self.num_workers, math.ceil(len(ds) / self.val_batch_size))
        return DataLoader(
            ds, batch_size=self.val_batch_size, shuffle=False, num_workers=workers, collate_fn=collate_hr,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers and workers > 0,
        )

    # ---- device-side processing ---------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        training, ws, rank = self._context()
        hr, index = batch["hr"], batch["index"]
        if hr.dtype == torch.uint8:
            hr = hr.float().div_(255.0)
        first = int(batch["first_index"]) if "first_index" in batch else int(index[0])
        self._note_skipped(batch.get("skipped", []), self.train_dataset if training else self.val_dataset)
        if training:
            # first counter of the rank's batch is block_start + rank (see the module docstring)
            self.consumed_samples = first - rank + hr.shape[0] * ws
            gen = make_generator(self.seed, "degrade", first, rank, device=hr.device)
            deg = self.degradation
        else:
            gen = make_generator(self.val_seed, "val", first, device=hr.device)
            deg = self.val_degradation or self.degradation
        with torch.autocast(hr.device.type, enabled=False):  # the degradation runs in float32, never autocast
            out = {"hr": hr, "index": index} if deg is None else {**deg(hr.float(), gen), "index": index}
        out = {k: out[k] for k in ("hr", "lr", "index") if k in out}
        if training and self.pair_pool is not None:
            out = self.pair_pool(out, make_generator(self.seed, "pair_pool", first, rank, device=hr.device))
        return out

    def _note_skipped(self, skipped: Any, ds: HRFolderDataset | None) -> None:
        """Record the files of a batch that failed at load time (each distinct file once, one warning each)."""
        if isinstance(skipped, torch.Tensor):
            skipped = skipped[skipped >= 0].tolist()
        if not skipped or ds is None:
            return
        for idx in skipped:
            path = ds.files[idx]
            if path in self._load_failures:
                continue
            reason = ds.failure_reason(idx) or "failed in a data worker"
            self._load_failures[path] = f"failed at load time ({reason})"
            log.warning("skipped HR image %s (%s); used the next image of the permutation instead", path, reason)

    def _setup_exclusions(self) -> dict[str, str]:
        """Files excluded when the datasets were built (unreadable header, smaller than the crop), except
        the quiet ones (the shipped sample photos, non-zero ranks)."""
        datasets = (self.train_dataset, self.val_dataset)
        cached = self._exclusions
        if cached is None or cached[0] is not datasets[0] or cached[1] is not datasets[1]:
            found: dict[str, str] = {}
            for ds in datasets:
                if ds is not None and not ds.quiet:
                    for path, reason in ds.excluded:
                        found.setdefault(path, reason)
            self._exclusions = cached = (*datasets, found)
        return cached[2]

    def skipped_count(self) -> int:
        """Number of distinct files not used so far (see :meth:`skipped_files`); cheap, callable per batch."""
        excluded = self._setup_exclusions()
        return len(excluded) + sum(p not in excluded for p in self._load_failures)

    def skipped_files(self) -> dict[str, str]:
        """``{path: reason}`` of the distinct HR files this process has not used: excluded when the folders
        were probed (unreadable header, smaller than the crop) or failed at load time (truncated body,
        ...), in the order they were found. Each file appears once however often it was drawn."""
        return {**self._setup_exclusions(), **self._load_failures}

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"consumed_samples"}``, plus ``"pair_pool"`` when the pool is on: ``{"world_size", "ranks"}`` with
        every rank's pool (gathered under DDP; Lightning writes rank 0's copy of the checkpoint)."""
        state: dict[str, Any] = {"consumed_samples": int(self.consumed_samples)}
        if self.pair_pool is not None:
            own = self.pair_pool.state_dict()
            _, ws, _ = self._context()
            ranks = [own]
            if ws > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                ranks = [None] * ws
                torch.distributed.all_gather_object(ranks, own)
            state["pair_pool"] = {"world_size": len(ranks), "ranks": ranks}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_samples = int(state_dict["consumed_samples"])
        if self.pair_pool is None:
            return
        saved = state_dict.get("pair_pool")
        _, ws, rank = self._context()
        pool, mine, why = self.pair_pool, None, None
        if saved is None:
            why = "the checkpoint has no pair pool"
        elif int(saved["world_size"]) != ws:
            why = f"the checkpoint's pools are for {saved['world_size']} process(es), this run has {ws}"
        else:
            mine = saved["ranks"][rank]
            if (int(mine["size"]), int(mine["batch_size"])) != (pool.size, pool.batch_size):
                why = f"the checkpoint's pool holds {mine['size']} pairs in batches of {mine['batch_size']}"
        if why is not None:
            log.warning("data.pair_pool_size=%d: %s; the pool starts empty (the run does not repeat an "
                        "uninterrupted one exactly)", pool.size, why)
            pool.load_state_dict({"size": pool.size, "batch_size": pool.batch_size, "filled": 0, "tensors": {}})
            return
        self.pair_pool.load_state_dict(mine)

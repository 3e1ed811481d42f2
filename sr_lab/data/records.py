"""Latent records: (LR, HR, sampled latent z0) triples on disk, written and read in safetensors shards.

StableSR trains CFW on latents sampled by the finetuned diffusion model (StableSR paper 001, Sec. 3.2:
"we first generate synthetic LR-HR pairs ... Then, the latent codes Z0 can be obtained using our
finetuned diffusion model given the LR images as conditions"). Here:

* **Shards.** Record ``i`` (a global, rank-independent index) lives in the shard that covers
  ``[k·S, min((k+1)·S, N))`` for ``k = i // S`` (S = ``shard_size``), named
  ``records-<start:09d>-<stop:09d>.safetensors`` with tensors ``lr`` (uint8 n×3×h×w), ``hr``
  (uint8 n×3×H×W), ``latent`` (float32 n×C×H/8×W/8, scaled like the diffusion latents) and ``index``
  (int64 n). Files are written to a temporary name and moved into place (:mod:`sr_lab.utils.atomic`),
  so a shard either exists complete or not at all; temporary files of a killed writer are removed when
  the next writer starts.
* :class:`RecordSourceDataModule` — the writer's input: an :class:`~sr_lab.data.SRDataModule` whose
  ``predict_dataloader`` yields the HR crops of the records not yet written, shard by shard, shards
  ``k ≡ rank (mod world size)`` on each rank. Record ``i`` is HR crop ``i`` of the training dataset
  (seeded by ``(seed, i)``) degraded with a generator seeded by the batch's first record index, so the
  records do not depend on the world size, the rank or on resuming.
* :class:`LatentRecordsDataModule` — the reader (``data=latent_records``, the CFW stage): records in a
  counter-addressed permutation per data-epoch (exact resume as ``SRDataModule``), optionally randomly
  cropped (HR, LR and latent together, aligned to the VAE factor).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sr_lab.utils.atomic import atomic_safetensors_save, atomic_write_text, remove_stale_temps
from sr_lab.utils.seeding import make_generator

from .datamodule import CounterSampler, SRDataModule, _ResumableLoader, collate_hr

log = logging.getLogger("sr_lab.data")

__all__ = ["shard_name", "list_shards", "select_shards", "read_meta", "write_shard", "shard_ranges",
           "RecordSourceDataModule",
           "LatentRecordsDataset", "LatentRecordsDataModule", "collate_records", "FORMAT"]

FORMAT = "sr_lab-latent-records-v1"
_SHARD_RE = re.compile(r"^records-(\d{9})-(\d{9})\.safetensors$")
VAE_FACTOR = 8


def shard_name(start: int, stop: int) -> str:
    return f"records-{int(start):09d}-{int(stop):09d}.safetensors"


def shard_ranges(num_records: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every shard of ``num_records`` records."""
    return [(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def list_shards(records_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """Complete shards in ``records_dir`` as ``(start, stop, path)``, sorted by start."""
    d = Path(records_dir).expanduser()
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def read_meta(records_dir: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(records_dir).expanduser() / "meta.json"
    return json.loads(f.read_text()) if f.is_file() else None


def select_shards(records_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """The shards to read: those of the partition ``meta.json`` describes (``num_records`` in
    ``shard_size`` blocks; a stale partial last shard left by a run with fewer records is ignored), or
    every shard when there is no ``meta.json``."""
    shards = list_shards(records_dir)
    meta = read_meta(records_dir)
    if not meta or "num_records" not in meta or "shard_size" not in meta:
        return shards
    wanted = set(shard_ranges(int(meta["num_records"]), int(meta["shard_size"])))
    keep = [s for s in shards if (s[0], s[1]) in wanted]
    if len(keep) < len(shards):
        log.warning("latent records: ignoring %d shard(s) in %s that are not part of its %d-record set",
                    len(shards) - len(keep), records_dir, int(meta["num_records"]))
    return keep


def write_shard(records_dir: str | os.PathLike, start: int, tensors: dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> Path:
    """Atomically write one shard (temporary file in the same folder + ``os.replace``)."""
    d = Path(records_dir).expanduser()
    n = int(tensors["index"].shape[0])
    path = d / shard_name(start, start + n)
    return atomic_safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                                   metadata={"format": FORMAT, **(metadata or {})})


def write_meta(records_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    atomic_write_text(Path(records_dir).expanduser() / "meta.json", json.dumps(meta, indent=2, sort_keys=True))


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    return (x01.float().clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# writer side
# ---------------------------------------------------------------------------------------------------
class _IndexSampler(DistributedSampler):
    """A fixed list of dataset indices. Subclasses ``DistributedSampler`` only so that Lightning does
    not wrap it in a sampler of its own under DDP (the list is already this rank's share)."""

    def __init__(self, indices: Sequence[int], world_size: int = 1, rank: int = 0):
        Sampler.__init__(self)
        self.indices = [int(i) for i in indices]
        self.num_replicas, self.rank = world_size, rank
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class RecordSourceDataModule(SRDataModule):
    """:class:`SRDataModule` plus a ``predict_dataloader`` over the records still to be written.

    Args (besides SRDataModule's): ``records_dir``, ``num_records`` (N), ``shard_size`` (S, a multiple
    of ``batch_size`` so that no batch straddles two shards). Shards already present in
    ``records_dir`` are skipped, which is how an interrupted generation resumes.
    """

    def __init__(self, *args, records_dir: str, num_records: int, shard_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if int(num_records) < 1 or int(shard_size) < 1:
            raise ValueError(f"num_records={num_records} and shard_size={shard_size} must be >= 1")
        if int(shard_size) % self.batch_size:
            raise ValueError(f"shard_size={shard_size} must be a multiple of batch_size={self.batch_size}")
        self.records_dir, self.num_records, self.shard_size = str(records_dir), int(num_records), int(shard_size)

    @classmethod
    def validate_config(cls, cfg: Any, error: type[Exception]) -> None:
        """``records.shard_size`` a positive multiple of ``data.batch_size``, ``records.num`` >= 1, and a
        ``records.dir`` that already holds records was started with the same settings."""
        super().validate_config(cfg, error)
        shard = OmegaConf.select(cfg, "records.shard_size", default=None)
        if shard is None:
            return
        bs = OmegaConf.select(cfg, "data.batch_size", default=1)
        num = OmegaConf.select(cfg, "records.num", default=None)
        if not isinstance(shard, int) or shard < 1 or shard % bs:
            raise error(f"records.shard_size={shard} must be a positive multiple of data.batch_size={bs}")
        if not isinstance(num, int) or num < 1:
            raise error(f"records.num={num} must be a positive integer")
        cls._check_records_meta(cfg, error)

    @staticmethod
    def _check_records_meta(cfg: Any, error: type[Exception]) -> None:
        """A records folder holds one set: only records.num may differ from the run that started it."""
        d = OmegaConf.select(cfg, "records.dir", default=None)
        meta = read_meta(str(d)) if d is not None else None
        if not meta:
            return
        stage1 = OmegaConf.select(cfg, "stage1", default=None)
        now = {"shard_size": OmegaConf.select(cfg, "records.shard_size"),
               "crop_size": OmegaConf.select(cfg, "data.crop_size"),
               "seed": OmegaConf.select(cfg, "seed"), "start": OmegaConf.select(cfg, "module.start", default=None),
               "stage1": str(Path(str(stage1)).expanduser().resolve()) if stage1 else None}
        for k, v in now.items():
            if v is not None and k in meta and meta[k] != v:
                raise error(f"records.dir={d} holds records written with {k}={meta[k]!r}, this run has {k}={v!r}; "
                            f"use another records.dir (or delete that folder)")

    def pending_shards(self, world_size: int = 1, rank: int = 0) -> list[tuple[int, int]]:
        """This rank's shards (``k ≡ rank mod world_size``) that are not on disk yet."""
        done = {(a, b) for a, b, _ in list_shards(self.records_dir)}
        return [r for k, r in enumerate(shard_ranges(self.num_records, self.shard_size))
                if k % world_size == rank and r not in done]

    def predict_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        _, ws, rank = self._context()
        remove_stale_temps(Path(self.records_dir).expanduser())  # shards a killed writer left half-written
        todo = self.pending_shards(ws, rank)
        indices = [i for a, b in todo for i in range(a, b)]
        total = len(shard_ranges(self.num_records, self.shard_size))
        log.info("records: rank %d writes %d of %d shard(s) (%d records) to %s", rank, len(todo), total,
                 len(indices), self.records_dir)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=_IndexSampler(indices, ws, rank),
                          drop_last=False, num_workers=self.num_workers, collate_fn=collate_hr,
                          pin_memory=self.pin_memory)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        trainer = self.trainer
        if trainer is None or not trainer.predicting:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        hr = batch["hr"]
        if hr.dtype == torch.uint8:
            hr = hr.float().div_(255.0)
        first = int(batch["first_index"])
        self._note_skipped(batch.get("skipped", []), self.train_dataset)
        gen = make_generator(self.seed, "records", first, device=hr.device)  # rank-independent
        with torch.autocast(hr.device.type, enabled=False):  # the degradation runs in float32, never autocast
            out = self.degradation(hr.float(), gen) if self.degradation is not None else {"hr": hr, "lr": hr}
        return {"hr": out["hr"], "lr": out["lr"], "index": batch["index"]}


# ---------------------------------------------------------------------------------------------------
# reader side
# ---------------------------------------------------------------------------------------------------
class LatentRecordsDataset(Dataset):
    """Records of ``records_dir`` as ``{"hr", "lr": uint8, "latent": float32, "index": n}``.

    ``train=True``: ``dataset[n]`` takes a global sample counter: record ``perm_e[n mod N]`` of the
    permutation of data-epoch ``e = n // N`` (seeded by ``(seed, e)``), cropped at a position seeded by
    ``(seed, n)``. ``train=False``: ``dataset[i]`` is record ``i``, centre-cropped.
    ``crop_size`` (HR pixels) must be a multiple of 8 and at most the records' size; ``None`` keeps the
    whole record.
    """

    def __init__(self, records_dir: str | os.PathLike, crop_size: int | None = None, seed: int = 0,
                 train: bool = True, max_items: int | None = None):
        self.shards = select_shards(records_dir)
        if not self.shards:
            raise ValueError(f"no latent record shards (records-*.safetensors) in {records_dir}; "
                             f"generate them first (experiment=stablesr_latents)")
        self.records_dir, self.seed, self.train = str(records_dir), int(seed), bool(train)
        self.starts = [a for a, _, _ in self.shards]
        self.sizes = [b - a for a, b, _ in self.shards]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.num = self.offsets[-1] if max_items is None else min(self.offsets[-1], int(max_items))
        from safetensors import safe_open

        with safe_open(str(self.shards[0][2]), "pt") as f:
            hr_shape = f.get_slice("hr").get_shape()
            lr_shape = f.get_slice("lr").get_shape()
            lat_shape = f.get_slice("latent").get_shape()
        self.hr_size, self.lr_size = int(hr_shape[-1]), int(lr_shape[-1])
        self.latent_channels = int(lat_shape[1])
        if hr_shape[-1] != hr_shape[-2]:
            raise ValueError(f"records in {records_dir} are not square ({hr_shape})")
        self.lr_factor = self.hr_size // self.lr_size
        c = self.hr_size if crop_size is None else int(crop_size)
        if c % VAE_FACTOR or c > self.hr_size or c < VAE_FACTOR:
            raise ValueError(f"crop_size={crop_size} must be a multiple of {VAE_FACTOR} and at most the "
                             f"records' size {self.hr_size}")
        if c != self.hr_size and (VAE_FACTOR % self.lr_factor or c % self.lr_factor):
            raise ValueError(f"cannot crop records whose LR is 1/{self.lr_factor} of the HR; "
                             f"use crop_size={self.hr_size}")
        self.crop_size = c
        self._files: dict[int, Any] = {}
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.num

    def __getstate__(self) -> dict:  # open shard handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _handle(self, k: int):
        f = self._files.get(k)
        if f is None:
            from safetensors import safe_open

            f = safe_open(str(self.shards[k][2]), "pt")
            self._files[k] = f
        return f

    def record(self, r: int) -> dict[str, torch.Tensor]:
        """Record number ``r`` (0 ≤ r < N in shard order)."""
        import bisect

        k = bisect.bisect_right(self.offsets, r) - 1
        row = r - self.offsets[k]
        f = self._handle(k)
        return {name: f.get_slice(name)[row:row + 1][0] for name in ("hr", "lr", "latent", "index")}

    def __getitem__(self, n: int) -> dict:
        n = int(n)
        if self.train:
            e, pos = divmod(n, self.num)
            if self._perm is None or self._perm[0] != e:
                self._perm = (e, torch.randperm(self.num, generator=make_generator(self.seed, "records-perm", e)))
            r = int(self._perm[1][pos])
        else:
            if not 0 <= n < self.num:
                raise IndexError(f"record {n} out of range for {self.num}")
            r = n
        rec = self.record(r)
        c, size = self.crop_size, self.hr_size
        if c < size:
            cells = (size - c) // VAE_FACTOR  # crop positions on the latent grid
            if self.train:
                g = make_generator(self.seed, "records-crop", n)
                top, left = (int(torch.randint(0, cells + 1, (1,), generator=g)) for _ in range(2))
            else:
                top = left = cells // 2
            lc, s = c // VAE_FACTOR, self.lr_factor
            rec["latent"] = rec["latent"][:, top:top + lc, left:left + lc]
            y, x = top * VAE_FACTOR, left * VAE_FACTOR
            rec["hr"] = rec["hr"][:, y:y + c, x:x + c]
            rec["lr"] = rec["lr"][:, y // s:(y + c) // s, x // s:(x + c) // s]
        return {"hr": rec["hr"], "lr": rec["lr"], "latent": rec["latent"].float(), "index": n,
                "record": int(rec["index"])}


def collate_records(samples: list[dict]) -> dict:
    return {"hr": torch.stack([s["hr"] for s in samples]), "lr": torch.stack([s["lr"] for s in samples]),
            "latent": torch.stack([s["latent"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "record": torch.tensor([s["record"] for s in samples], dtype=torch.int64),
            "first_index": int(samples[0]["index"])}


class LatentRecordsDataModule(LightningDataModule):
    """Reads latent records for decoder training (``data=latent_records``).

    Batches after ``on_after_batch_transfer``: ``{"hr", "lr": float in [0, 1], "latent": float,
    "index"}``. Resume is stateless as in :class:`SRDataModule`: the only state is
    ``consumed_samples`` (global sample counters already used), and rank ``r`` of ``W`` reads
    counters ``start + k·W + r``. ``degradation`` is accepted for interface compatibility and unused
    (the records already hold the LR).
    """

    needs_hr_folders: bool = False  # no HR folder to probe: the records hold HR, LR and latent
    reads_latent_records: bool = True

    @classmethod
    def validate_config(cls, cfg: Any, error: type[Exception]) -> None:
        """``data.records_dir`` holds shards; ``data.crop_size`` (if set) a positive multiple of 8."""
        d = OmegaConf.select(cfg, "data.records_dir", default=None)
        if not select_shards(str(d)):
            raise error(f"data.records_dir={d} holds no latent record shards (records-*.safetensors); "
                        f"write them first with experiment=stablesr_latents records.dir={d}")
        crop = OmegaConf.select(cfg, "data.crop_size", default=None)
        if crop is not None and (not isinstance(crop, int) or crop <= 0 or crop % 8):
            raise error(f"data.crop_size={crop} must be a positive multiple of 8")

    def __init__(self, records_dir: str, crop_size: int | None = None, batch_size: int = 4, num_workers: int = 0,
                 num_val_images: int = 4, val_batch_size: int | None = None, seed: int = 0,
                 samples_per_epoch: int | None = None, pin_memory: bool = False, persistent_workers: bool = False,
                 degradation: Any = None, **ignored: Any):
        super().__init__()
        self.records_dir, self.crop_size = str(records_dir), crop_size
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.num_val_images, self.val_batch_size = int(num_val_images), int(val_batch_size or batch_size)
        self.seed, self.samples_per_epoch = int(seed), samples_per_epoch
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.consumed_samples = 0
        self.train_dataset: LatentRecordsDataset | None = None
        self.val_dataset: LatentRecordsDataset | None = None

    def _context(self) -> tuple[bool, int, int]:
        t = self.trainer
        if t is None:
            return True, 1, 0
        return bool(t.training), int(t.world_size), int(t.global_rank)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = LatentRecordsDataset(self.records_dir, self.crop_size, self.seed, train=True)
            log.info("latent records: %d records of %d px in %s", len(self.train_dataset),
                     self.train_dataset.hr_size, self.records_dir)
        if self.val_dataset is None:
            self.val_dataset = LatentRecordsDataset(self.records_dir, self.crop_size, self.seed, train=False,
                                                    max_items=self.num_val_images)

    def effective_samples_per_epoch(self) -> int:
        _, ws, _ = self._context()
        gb = self.batch_size * ws
        if self.samples_per_epoch is not None:
            return int(self.samples_per_epoch)
        if self.train_dataset is None:
            self.setup("fit")
        return max(gb, len(self.train_dataset) // gb * gb)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        _, ws, rank = self._context()
        sampler = CounterSampler(lambda: self.consumed_samples, self.effective_samples_per_epoch(), self.batch_size,
                                 ws, rank)
        loader = _ResumableLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=self.num_workers, collate_fn=collate_records, pin_memory=self.pin_memory,
                                  persistent_workers=self.persistent_workers and self.num_workers > 0)
        loader.sr_datamodule = self
        return loader

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        ds = self.val_dataset
        workers = min(self.num_workers, math.ceil(len(ds) / self.val_batch_size))
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate_records, pin_memory=self.pin_memory)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        training, ws, rank = self._context()
        if training:
            self.consumed_samples = int(batch["first_index"]) - rank + batch["hr"].shape[0] * ws
        return {"hr": batch["hr"].float().div_(255.0), "lr": batch["lr"].float().div_(255.0),
                "latent": batch["latent"].float(), "index": batch["index"]}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_samples = int(state_dict["consumed_samples"])

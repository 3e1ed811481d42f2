"""``HRFolderDataset``: HR crops addressed by a global sample counter.

Stateless design: ``dataset[n]`` is a pure function of ``(files, crop_size, seed, n)``. The counter
``n`` (0, 1, 2, ... unbounded) fixes the epoch ``n // len(files)``, the image (through a permutation
seeded by ``derive_seed(seed, "perm", epoch)``) and the crop position / flip (a generator seeded by
``derive_seed(seed, "crop", n)``). Resuming a run therefore only needs the number of samples consumed
so far (see :class:`sr_lab.data.SRDataModule`); no RNG state is saved and worker count, prefetching or
restarts cannot change which crops are produced.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from sr_lab.utils.seeding import make_generator

from .images import ImageReadError, _probe, read_rgb_uint8
from .samples import IMAGE_EXTENSIONS, find_images

__all__ = ["HRFolderDataset", "FolderCheck", "check_hr_folder", "exclusion_reason"]

log = logging.getLogger("sr_lab.data")


def _safe_probe(path: str) -> tuple[int, int, str] | ImageReadError:
    try:
        return _probe(path)
    except ImageReadError as e:
        return e


def _probe_iter(files: Sequence[str], chunk: int = 256) -> Iterator[tuple[int, int, str] | ImageReadError]:
    """Header probes in file order, a chunk at a time on a few threads (stops early if the caller does;
    the chunks grow from 8 files, so a caller that stops at the first good file probes few more)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        i, size = 0, min(8, chunk)
        while i < len(files):
            yield from ex.map(_safe_probe, files[i : i + size])
            i, size = i + size, min(chunk, size * 4)


def exclusion_reason(info: tuple[int, int, str] | ImageReadError, crop_size: int) -> str | None:
    """Why a probed file (``_probe`` result or its error) cannot give a ``crop_size`` crop; ``None``: usable.
    The one rule shared by :class:`HRFolderDataset` and the config check (:func:`check_hr_folder`)."""
    if isinstance(info, ImageReadError):
        return f"unreadable ({info.reason})"
    if min(info[0], info[1]) < crop_size:
        return f"too small ({info[0]}x{info[1]} < crop {crop_size}x{crop_size})"
    return None


@dataclass
class FolderCheck:
    """Result of :func:`check_hr_folder`: the first usable file (``None`` if none) and, when none was
    found, what the files were (all counted; with a usable file only those probed before it)."""

    usable: str | None
    files: int
    unreadable: int = 0
    small: int = 0

    def describe(self) -> str:
        """``3 files: 2 unreadable, 1 smaller than the crop`` / ``no .bmp/.gif/... file, sub-folders included``."""
        if not self.files:
            return f"no {'/'.join(sorted(IMAGE_EXTENSIONS))} file, sub-folders included"
        return (f"{self.files} file{'s' if self.files != 1 else ''}: {self.unreadable} unreadable, "
                f"{self.small} smaller than the crop")


def check_hr_folder(roots: str | os.PathLike | Sequence[str | os.PathLike], crop_size: int) -> FolderCheck:
    """Find one file under ``roots`` that the data module can train on: listed by :func:`find_images`,
    header probed and kept by :func:`exclusion_reason` like :class:`HRFolderDataset` does, then decoded
    once (a truncated body fails only at decode time) and at least ``crop_size`` on its short side.

    Cheap on a big folder: files are probed in listing order until the first usable one (only that
    one, plus any truncated ones before it, is decoded); the counts cover every file only when none is
    usable. Raises ``FileNotFoundError`` for a root that does not exist.
    """
    files = find_images(roots)
    unreadable = small = 0
    for path, info in zip(files, _probe_iter(files)):
        reason = exclusion_reason(info, crop_size)
        if reason is None:
            try:
                arr, _ = read_rgb_uint8(path)
            except ImageReadError:
                unreadable += 1
                continue
            if min(arr.shape[:2]) >= crop_size:
                return FolderCheck(path, len(files), unreadable, small)
            small += 1
        elif isinstance(info, ImageReadError):
            unreadable += 1
        else:
            small += 1
    return FolderCheck(None, len(files), unreadable, small)


def _describe_sources(files: Sequence[str]) -> str:
    dirs = sorted({os.path.dirname(f) for f in files})
    return ", ".join(dirs[:3]) + (f" (+{len(dirs) - 3} more folders)" if len(dirs) > 3 else "") if dirs else "<no files>"


class HRFolderDataset(Dataset):
    """Square uint8 HR crops from a list of image files.

    Args:
        files: image paths (e.g. from :func:`sr_lab.data.find_images`).
        crop_size: side of the square crop; files smaller than it in either side are excluded.
        seed: base seed for the epoch permutations and the crop/flip draws.
        train: ``True``: ``dataset[n]`` takes a global sample counter (random crop + horizontal flip).
            ``False``: ``dataset[i]`` is the i-th usable file, centre-cropped, no flip.
        max_items: keep only the first ``max_items`` usable files (probing stops there).
        source: folder description for messages (default: the files' parent folders).
        quiet: log exclusions at DEBUG instead of WARNING (used for the scikit-image samples and on
            non-zero ranks); kept as ``self.quiet`` (the data module does not list quiet exclusions as skipped).

    At construction every file's header is probed; unreadable files and files smaller than the crop
    are excluded with one log record each (``sr_lab.data`` logger) and listed in ``self.excluded`` as
    ``(path, reason)``. If nothing usable remains a ``ValueError`` names the folder(s), the crop size and
    the number of files seen.

    ``__getitem__`` returns ``{"hr": uint8 3xCxC, "index": n, "skipped": -1 | file index}``. A file
    that fails to decode at load time (truncated, ...) or turns out smaller than the crop is replaced,
    deterministically, by the next file of the same permutation; ``"skipped"`` then holds the failing
    file's index in ``self.files`` so that the main process can report it.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        crop_size: int,
        seed: int,
        train: bool = True,
        *,
        max_items: int | None = None,
        source: str | None = None,
        quiet: bool = False,
    ):
        self.crop_size, self.seed, self.train, self.quiet = int(crop_size), int(seed), bool(train), bool(quiet)
        seen = [str(f) for f in files]
        self.source = source or _describe_sources(seen)
        level = logging.DEBUG if quiet else logging.WARNING
        self.files: list[str] = []
        self.excluded: list[tuple[str, str]] = []
        modes: Counter[str] = Counter()
        c = self.crop_size
        for path, info in zip(seen, _probe_iter(seen)):
            reason = exclusion_reason(info, c)
            if reason is None:
                self.files.append(path)
                if info[2] != "RGB":
                    modes[info[2]] += 1
                if max_items is not None and len(self.files) >= max_items:
                    break
                continue
            self.excluded.append((path, reason))
            log.log(level, "excluding HR image %s: %s", path, reason)
        if not self.files:
            raise ValueError(
                f"no usable HR image in {self.source}: {len(seen)} image file(s) seen, "
                f"{len(self.excluded)} excluded (unreadable or smaller than crop_size={c})"
            )
        if modes:
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%d of %d usable images in %s will be converted to 8-bit RGB at load time (%s)",
                sum(modes.values()), len(self.files), self.source,
                ", ".join(f"{m}: {k}" for m, k in sorted(modes.items())),
            )
        self._perm_cache: tuple[int, torch.Tensor] | None = None
        self._bad: dict[int, str] = {}  # per process: file index -> reason it failed at load time
        self._noted: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def permutation(self, epoch: int) -> torch.Tensor:
        """File order of data-epoch ``epoch`` (train mode)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = make_generator(self.seed, "perm", epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.files), generator=g))
        return self._perm_cache[1]

    def failure_reason(self, idx: int) -> str | None:
        """Why file ``idx`` cannot be used (decodes it in this process if not tried yet); ``None`` if fine."""
        try:
            self._load(idx)
            return None
        except ImageReadError as e:
            return e.reason

    def _load(self, idx: int) -> np.ndarray:
        if idx in self._bad:
            raise ImageReadError(self.files[idx], self._bad[idx])
        path = self.files[idx]
        try:
            arr, note = read_rgb_uint8(path)
            if min(arr.shape[:2]) < self.crop_size:
                raise ImageReadError(path, f"decoded size {arr.shape[1]}x{arr.shape[0]} < crop {self.crop_size}")
        except ImageReadError as e:
            self._bad[idx] = e.reason
            log.debug("cannot use %s at load time: %s", path, e.reason)
            raise
        if note and idx not in self._noted:
            self._noted.add(idx)
            log.debug("converted %s: %s", path, note)
        return arr

    def __getitem__(self, n: int) -> dict:
        n, num = int(n), len(self.files)
        if self.train:
            if n < 0:
                raise IndexError(f"sample counter must be >= 0, got {n}")
            order, pos = self.permutation(n // num), n % num
        else:
            if not 0 <= n < num:
                raise IndexError(f"index {n} out of range for {num} images")
            order, pos = None, n
        skipped = -1
        for step in range(num):
            idx = int(order[(pos + step) % num]) if order is not None else (pos + step) % num
            try:
                arr = self._load(idx)
                break
            except ImageReadError:
                skipped = idx if skipped < 0 else skipped
        else:
            raise RuntimeError(f"none of the {num} images in {self.source} could be decoded at crop {self.crop_size}")

        c = self.crop_size
        h, w = arr.shape[:2]
        if self.train:
            g = make_generator(self.seed, "crop", n)
            top = int(torch.randint(0, h - c + 1, (1,), generator=g))
            left = int(torch.randint(0, w - c + 1, (1,), generator=g))
            flip = bool(torch.rand(1, generator=g) < 0.5)
        else:
            top, left, flip = (h - c) // 2, (w - c) // 2, False
        patch = arr[top : top + c, left : left + c]
        if flip:
            patch = patch[:, ::-1]
        hr = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))
        return {"hr": hr, "index": n, "skipped": skipped}

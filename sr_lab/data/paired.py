"""Paired test folders (RealSR / DRealSR / synthetic HR-LR sets) and the stem-pairing rule.

**Pairing rule.** Two files pair when their *keys* are equal. The key of a file is its stem
(name without extension) with at most one trailing *role token* removed:

* ``_HR``, ``_LR``, ``_SR`` optionally followed by digits, separated by ``_``, ``-`` or ``.``
  (case-insensitive): ``Canon_001_HR`` / ``Canon_001_LR4`` (RealSR v3) -> ``Canon_001``;
* ``_x<digits>`` / ``-x<digits>``: ``DSC_1454_x1`` / ``DSC_1454_x4`` (DRealSR) -> ``DSC_1454``;
* ``x<digits>`` directly after a digit: ``0801x4`` (DIV2K LR) -> ``0801``.

Anything else is kept (``0801`` -> ``0801``; ``box2`` stays ``box2``). Keys are compared exactly
(case-sensitive). Files whose keys collide inside one folder are *duplicates*: they are reported and
none of them is paired. Every file is accounted for in the :class:`PairReport`: paired, present in
only one folder, or duplicated; size checks (``LR × scale == HR``, or SR == HR) add *mismatches*.
Nothing is dropped silently.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import probe_image, read_rgb_uint8
from .samples import find_images

__all__ = ["pair_key", "PairReport", "pair_files", "pair_folders", "PairedFolderDataset"]

_ROLE = re.compile(r"(?i)(?:[_\-.](?:hr|lr|sr)\d*|[_\-]x\d+|(?<=\d)x\d+)$")


def pair_key(path: str | os.PathLike) -> str:
    """Pairing key of ``path``: its stem without one trailing role token (module docstring)."""
    stem = Path(path).stem
    key = _ROLE.sub("", stem)
    return key or stem


@dataclass
class PairReport:
    """Outcome of pairing folder A (e.g. HR) with folder B (e.g. LR or SR), keyed by :func:`pair_key`."""

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (a_path, b_path)
    only_a: list[str] = field(default_factory=list)                  # files of A without a partner
    only_b: list[str] = field(default_factory=list)                  # files of B without a partner
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # key -> colliding files (not paired)
    mismatches: dict[str, str] = field(default_factory=dict)        # key -> reason (size check failed)

    @property
    def usable(self) -> dict[str, tuple[str, str]]:
        """Pairs that passed the size check, sorted by key."""
        return {k: v for k, v in sorted(self.pairs.items()) if k not in self.mismatches}

    def problems(self) -> list[str]:
        """One line per unpaired, duplicated or mismatched file."""
        lines = [f"missing partner: {p} (only in the first folder)" for p in self.only_a]
        lines += [f"missing partner: {p} (only in the second folder)" for p in self.only_b]
        lines += [f"duplicate key {k!r}: {', '.join(v)}" for k, v in sorted(self.duplicates.items())]
        lines += [f"size mismatch {k!r}: {r}" for k, r in sorted(self.mismatches.items())]
        return lines

    def to_dict(self) -> dict:
        return {"pairs": len(self.pairs), "usable": len(self.usable), "only_first": list(self.only_a),
                "only_second": list(self.only_b), "duplicates": dict(self.duplicates),
                "size_mismatches": dict(self.mismatches)}


def _group(files: Sequence[str]) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for f in files:
        by_key.setdefault(pair_key(f), []).append(str(f))
    return by_key


def pair_files(a_files: Sequence[str], b_files: Sequence[str]) -> PairReport:
    """Pair two file lists by key (no size check); a key held by several files of one list is a duplicate."""
    by_a, by_b = _group(a_files), _group(b_files)
    rep = PairReport()
    for k in sorted(set(by_a) | set(by_b)):
        fa, fb = by_a.get(k, []), by_b.get(k, [])
        if len(fa) > 1 or len(fb) > 1:
            rep.duplicates[k] = sorted(fa) + sorted(fb)
        elif fa and fb:
            rep.pairs[k] = (fa[0], fb[0])
        elif fa:
            rep.only_a.append(fa[0])
        else:
            rep.only_b.append(fb[0])
    return rep


def check_sizes(rep: PairReport, scale: int = 1) -> PairReport:
    """Record pairs whose sizes disagree: second × ``scale`` must equal first (W, H). Unreadable files too."""
    for k, (a, b) in rep.pairs.items():
        try:
            wa, ha = probe_image(a)
            wb, hb = probe_image(b)
        except OSError as exc:
            rep.mismatches[k] = f"unreadable: {exc}"
            continue
        if (wb * scale, hb * scale) != (wa, ha):
            want = f"{wa // scale}x{ha // scale}" if scale > 1 else f"{wa}x{ha}"
            rep.mismatches[k] = f"{Path(a).name} is {wa}x{ha}, {Path(b).name} is {wb}x{hb} (expected {want})"
    return rep


def pair_folders(a_dir: str | os.PathLike, b_dir: str | os.PathLike, scale: int = 1, recursive: bool = False) -> PairReport:
    """Pair the images of two folders by key and check sizes (``b × scale == a``)."""
    return check_sizes(pair_files(find_images(a_dir, recursive), find_images(b_dir, recursive)), scale)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)


class PairedFolderDataset(Dataset):
    """HR/LR test pairs from two folders (RealSR, DRealSR, ``sr-make-testset`` output), paired by key.

    ``hr_dir``/``lr_dir``: folders (not searched recursively unless ``recursive``); ``scale``: the SR
    factor, used to check ``LR size × scale == HR size``. Mismatched, unpaired and duplicated files are
    in ``self.report`` (see :class:`PairReport`) and are not items; with ``strict=True`` any such file
    raises ``ValueError`` listing them. Items: ``{"lr": (3, h, w), "hr": (3, H, W)}`` float in [0, 1],
    ``"key"``, ``"lr_path"``, ``"hr_path"``.
    """

    def __init__(self, hr_dir: str | os.PathLike, lr_dir: str | os.PathLike, scale: int = 4, *,
                 recursive: bool = False, strict: bool = False):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale: must be a positive int, got {scale!r}")
        for name, d in (("hr_dir", hr_dir), ("lr_dir", lr_dir)):
            if not Path(d).is_dir():
                raise FileNotFoundError(f"{name}: folder {d} does not exist")
        self.scale = scale
        self.report = pair_folders(hr_dir, lr_dir, scale, recursive)
        if strict and self.report.problems():
            raise ValueError("paired folders have problems:\n  " + "\n  ".join(self.report.problems()))
        self.items = [(k, hr, lr) for k, (hr, lr) in self.report.usable.items()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        key, hr, lr = self.items[i]
        return {"key": key, "hr_path": hr, "lr_path": lr,
                "hr": _to_tensor(read_rgb_uint8(hr)[0]), "lr": _to_tensor(read_rgb_uint8(lr)[0])}

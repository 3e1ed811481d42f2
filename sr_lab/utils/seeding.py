"""Explicit, stateless randomness.

Every random draw in sr_lab comes from a ``torch.Generator`` whose seed is derived from a base seed
and a tuple of integers that say *where* in the run the draw happens (sample counter, global step,
rank, ...). A resumed run therefore re-derives exactly the generators an uninterrupted run would use,
and no module touches the global RNG.
"""
from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def derive_seed(base: int, *keys: int | str) -> int:
    """Mix ``base`` and ``keys`` into a 63-bit seed (stable across processes and Python runs)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(base)).encode())
    for k in keys:
        h.update(b"/")
        h.update(str(k).encode())
    return int.from_bytes(h.digest(), "little") & _MASK63


def make_generator(base: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` ``(base, *keys)``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(base, *keys))
    return g

"""Real-ESRGAN's training-pair pool (BasicSR ``RealESRGANModel._dequeue_and_enqueue``), seeded and resumable.

BasicSR degrades a whole batch with one set of per-batch choices (resize direction and scale, Gaussian or
Poisson noise, second blur, final order), so the pairs of one batch are correlated. Its model keeps a pool
of ``queue_size`` (x4plus: 180) degraded pairs: while the pool fills, every batch is stored and also used
as is; once it is full, each batch is swapped against ``b`` pairs drawn at random from the pool, so a
training batch mixes pairs degraded in up to ``queue_size / b`` different batches. StableSR and CCSR
inherit it from BasicSR.

:class:`PairPool` is that operation on the batch dict the data module produces (``hr``, ``lr``,
``index``: every tensor whose first dimension is the batch is pooled together, so a pair stays a pair and
its ``index`` says which HR crop it came from). Differences from BasicSR, none of which changes what a
training batch is distributed as:

* the random permutation comes from an explicit ``torch.Generator`` (the data module derives it from
  ``(seed, "pair_pool", batch counter, rank)``), never the global RNG, so a run is reproducible and a
  resumed run repeats an uninterrupted one exactly (the pool is part of the checkpoint);
* BasicSR permutes the whole pool (a copy of every slot) and swaps the batch with its first ``b`` slots;
  here the first ``b`` entries of the same permutation are swapped in place: the same ``b`` pairs come
  out, in the same order, and the pool holds the same pairs afterwards — only their slots differ, which
  the next uniform permutation does not see;
* the pool lives on the batch's device and is created at the first batch (shapes and dtypes from it).

``size`` must be a multiple of the batch size (BasicSR asserts the same); ``size == 0`` is no pool.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["PairPool", "check_pool_size"]


def check_pool_size(size: Any, batch_size: Any) -> str | None:
    """Why ``size`` is not a valid pool size for ``batch_size`` (``None`` if it is; 0 = off)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"must be an integer >= 0 (0 = no pool), got {size!r}"
    if size and isinstance(batch_size, int) and batch_size > 0 and size % batch_size:
        lo, hi = size // batch_size * batch_size, (size // batch_size + 1) * batch_size
        near = f"{lo} or {hi}" if lo else f"{hi}"
        return (f"must be a multiple of data.batch_size={batch_size} (the pool holds whole batches, as BasicSR's "
                f"queue_size), e.g. {near}")
    return None


class PairPool:
    """``pool(batch, generator) -> batch``: BasicSR's dequeue-and-enqueue over the batch's tensors.

    Args:
        size: number of pairs held (x4plus: 180); a multiple of ``batch_size``.
        batch_size: the per-process batch size every call must have.
    """

    def __init__(self, size: int, batch_size: int):
        why = check_pool_size(size, batch_size)
        if why is None and size < 1:
            why = "must be >= 1 for a pool (0 means no pool: do not build one)"
        if why:
            raise ValueError(f"pair pool size {size} {why}")
        self.size, self.batch_size = int(size), int(batch_size)
        self.tensors: dict[str, torch.Tensor] | None = None
        self.filled = 0  # slots written so far (BasicSR queue_ptr)

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def _keys(self, batch: dict) -> list[str]:
        return [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1
                and v.shape[0] == self.batch_size]

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        keys = self._keys(batch)
        if not keys:
            raise ValueError(f"pair pool: no tensor of batch size {self.batch_size} in the batch "
                             f"({ {k: tuple(getattr(v, 'shape', ())) for k, v in batch.items()} })")
        if self.tensors is None:
            self.tensors = {k: batch[k].new_zeros((self.size, *batch[k].shape[1:])) for k in keys}
        elif sorted(self.tensors) != sorted(keys):
            raise ValueError(f"pair pool holds {sorted(self.tensors)}, the batch has {sorted(keys)}")
        for k in keys:
            pool, x = self.tensors[k], batch[k]
            if pool.shape[1:] != x.shape[1:] or pool.dtype != x.dtype:
                raise ValueError(f"pair pool: {k} is {tuple(x.shape[1:])} {x.dtype} in this batch, "
                                 f"{tuple(pool.shape[1:])} {pool.dtype} in the pool")
            if pool.device != x.device:  # restored from a checkpoint (CPU) or moved: follow the batch
                self.tensors[k] = pool.to(x.device)
        b = self.batch_size
        if not self.full:  # fill: store the batch, use it unchanged
            for k in keys:
                self.tensors[k][self.filled:self.filled + b] = batch[k]
            self.filled += b
            return batch
        # full: the first b entries of a random permutation of the pool go out, the batch takes their slots
        take = torch.randperm(self.size, generator=generator, device=generator.device)[:b]
        out = dict(batch)
        for k in keys:
            pool = self.tensors[k]
            idx = take.to(pool.device)
            out[k] = pool[idx].clone()
            pool[idx] = batch[k]
        return out

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"size", "batch_size", "filled", "tensors"}`` (tensors on the CPU; only the filled slots)."""
        tensors = {} if self.tensors is None else {k: v[:self.filled].detach().cpu().clone()
                                                   for k, v in self.tensors.items()}
        return {"size": self.size, "batch_size": self.batch_size, "filled": self.filled, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size or int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"pair pool state is for size {state['size']} / batch {state['batch_size']}, "
                             f"this pool is size {self.size} / batch {self.batch_size}")
        filled, tensors = int(state["filled"]), state.get("tensors") or {}
        if filled == 0 or not tensors:
            self.tensors, self.filled = None, 0
            return
        self.tensors = {}
        for k, v in tensors.items():
            if v.shape[0] != filled:
                raise ValueError(f"pair pool state: {k} holds {v.shape[0]} entries, filled={filled}")
            full = v.new_zeros((self.size, *v.shape[1:]))
            full[:filled] = v
            self.tensors[k] = full
        self.filled = filled

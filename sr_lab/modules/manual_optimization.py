"""Manual optimisation shared by the sr_lab stage modules (Lightning 2, ``automatic_optimization=False``).

The stage modules (diffusion adapter finetune, decoder GAN, adversarial distillation) step several
optimizers per batch, accumulate gradients over micro-batches themselves (Lightning's
``accumulate_grad_batches`` does not apply to manual optimisation) and, under DDP, make several backward
passes per forward. :class:`ManualOptimization` holds what they share:

* **DDP.** DDP's reducer expects one backward per forward, so it is switched off
  (``require_backward_grad_sync = False``, what ``no_sync`` does) at the start of every training step
  (:meth:`disable_ddp_reducer`; Lightning's forward redirection turns it back on after each step) and
  :meth:`step_optimizer` all-reduces (averages) that optimizer's gradients by hand right before its
  step. At the end of training :meth:`check_replicas_in_sync` proves the replicas hold identical
  trainable weights (``on_train_end``).
* **Steps.** :meth:`step_optimizer`: all-reduce (DDP), clip to ``grad_clip`` (norm, if set), step,
  ``zero_grad(set_to_none=True)``.
* **Accumulation.** ``accumulate`` micro-batches per iteration, ``_micro`` micro-batches trained so far
  (restored on resume by :class:`~sr_lab.modules.checkpointing.TrainableOnlyCheckpoint`),
  :meth:`is_last_micro` / :meth:`current_iteration`, and :meth:`swap_grads`, a per-slot gradient stash that
  keeps the gradients of several optimizers over the same weights apart while they accumulate.
* **The run contract** (:class:`~sr_lab.modules.protocol.TrainableStage`): :meth:`configure_run` and a
  default :meth:`trainable_parameters`.

Optimizers are built by ``optimizer_factory(params)`` (:class:`OptimizerFactory`), a Hydra
``_partial_`` from ``optim.optimizer`` in the config or, from Python, a default equal to the module's
historic optimiser.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ManualOptimization", "OptimizerFactory"]


def _plain(value: Any) -> Any:
    """OmegaConf containers and lists -> plain Python (sequences as tuples, as torch's ``betas``)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class OptimizerFactory:
    """``factory(params) -> torch.optim.Optimizer`` around a partial (Hydra ``_partial_: true`` or
    :func:`functools.partial`) or any callable.

    A partial's keyword arguments are handed to the optimizer as plain Python values: OmegaConf lists
    (``betas: ${optim.betas}``) as tuples, integer ``lr`` / ``weight_decay`` as floats — exactly what the
    modules passed before the optimiser came from the config, so the optimizer state (and what
    checkpoints hold) is unchanged. The partial itself is called (with those keywords overriding its
    own), never rebuilt.
    """

    def __init__(self, factory: Callable[..., torch.optim.Optimizer]):
        if isinstance(factory, OptimizerFactory):
            factory = factory.factory
        if not callable(factory):
            raise TypeError(f"optimizer={factory!r} must be a callable params -> torch.optim.Optimizer "
                            f"(e.g. a Hydra node with _partial_: true)")
        self.factory = factory

    @property
    def target(self) -> Any:
        """The optimizer class (or callable) the factory builds."""
        return self.factory.func if isinstance(self.factory, functools.partial) else self.factory

    def __call__(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        fixes: dict[str, Any] = {}
        for key, value in (getattr(self.factory, "keywords", None) or {}).items():
            plain = _plain(value)
            if key in ("lr", "weight_decay") and isinstance(plain, int) and not isinstance(plain, bool):
                plain = float(plain)
            if plain is not value or type(plain) is not type(value):
                fixes[key] = plain
        return self.factory(params, **fixes)

    def __repr__(self) -> str:
        kw = getattr(self.factory, "keywords", None) or {}
        args = ", ".join(f"{k}={_plain(v)!r}" for k, v in kw.items())
        return f"OptimizerFactory({getattr(self.target, '__name__', self.target)}({args}))"

    @classmethod
    def resolve(cls, optimizer: Callable | None, default: Callable, **legacy: Any) -> OptimizerFactory:
        """The factory a module uses: ``optimizer`` if given, else ``default`` with the legacy keyword
        arguments (``lr``, ``betas``, ``weight_decay`` of older configs and exports) that are not None
        applied over its own. Giving both is an error."""
        given = {k: v for k, v in legacy.items() if v is not None}
        if optimizer is not None:
            if given:
                raise ValueError(f"pass either optimizer or {', '.join(sorted(given))}, not both "
                                 f"(the optimizer factory carries its own settings)")
            return cls(optimizer)
        if given:
            if not isinstance(default, functools.partial):
                raise TypeError("legacy optimizer settings need a functools.partial default")
            default = functools.partial(default.func, *default.args, **{**default.keywords, **given})
        return cls(default)


class ManualOptimization:
    """Mixin for a :class:`lightning.pytorch.LightningModule` that optimises by hand (see module doc).

    Place it before ``pl.LightningModule`` in the bases; call :meth:`init_manual_optimization` in
    ``__init__`` and :meth:`disable_ddp_reducer` first thing in ``training_step``. A subclass that
    overrides ``on_train_start`` / ``on_train_end`` calls ``super()``.
    """

    accumulate: int
    grad_clip: float | None
    run_config: dict | None
    _micro: int
    _grad_stash: list[list[torch.Tensor | None]]

    def init_manual_optimization(self, *, accumulate: int = 1, grad_clip: float | None = None,
                                 optimizer: Callable | None = None, default_optimizer: Callable | None = None,
                                 **legacy_optimizer: Any) -> None:
        """Switch Lightning's automatic optimisation off and set the shared state: ``accumulate``,
        ``grad_clip``, the micro-batch counter, the gradient stash and ``optimizer_factory`` (see
        :meth:`OptimizerFactory.resolve`)."""
        self.automatic_optimization = False
        self.accumulate = self._check_accumulate(accumulate)
        self.grad_clip = grad_clip
        self._micro = 0  # micro-batches trained so far (restored on resume)
        self._grad_stash = []
        if default_optimizer is not None or optimizer is not None:
            self.optimizer_factory = OptimizerFactory.resolve(optimizer, default_optimizer, **legacy_optimizer)

    @staticmethod
    def _check_accumulate(accumulate: int) -> int:
        if isinstance(accumulate, bool) or int(accumulate) != accumulate or accumulate < 1:
            raise ValueError(f"accumulate={accumulate} must be >= 1")
        return int(accumulate)

    # -- the run contract (sr_lab.modules.protocol.TrainableStage) --------------------------------------
    def configure_run(self, accumulate: int, run_config: dict) -> None:
        """Set by ``sr_lab.train`` before fitting: micro-batches per iteration (derived from
        ``train.total_batch_size``) and the resolved run config (stored in checkpoints)."""
        self.accumulate = self._check_accumulate(accumulate)
        self.run_config = run_config

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- accumulation ---------------------------------------------------------------------------------
    def is_last_micro(self) -> bool:
        """The current micro-batch (``_micro``) is the last of its iteration: the optimizers step."""
        return (self._micro + 1) % self.accumulate == 0

    def current_iteration(self) -> int:
        """The training iteration the current micro-batch belongs to."""
        return self._micro // self.accumulate

    def swap_grads(self, slot: int, params: list[nn.Parameter] | None = None) -> None:
        """Exchange the live ``.grad`` of every weight in ``params`` (default: the trainable ones) with
        stash slot ``slot``. Several optimizers over the same weights accumulate apart: swap a slot in
        before its backward and out after it; swap it in once more to step it."""
        params = self.trainable_parameters() if params is None else params
        while len(self._grad_stash) <= slot:
            self._grad_stash.append([None] * len(params))
        stash = self._grad_stash[slot]
        if len(stash) != len(params):
            raise ValueError(f"gradient stash slot {slot} holds {len(stash)} tensors, got {len(params)} weights")
        for j, p in enumerate(params):
            p.grad, stash[j] = stash[j], p.grad

    # -- distributed ----------------------------------------------------------------------------------
    def _trainer_or_none(self):
        return getattr(self, "_trainer", None)

    def _ddp(self) -> bool:
        """Training under DDP with more than one process (gradients are all-reduced by hand)."""
        from lightning.pytorch.strategies import DDPStrategy

        trainer = self._trainer_or_none()
        return trainer is not None and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1

    def _fsdp(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer_or_none()
        return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)

    def disable_ddp_reducer(self) -> None:
        """Switch DDP's reducer off (Lightning turns it back on after every step); call at the start of
        every ``training_step``. A no-op without DDP."""
        if self._ddp():
            self.trainer.strategy.model.require_backward_grad_sync = False

    def all_reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the ranks (one flat all-reduce; weights without a
        gradient are left out)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step_optimizer(self, opt) -> None:
        """All-reduce ``opt``'s gradients (DDP), clip them to ``grad_clip`` (norm, if set), step, zero
        them (``set_to_none``). ``opt`` is what ``self.optimizers()`` returns."""
        if self._ddp():
            self.all_reduce_grads([p for group in opt.param_groups for p in group["params"]])
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def check_replicas_in_sync(self) -> None:
        """Under DDP: raise if the replicas' trainable weights differ (a digest per rank, all-gathered)."""
        if not self._ddp():
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.trainable_parameters()])
        digest = torch.stack([flat.sum(), flat.square().sum()])
        gathered = self.all_gather(digest)
        if not torch.allclose(gathered, gathered[0:1].expand_as(gathered), rtol=1e-6, atol=0):
            raise RuntimeError(f"DDP replicas diverged: per-rank weight digests {gathered.tolist()}")
        log.info("DDP replicas in sync (weight digest %s)", digest.tolist())

    # -- Lightning hooks ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.disable_ddp_reducer()

    def on_train_end(self) -> None:
        self.check_replicas_in_sync()

"""The contract between ``sr_lab.train`` and a stage module.

``sr_lab.train.run`` builds the stage from ``cfg.module`` (one ``hydra.utils.instantiate``) and, before
fitting (or predicting), needs from it exactly what :class:`TrainableStage` declares:

* ``optimizer_steps_per_iteration`` — Lightning ``global_step`` increments per training iteration (one
  batch of ``train.total_batch_size``): the run's ``max_steps`` and checkpoint interval are scaled by it;
* ``trainable_parameters()`` — the weights that train (logged; a predict-only stage returns ``[]``);
* ``configure_run(accumulate, run_config)`` — the micro-batches per iteration that ``train.py`` derives
  (``train.total_batch_size / (data.batch_size x world size)``) and the resolved run config (stored in
  checkpoints). A stage validates them (e.g. a predict-only stage accepts ``accumulate == 1`` only).

The stage modules in :mod:`sr_lab.modules` conform (the training ones through
:class:`~sr_lab.modules.manual_optimization.ManualOptimization`); ``train.py`` checks
``isinstance(module, TrainableStage)`` and refuses anything else with one line (:func:`missing_members`).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

__all__ = ["STAGE_MEMBERS", "TrainableStage", "missing_members"]


@runtime_checkable
class TrainableStage(Protocol):
    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Lightning ``global_step`` increments per training iteration."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train."""
        ...

    def configure_run(self, accumulate: int, run_config: dict) -> None:
        """Micro-batches per iteration and the resolved run config, set before the run starts."""
        ...


#: the members of :class:`TrainableStage`, in the order they are reported
STAGE_MEMBERS: tuple[str, ...] = ("optimizer_steps_per_iteration", "trainable_parameters", "configure_run")


def missing_members(obj: object) -> list[str]:
    """The :class:`TrainableStage` members ``obj`` lacks (methods must be callable); ``[]`` if it conforms.

    Looked up statically (a property is not evaluated), as ``isinstance`` does on Python >= 3.12."""
    import inspect

    missing = []
    for name in STAGE_MEMBERS:
        try:
            attr = inspect.getattr_static(obj, name)
        except AttributeError:
            missing.append(name)
            continue
        if name != "optimizer_steps_per_iteration" and not callable(attr) \
                and not isinstance(attr, (staticmethod, classmethod)):
            missing.append(name)
    return missing

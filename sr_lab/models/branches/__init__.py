"""Control branches (config group ``branch``; combined by :class:`sr_lab.models.runner.ControlledUNet`).

A control branch is an ``nn.Module`` that holds everything trainable about one way the LR image steers
the frozen UNet. :class:`~sr_lab.models.branches.base.ControlBranch` states the interface; a new method
plugs in a new branch class plus YAML, and the runner, stages and samplers never branch on it.
"""
from sr_lab.models.branches.base import ControlBranch

__all__ = ["ControlBranch"]

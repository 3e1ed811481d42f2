"""Pretraining the tiny SD-shaped prior from scratch (:mod:`sr_lab.pretrain.tiny`) and reading it back."""
from .prior import DEFAULT_PRIOR_DIR, TinyPriorError, load_tiny_prior

__all__ = ["DEFAULT_PRIOR_DIR", "TinyPriorError", "load_tiny_prior"]

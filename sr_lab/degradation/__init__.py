"""Synthetic degradations for real-world SR training pairs (GPU-batched, explicit randomness).

- :class:`RealESRGANDegradation`: Real-ESRGAN (Wang et al. 2021) second-order pipeline as in
  BasicSR / StableSR / CCSR (spec ``degradation_and_metrics.md`` §1).
- :class:`BicubicDegradation`: plain bicubic downscaling.
- :class:`ComposeDegradation`: a pipeline written in YAML (``degradation=compose``; :mod:`.compose`,
  ops in :mod:`.ops`, kornia-based ops in :mod:`.kornia_ops`).

Building blocks: :mod:`.kernels` (blur kernels), :mod:`.filters` (filter2d, USM),
:mod:`.noise` (Gaussian / Poisson), :mod:`.jpeg` (BasicSR-style DiffJPEG).
"""
from .bicubic import BicubicDegradation
from .compose import ComposeDegradation
from .realesrgan import RealESRGANDegradation

__all__ = ["RealESRGANDegradation", "BicubicDegradation", "ComposeDegradation"]

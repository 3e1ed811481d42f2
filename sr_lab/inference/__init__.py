"""Method-agnostic inference: load a trained stage, sample SR images of any size for N seeds.

* :func:`load_stage` — rebuild a stage from ``<run>/export`` or a ``.ckpt`` (``stage.py``);
* :class:`SRPipeline` — LR -> exactly ``upscale`` x SR with any sampler/adapter, CFG, aggregation
  sampling, tiled VAE, colour fix (``pipeline.py``);
* :func:`run_inference` — the ``sr-infer`` Hydra app, also callable in-process (``run.py``).
"""
from sr_lab.inference.color_fix import adain_color_fix, color_fix, wavelet_color_fix
from sr_lab.inference.pipeline import SRPipeline, TileSettings, VAETileSettings, seed_generators
from sr_lab.inference.stage import StageLoadError, load_stage
from sr_lab.inference.tiling import TiledModel, tiled_decode, tiled_encode


def run_inference(cfg):
    """See :func:`sr_lab.inference.run.run_inference` (imported lazily: it pulls in Hydra's app)."""
    from sr_lab.inference.run import run_inference as _run

    return _run(cfg)


__all__ = ["load_stage", "StageLoadError", "SRPipeline", "TileSettings", "VAETileSettings", "seed_generators",
           "TiledModel", "tiled_encode", "tiled_decode", "color_fix", "adain_color_fix", "wavelet_color_fix",
           "run_inference"]

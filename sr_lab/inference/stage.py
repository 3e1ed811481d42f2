"""Load a trained stage for inference: the one stage layer, :mod:`sr_lab.modules.stage_io`."""
from sr_lab.modules.stage_io import (StageLoadError, StageSource, build_stage, describe_stage_path, load_frozen_stage,
                                     load_stage, read_stage_source)

__all__ = ["StageLoadError", "StageSource", "read_stage_source", "build_stage", "load_stage", "load_frozen_stage",
           "describe_stage_path"]

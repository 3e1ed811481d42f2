"""sr_lab: diffusion-prior real-world super-resolution as composable parts (see README.md)."""
import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (pulled in by pyiqa, imported by diffusers when present) warns at import time about
# optional CPU kernels that sr_lab never uses; keep the console for messages that matter.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

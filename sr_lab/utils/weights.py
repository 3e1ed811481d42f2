"""Where pretrained auxiliary weights (IQA metrics, LPIPS/VGG, DINOv2, CLIP) are looked up.

Nothing is downloaded at run time by sr_lab itself. A weight file named ``name`` is searched in, in order:
the explicit folder passed by the caller, ``$SR_LAB_WEIGHTS``, and the torch hub cache
``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``), which is where pyiqa and
torchvision look too. A missing file raises :class:`MissingWeights` naming the file and the folder it
should be put in.
"""
from __future__ import annotations

import os
from pathlib import Path


class MissingWeights(FileNotFoundError):
    """A pretrained weight file is not available locally."""

    def __init__(self, name: str, folder: Path, purpose: str = "", url_hint: str = ""):
        self.name, self.folder, self.purpose = name, folder, purpose
        what = f" ({purpose})" if purpose else ""
        hint = f"; it is published at {url_hint}" if url_hint else ""
        super().__init__(f"missing weight file {name}{what}: put it in {folder} "
                         f"(or set SR_LAB_WEIGHTS / TORCH_HOME){hint}")


def torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def search_dirs(folder: str | Path | None = None) -> list[Path]:
    dirs = [Path(folder).expanduser()] if folder else []
    if os.environ.get("SR_LAB_WEIGHTS"):
        dirs.append(Path(os.environ["SR_LAB_WEIGHTS"]).expanduser())
    dirs.append(torch_hub_checkpoints())
    return dirs


def find_weight(name: str, folder: str | Path | None = None, purpose: str = "", url_hint: str = "") -> Path:
    """Path of weight file ``name`` or :class:`MissingWeights` (naming the first search folder)."""
    dirs = search_dirs(folder)
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise MissingWeights(name, dirs[0], purpose, url_hint)

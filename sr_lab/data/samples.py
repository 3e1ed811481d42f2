"""Locating image files: the photos shipped with scikit-image, and recursive folder scans."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "sample_image_dir", "find_images"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def sample_image_dir() -> str:
    """The folder of sample photos inside the installed scikit-image package (``<skimage>/data``)."""
    try:
        import skimage
    except ImportError as e:
        raise FileNotFoundError(
            "data.hr_dirs is not set and scikit-image (which ships the sample photos) is not installed; "
            "install scikit-image or point data.hr_dirs at a folder of HR images"
        ) from e
    d = Path(skimage.__file__).resolve().parent / "data"
    if not d.is_dir() or not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir()):
        raise FileNotFoundError(
            f"scikit-image sample photo folder {d} is missing or holds no images (a trimmed install?); "
            "point data.hr_dirs at a folder of HR images"
        )
    return str(d)


def find_images(roots: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = True) -> list[str]:
    """Sorted paths of image files (png/jpg/jpeg/webp/bmp/tif/tiff, any case) under ``roots``.

    ``roots`` is one folder or a list of folders (a Hydra ``ListConfig`` works too); a root that does
    not exist raises ``FileNotFoundError`` naming it. A root that is itself an image file is accepted.
    Symlinked sub-folders are followed.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    found: set[str] = set()
    for root in roots:
        r = Path(os.path.expanduser(str(root)))
        if not r.exists():
            raise FileNotFoundError(f"image folder does not exist: {root}")
        if r.is_file():
            candidates = [r]
        elif recursive:  # os.walk so that symlinked sub-folders are followed
            candidates = [Path(d, f) for d, _, files in os.walk(r, followlinks=True) for f in files]
        else:
            candidates = list(r.iterdir())
        found.update(str(p) for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return sorted(found)

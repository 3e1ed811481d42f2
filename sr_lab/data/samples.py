"""Locating image files: the photos shipped with scikit-image, and recursive folder scans."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "sample_image_dir", "find_images"]

log = logging.getLogger("sr_lab.data")

# .gif: the first frame is read (palette -> RGB, transparency composited on white; see images.py)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

_warned_loops: set[str] = set()  # symlink loops already reported by this process (one warning per link)


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


def _is_within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """One scan over several roots. Every real file is listed once (deduplicated by resolved path,
    under the first path found: real folders are searched before symlinked ones), every real folder is
    searched once, and a symlinked folder that points back at one of its own ancestors (``ln -s . loop``)
    is not followed but reported with one warning naming the link."""

    def __init__(self, recursive: bool):
        self.recursive = recursive
        self.files: dict[str, str] = {}  # resolved path -> path as found
        self.searched: set[str] = set()  # resolved folders
        self.links: list[tuple[str, tuple[str, ...]]] = []  # symlinked folders to follow later, with ancestry

    def add_file(self, path: str, real: str) -> None:
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            self.files.setdefault(real, path)

    def folder(self, path: str, real: str, ancestors: tuple[str, ...] = ()) -> None:
        """Search folder ``path`` (resolved: ``real``); symlinked sub-folders are queued in ``self.links``."""
        if real in self.searched:
            return
        self.searched.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list folder %s: %s", path, e)
            return
        chain = (*ancestors, real)
        subfolders = []
        for e in entries:
            try:
                link = e.is_symlink()
                if e.is_dir():  # follows symlinks
                    if self.recursive:
                        if link:
                            self.links.append((e.path, chain))
                        else:
                            subfolders.append(e)
                elif e.is_file():  # a dangling link is neither
                    self.add_file(e.path, os.path.realpath(e.path) if link else os.path.join(real, e.name))
            except OSError:  # vanished meanwhile, permission, ...
                continue
        for e in subfolders:
            self.folder(e.path, os.path.join(real, e.name), chain)

    def follow_links(self) -> None:
        while self.links:
            path, chain = self.links.pop(0)
            real = os.path.realpath(path)
            if real in chain or _is_within(chain[-1], real):
                if path not in _warned_loops:
                    _warned_loops.add(path)
                    log.warning("symlink loop: %s points to %s, a folder that contains it; not followed "
                                "(its images are listed once, under their real folder)", path, real)
                continue
            if real not in self.searched:  # else: a second way into a folder already searched
                self.folder(path, real, chain)


def find_images(roots: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = True) -> list[str]:
    """Sorted paths of image files (png/jpg/jpeg/webp/bmp/tif/tiff/gif, any case) under ``roots``.

    ``roots`` is one folder or a list of folders (a Hydra ``ListConfig`` works too); a root that does
    not exist raises ``FileNotFoundError`` naming it. A root that is itself an image file is accepted.
    Symlinked sub-folders and files are followed, but every real file is listed once (deduplicated by
    resolved path, also across overlapping roots) and every real folder is searched once; a symlink that
    points back at a folder containing it (a loop) is skipped with one warning naming the link.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    walk = _Walk(recursive)
    for root in roots:
        r = os.path.expanduser(str(root))
        if not os.path.exists(r):
            raise FileNotFoundError(f"image folder does not exist: {root}")
        if os.path.isfile(r):
            walk.add_file(str(Path(r)), os.path.realpath(r))
        else:
            walk.folder(str(Path(r)), os.path.realpath(r))
    walk.follow_links()
    return sorted(walk.files.values())

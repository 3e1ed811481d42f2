"""Atomic output files: a result is either the complete new file or whatever was there before.

Every file sr_lab writes as a result (checkpoints, exported weights, configs, metrics, images,
``run.json``, evaluation reports, latent-record shards) goes through :func:`atomic_write`: the bytes
go to a temporary file in the target's own folder (``.<name>.<random>.tmp``), are flushed and
``fsync``-ed, the file gets the mode a plain ``open()`` would have given it (``0o666 & ~umask``;
``mkstemp`` alone creates ``0o600``, unreadable by a group sharing the project folder) and it is
moved onto the target with ``os.replace`` (atomic on POSIX, same file system by construction). On
any exception (``KeyboardInterrupt`` included) the temporary file is removed; only a hard kill
(``SIGKILL``, out of memory, power loss) can leave one, and :func:`remove_stale_temps` deletes such
leftovers at the start of the next run that writes into that folder.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

__all__ = [
    "atomic_omegaconf_save",
    "atomic_path",
    "atomic_safetensors_save",
    "atomic_save_image",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_mode",
    "is_temp_name",
    "remove_stale_temps",
]

_IMPORT_TIME = time.time()
# ".<name>.<random>.tmp" (mkstemp: 8 characters; the latent-record writer used to put its pid there)
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_umask_lock = threading.Lock()
_umask_cache: int | None = None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file name of :func:`atomic_write`."""
    return bool(_TEMP_RE.match(name))


def _umask() -> int:
    """The process umask. Read from ``/proc/self/status`` where the kernel reports it (no side effect);
    elsewhere once with ``os.umask(0)`` + restore (under a lock) and cached."""
    global _umask_cache
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        if _umask_cache is None:
            old = os.umask(0)
            os.umask(old)
            _umask_cache = old
        return _umask_cache


def file_mode() -> int:
    """The mode a newly created file gets from ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name (e.g.
    ``safetensors.torch.save_file``); on a clean exit it is synced, given the umask mode and moved
    onto ``path``; on any exception it is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, file_mode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[BinaryIO], Any], fsync: bool = True) -> Path:
    """Call ``writer`` with a binary file object opened on a temporary file in ``path``'s folder, then
    move that file onto ``path`` (see the module docstring). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            if fsync:
                os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` as is (no newline translation: a CSV's ``\\r\\n`` stays)."""
    return atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_save_image(path: str | os.PathLike, image: Any, format: str | None = None, **params: Any) -> Path:
    """Save a PIL image or an HxW(xC) uint8 array; the format comes from the suffix unless given."""
    from PIL import Image

    path = Path(path)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    if format is None:
        format = Image.registered_extensions().get(path.suffix.lower())
        if format is None:
            raise ValueError(f"{path}: no image format for the suffix {path.suffix!r}")
    return atomic_write(path, lambda f: image.save(f, format=format, **params))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_safetensors_save(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` into a temporary file (no second copy of the bytes in memory)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def atomic_omegaconf_save(cfg: Any, path: str | os.PathLike, resolve: bool = False) -> Path:
    from omegaconf import OmegaConf

    return atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=resolve))


def _process_start_time() -> float:
    """When this process started (Linux ``/proc``), else when this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime (clock ticks after boot)
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME
    # a container's time namespace can skew boot time: trust it only when it is plausible
    return start if _IMPORT_TIME - 7 * 86400 < start <= _IMPORT_TIME + 1 else _IMPORT_TIME


_DEFAULT = object()


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False, older_than: Any = _DEFAULT) -> list[Path]:
    """Delete temporary files (``.<name>.<random>.tmp``) that a killed run left in ``folder``.

    Only files last modified before ``older_than`` (a POSIX time; default: 30 s before this process
    started) are removed, so a file another process (e.g. another DDP rank, started later) is
    writing right now is never taken from under it; ``older_than=None`` removes every match.
    Symlinks and other files are never touched. Returns the removed paths."""
    root = Path(folder)
    if not root.is_dir():
        return []
    limit = _process_start_time() - 30.0 if older_than is _DEFAULT else older_than
    removed: list[Path] = []
    walk = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir()])]
    for dirpath, _, files in walk:
        for name in files:
            if not is_temp_name(name):
                continue
            p = Path(dirpath) / name
            try:
                st = p.lstat()
                if not p.is_file() or p.is_symlink() or (limit is not None and st.st_mtime >= limit):
                    continue
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                continue
            except OSError as exc:  # not ours to delete (permissions): leave it, say so
                log.warning("could not remove the stale temporary file %s: %s", p, exc)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), root)
    return removed

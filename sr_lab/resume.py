"""Resume a training run in its own folder (``sr-train ckpt_path=...``; see :mod:`sr_lab.train`).

* :func:`resume_overrides` — Hydra picks the run folder before any code of ours runs, so ``sr-train``
  rewrites the command line first: ``ckpt_path=<run>/checkpoints/<x>.ckpt`` of an sr_lab run folder (it
  has ``.hydra/``) with neither ``hydra.run.dir`` nor ``paths.output_dir`` given adds
  ``hydra.run.dir=<run>``; a resume into a folder that already holds a run writes its Hydra record to
  ``.hydra/resume_<date>/``.
* :func:`resolve_ckpt_path` — ``ckpt_path=last`` / ``auto``: the newest complete checkpoint of the run
  folder (BasicSR's ``auto_resume``); a truncated file is skipped with a warning.
* :func:`csv_resume_version`, :func:`continue_csv_history` — the CSV logger reuses the newest
  ``version_N`` holding a ``metrics.csv`` and keeps its rows up to the checkpoint's step, so the file
  holds one history.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
import warnings
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sr_lab.config.validation import ConfigError

log = logging.getLogger("sr_lab.train")

RESUME_KEYWORDS = ("last", "auto")


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where this run's checkpoints go (the ModelCheckpoint's dirpath, else ``<output_dir>/checkpoints``)."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def checkpoint_global_step(path: str | os.PathLike) -> int:
    """The ``global_step`` stored in a Lightning checkpoint, read cheaply: the zip's central directory
    (a truncated file has none), then a ``weights_only`` load with ``mmap`` (tensor data are not read).
    Raises on a truncated, garbage or foreign file."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch zip archive (truncated?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    try:
        return int(ckpt["global_step"])
    finally:
        del ckpt


def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path, int] | None:
    """The newest complete checkpoint in ``folder`` as ``(path, global_step)``: the highest stored step
    (ties: the newer file, then ``last.ckpt``); files that do not load are skipped with a warning."""
    found = []
    for path in sorted(Path(folder).glob("*.ckpt")):
        if path.name.startswith(".") or not path.is_file():  # atomic writes' temporaries are hidden
            continue
        try:
            step = checkpoint_global_step(path)
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping %s: not a complete checkpoint (%s)", path, str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
            continue
        found.append((step, path.stat().st_mtime, path.name == "last.ckpt", path))
    if not found:
        return None
    step, _, _, path = max(found, key=lambda t: t[:3])
    return path, step


def resolve_ckpt_path(cfg: DictConfig) -> None:
    """``ckpt_path=last`` / ``auto``: set ``cfg.ckpt_path`` to the newest complete checkpoint of this run
    folder (:func:`checkpoint_dir`) and log which. None there: ``last`` is a config error, ``auto``
    starts fresh (``ckpt_path=null``). Any other value is left to the config validation."""
    value = cfg.get("ckpt_path")
    if not isinstance(value, str) or value.strip().lower() not in RESUME_KEYWORDS or Path(value).is_file():
        return
    keyword = value.strip().lower()
    folder = checkpoint_dir(cfg)
    found = find_resume_checkpoint(folder) if folder.is_dir() else None
    if found is None:
        if keyword == "last":
            raise ConfigError(f"ckpt_path=last: no complete checkpoint in {folder}; name the run to resume "
                              "(hydra.run.dir=outputs/<task>/<date> ckpt_path=last), or ckpt_path=auto to "
                              "start fresh when there is none")
        log.info("ckpt_path=auto: no checkpoint in %s, starting fresh", folder)
        cfg.ckpt_path = None
        return
    path, step = found
    log.info("ckpt_path=%s: the newest complete checkpoint is %s (global step %d)", keyword, path, step)
    cfg.ckpt_path = str(path)


def csv_resume_version(save_dir: str | os.PathLike, name: str | None) -> int | None:
    """The newest ``version_N`` under ``<save_dir>/<name>`` that holds a ``metrics.csv`` (None: none)."""
    root = Path(save_dir) / name if name else Path(save_dir)
    versions = [int(d.name[len("version_"):]) for d in root.glob("version_*")
                if d.name[len("version_"):].isdigit() and (d / "metrics.csv").is_file()]
    return max(versions) if versions else None


def _row_step(row: dict) -> float | None:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return None


def continue_csv_history(loggers: list, step: int) -> None:
    """Resuming at ``global_step`` ``step``: each CSV logger appends to its ``metrics.csv``, which keeps the
    rows up to ``step`` (those logged after the checkpoint are logged again). Lightning's CSV writer
    deletes an existing file when it starts, so the kept rows are put back right after, under the writer's
    header."""
    from lightning.pytorch.loggers import CSVLogger

    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = sorted(reader.fieldnames or [])
            rows = [r for r in reader if (s := _row_step(r)) is not None and s <= step]
        with warnings.catch_warnings():  # "Previous log files ... will be deleted": they are put back below
            warnings.simplefilter("ignore")
            writer = lg.experiment
        buf = io.StringIO()
        out = csv.DictWriter(buf, fieldnames=keys)  # the csv module's "\r\n", as Lightning writes
        out.writeheader()
        out.writerows(rows)
        from sr_lab.utils.atomic import atomic_write_text

        atomic_write_text(path, buf.getvalue())
        writer.metrics_keys = list(keys)  # the writer appends under this header (and rewrites it for new keys)
        log.info("metrics: %s continues (%d rows up to step %d kept)", path, len(rows), step)


_PLAIN_VALUE = re.compile(r"[\w./:@+~%-]+")


def _override_value(text: str) -> str | None:
    """``text`` as a Hydra override value (quoted when needed; None: not expressible safely)."""
    if _PLAIN_VALUE.fullmatch(text):
        return text
    if "\\" in text or "${" in text:
        return None
    return "'" + text.replace("'", "\\'") + "'"


def resume_overrides(argv: list[str]) -> list[str]:
    """Overrides :func:`main` adds to the command line so a resumed run continues in its run folder (see
    the module docstring). ``argv``: the command line without the program."""
    if any(a in ("-m", "--multirun") for a in argv):
        return []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
    except Exception:  # noqa: BLE001  # pragma: no cover
        return []
    given = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag, or a flag's value (--config-name train)
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001  # Hydra reports it
            continue
        given[override.key_or_group] = override
    ckpt = given.get("ckpt_path")
    ckpt = None if ckpt is None or ckpt.is_delete() else ckpt.value()
    if not isinstance(ckpt, str) or not ckpt:
        return []
    extra = []
    if "hydra.run.dir" in given:
        run_dir = given["hydra.run.dir"].value()
    elif "paths.output_dir" in given or ckpt.strip().lower() in RESUME_KEYWORDS:
        return []  # the user chose where the run writes / no run folder named: a new dated folder
    else:
        path = Path(os.path.abspath(os.path.expanduser(ckpt)))
        run_dir = str(path.parent.parent)
        value = _override_value(run_dir)
        if path.parent.name != "checkpoints" or not (path.parent.parent / ".hydra").is_dir() \
                or not path.is_file() or value is None:
            return []  # not a checkpoint of an sr_lab run folder: the run gets a new folder
        extra.append(f"hydra.run.dir={value}")
    if isinstance(run_dir, str) and "hydra.output_subdir" not in given \
            and (Path(run_dir) / ".hydra" / "config.yaml").is_file():
        extra.append(f"hydra.output_subdir=.hydra/resume_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    return extra

"""How every sr_lab command reports a user error: one line, once, on stderr, exit status 2.

``<kind>: <message>`` (``config error``, ``stage error`` / ``checkpoint error``, ``input error``, ``output
error``) goes to stderr exactly once, and to the job's log file (Hydra's file handler) — not to the
console log handler, which would print it a second time.
"""
from __future__ import annotations

import logging
import sys

__all__ = ["error_kind", "report_cli_error"]


def error_kind(exc: BaseException) -> str:
    """The one-line prefix of a reported error: the exception's ``kind`` attribute, ``checkpoint error`` for
    a stage file that cannot be used, else ``config error``."""
    from sr_lab.modules.stage_io import StageLoadError

    if isinstance(exc, StageLoadError):
        return "checkpoint error"
    return getattr(exc, "kind", "config error")


def report_cli_error(logger: logging.Logger, exc: BaseException) -> None:
    """Print ``<kind>: <message>`` once on stderr and write the same line to the log files."""
    msg = f"{error_kind(exc)}: {exc}"
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, None, None)
    for h in logging.getLogger().handlers + logger.handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)
    print(msg, file=sys.stderr, flush=True)

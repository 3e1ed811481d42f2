"""Progress of ``sr-infer``: one known total, a bar on a terminal, plain log lines otherwise.

The unit is one **model call for one image and one seed** (one sampler step of one output row; the
doubled rows of classifier-free guidance and the tiles of aggregation sampling are inside it), so
the total is ``images × seeds × model calls per image`` (``model_calls_per_image`` of ``run.json``).
A sampler step on a batch of B images × n seeds advances it by B·n; an unreadable input that is
skipped takes its share off the total.

``progress`` (``conf/infer.yaml``): ``true`` (auto) shows a tqdm bar with that total when stdout and
stderr are both terminals, and otherwise writes plain log lines (no cursor codes in a redirected log):
one line with the totals at the start, then a line whenever another 10 % of the total is done or a
minute has passed, e.g.::

    image 3/20 seed 0: 50 model calls, 2.1 s/image; 150/1000 model calls (15 %), ETA 37 s

(``s/image``: seconds per input image with all its seeds, measured so far). ``auto`` = ``true``;
``bar`` / ``log`` force one of the two; ``false`` / ``none`` show nothing (the ``train.progress``
values of ``sr-train`` work too).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Sequence

__all__ = ["MODES", "InferenceProgress", "format_seconds", "resolve_mode"]

MODES = (True, False, "auto", "bar", "log", "none")


def resolve_mode(setting: Any) -> str:
    """``bar`` | ``log`` | ``off`` for a ``progress`` setting (``true``/``auto``: a bar only when stdout
    and stderr are terminals, since tqdm draws on stderr); :func:`sr_lab.progress.resolve_mode`."""
    from sr_lab.progress import resolve_mode as resolve, stream_isatty

    mode = resolve(setting, isatty=lambda: stream_isatty(sys.stdout) and stream_isatty(sys.stderr), key="progress")
    return "off" if mode == "none" else mode


def format_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _seeds_label(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) <= 4:
        return "seeds " + ",".join(str(s) for s in seeds)
    return f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)})"


class InferenceProgress:
    """Counts model calls × rows against ``images × len(seeds) × calls_per_image`` (module docstring).

    The pipeline calls :meth:`begin_chunk` / :meth:`model_call` / :meth:`end_chunk` for every sampling
    call; the caller names the images in flight with :meth:`set_images` and drops unreadable ones with
    :meth:`skip`. ``calls_per_image=None``: unknown (no total, no ETA)."""

    LOG_FRACTION = 0.1      # a log line whenever this share of the total is done …
    LOG_INTERVAL_S = 60.0   # … or this long after the previous line

    def __init__(self, images: int, seeds: Sequence[int], calls_per_image: int | None, mode: Any = True, *,
                 logger: logging.Logger | None = None, desc: str = "sr-infer", leave: bool = True):
        self.images, self.seeds = int(images), [int(s) for s in seeds]
        self.calls = None if calls_per_image is None else int(calls_per_image)
        self.total = None if self.calls is None else self.images * len(self.seeds) * self.calls
        self.done = 0
        self.mode = resolve_mode(mode)
        self.log = logger or logging.getLogger("sr_lab.infer")
        self.desc = desc
        self._images_label = f"images 1-{self.images}/{self.images}" if self.images > 1 else "image 1/1"
        self._chunk: tuple[list[int], int] | None = None   # (seeds, images) of the sampling call in flight
        self._chunk_calls = 0
        self._t0 = self._last_t = time.perf_counter()
        self._last_done = 0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit="call", desc=desc, leave=leave)
        elif self.mode == "log":
            calls = "?" if self.calls is None else str(self.calls)
            total = "?" if self.total is None else str(self.total)
            self.log.info("%s: %d image(s) x %d seed(s) x %s model calls = %s model calls", desc, self.images,
                          len(self.seeds), calls, total)

    # -- what is in flight --------------------------------------------------------------------------
    def set_images(self, first: int, count: int, of: int | None = None) -> None:
        """The images of the next sampling call: ``count`` from 0-based index ``first`` of ``of``."""
        of = self.images if of is None else of
        self._images_label = (f"image {first + 1}/{of}" if count == 1 else f"images {first + 1}-{first + count}/{of}")

    def skip(self, images: int = 1) -> None:
        """``images`` inputs will not be sampled (unreadable): the total shrinks by their share."""
        self.images -= images
        if self.total is not None:
            self.total -= images * len(self.seeds) * self.calls
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def begin_chunk(self, seeds: Sequence[int], images: int) -> None:
        self._chunk, self._chunk_calls = ([int(s) for s in seeds], int(images)), 0
        if self._bar is not None:
            self._bar.set_postfix_str(self._where(), refresh=False)

    def model_call(self) -> None:
        """One sampler step of the call in flight (all its rows)."""
        seeds, images = self._chunk or (self.seeds, 1)
        self._chunk_calls += 1
        self.done += len(seeds) * images
        if self._bar is not None:
            self._bar.update(len(seeds) * images)
        elif self.mode == "log" and (self.calls is None or self._chunk_calls < self.calls) and self._due():
            calls = "?" if self.calls is None else self.calls
            self._line(f"{self._where()}: {self._chunk_calls}/{calls} model calls")

    def end_chunk(self) -> None:
        """The sampling call in flight is done (sampled and decoded)."""
        if self.mode == "log" and self._due(final=True):
            per_image = self._per_image()
            rate = "" if per_image is None else f", {per_image:.1f} s/image"
            self._line(f"{self._where()}: {self._chunk_calls} model calls{rate}")
        self._chunk = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self.done:
            self.log.info("%s: %d model calls in %s", self.desc, self.done,
                          format_seconds(time.perf_counter() - self._t0))

    # -- internals ----------------------------------------------------------------------------------
    def _where(self) -> str:
        seeds = self._chunk[0] if self._chunk else self.seeds
        return f"{self._images_label} {_seeds_label(seeds)}"

    def _due(self, final: bool = False) -> bool:
        if self.done <= self._last_done:
            return False
        if self.total is not None and (self.done >= self.total and final):
            return True
        step = self.LOG_FRACTION * self.total if self.total else float("inf")
        return self.done - self._last_done >= step or time.perf_counter() - self._last_t >= self.LOG_INTERVAL_S

    def _per_image(self) -> float | None:
        if not self.done or not self.calls:
            return None
        return (time.perf_counter() - self._t0) * len(self.seeds) * self.calls / self.done

    def _line(self, head: str) -> None:
        self._last_done, self._last_t = self.done, time.perf_counter()
        if self.total:
            elapsed = self._last_t - self._t0
            eta = elapsed * max(self.total - self.done, 0) / self.done
            pct = 100.0 * self.done / self.total
            self.log.info("%s; %d/%d model calls (%.0f %%), ETA %s", head, self.done, self.total, pct,
                          format_seconds(eta))
        else:
            self.log.info("%s; %d model calls", head, self.done)

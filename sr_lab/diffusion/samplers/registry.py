"""What a sampler declares about itself: the exact timesteps it evaluates.

``@declares_timesteps(fn)`` attaches ``fn(T, **knobs) -> list[int]`` to a sampler function as
``sample.timesteps``. :func:`sampler_timesteps` reads it from whatever form a sampler comes in — a
bound ``functools.partial`` (what Hydra's ``_partial_: true`` gives), the function itself, or a config
dict with ``_target_`` (no model is built) — so run.json, benchmarks, sr-eval's step counts and config
validation all ask the sampler instead of recognising its name.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

__all__ = ["declares_timesteps", "sampler_timesteps", "sampler_executed_steps", "timesteps_function"]


def declares_timesteps(fn: Callable[..., list[int]], executed_steps: Callable[..., int] | None = None):
    """Attach ``fn`` (and optionally the paper's count of "steps", if it is not the number of model calls,
    e.g. CCSR Table 5's S excludes the one-step prediction at T) to a sampler function."""
    def wrap(sample):
        sample.timesteps = fn
        if executed_steps is not None:
            sample.executed_steps = executed_steps
        return sample

    return wrap


def timesteps_function(sampler: Any) -> tuple[Callable[..., list[int]], dict]:
    """(the sampler's ``timesteps`` function, the knobs bound to the sampler)."""
    fn = get_sample_function(sampler)
    if _is_config(sampler):
        knobs = {k: v for k, v in dict(sampler).items() if not str(k).startswith("_")}
    else:
        knobs = dict(sampler.keywords) if isinstance(sampler, functools.partial) else {}
    ts = getattr(fn, "timesteps", None)
    if ts is None:
        raise TypeError(f"sampler {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)} does not declare "
                        f"its timesteps (decorate it with @declares_timesteps)")
    return ts, knobs


def sampler_timesteps(sampler: Any, num_timesteps: int) -> list[int]:
    """The exact timesteps ``sampler`` evaluates for a schedule of length ``num_timesteps`` (its number of
    model calls per image and seed, without CFG/tiling multiplicity). Raises ``ValueError`` on invalid
    knobs."""
    fn, knobs = timesteps_function(sampler)
    params = inspect.signature(fn).parameters
    accepted = {k: v for k, v in knobs.items() if k in params and v is not None}
    return list(fn(int(num_timesteps), **accepted))


def sampler_executed_steps(sampler: Any, num_timesteps: int) -> int:
    """The paper's step count: the sampler's declared ``executed_steps`` (called with the same knobs as
    its ``timesteps``) or else its number of model calls."""
    fn, knobs = timesteps_function(sampler)
    counter = getattr(get_sample_function(sampler), "executed_steps", None)
    if counter is None:
        return len(sampler_timesteps(sampler, num_timesteps))
    params = inspect.signature(fn).parameters
    return int(counter(int(num_timesteps), **{k: v for k, v in knobs.items() if k in params and v is not None}))


def get_sample_function(sampler: Any) -> Callable:
    """The sampler function behind a partial, a config dict or the function itself."""
    if _is_config(sampler):
        from hydra.utils import get_method

        return get_method(str(dict(sampler)["_target_"]))
    return sampler.func if isinstance(sampler, functools.partial) else sampler


def _is_config(sampler: Any) -> bool:
    """A config mapping (dict / DictConfig) naming the sampler by ``_target_``."""
    return isinstance(sampler, dict) or (hasattr(sampler, "keys") and "_target_" in sampler)

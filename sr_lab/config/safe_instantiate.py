"""Instantiate a *stored* config (an export's ``config.yaml``, a ``.ckpt``'s ``sr_lab.config``) safely.

A trained stage is rebuilt from the config stored next to its weights. That file comes from wherever
the export came from, and ``hydra.utils.instantiate`` calls whatever ``_target_`` names: a crafted
``module: {_target_: torch.load, f: evil.pkl, weights_only: false}`` would run an arbitrary pickle
(Hydra's own blocklist stops ``os.system`` and friends, not this). So before instantiating, every
``_target_`` in the node (nested ones, those inside ``_args_`` lists, and those reached through
interpolations) must be

(a) a class or plain function *defined* in one of sr_lab's component packages
    (:data:`COMPONENT_PACKAGES`): the dotted path must start with one of them (checked before anything is
    imported, so a config cannot make us import an arbitrary module), no path segment may be private
    (``_name``), and the located object's ``__module__`` must itself lie in those packages (so
    ``sr_lab.modules.stage_io.torch.load``, a foreign object reached through an sr_lab module's namespace,
    is refused); or
(b) one of the few library classes in :data:`LIBRARY_TARGETS`.

Anything else raises :class:`UnsafeTarget` (a ``ValueError``) with one line naming the target and its
key path, e.g. ``stored config refuses module._target_=torch.load (not an allow-listed sr_lab class or
function)``.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from omegaconf import DictConfig, ListConfig

__all__ = ["UnsafeTarget", "check_targets", "safe_instantiate", "COMPONENT_PACKAGES", "LIBRARY_TARGETS"]

#: sr_lab packages whose classes/functions a stored config may name.
COMPONENT_PACKAGES: tuple[str, ...] = (
    "sr_lab.models", "sr_lab.modules", "sr_lab.losses", "sr_lab.diffusion", "sr_lab.degradation",
    "sr_lab.data", "sr_lab.inference", "sr_lab.metrics", "sr_lab.callbacks",
)

#: Library classes a stored module/backbone/sampler config may name, by exact dotted path. In this repo
#: (``grep -rn _target_ conf experiments``) the only library targets inside the nodes a stage is rebuilt
#: from are the optimizers of ``optim.optimizer`` (pulled into ``module.optimizer``): ``torch.optim.AdamW``
#: (conf/train.yaml) and ``torch.optim.Adam`` (ccsr_stage2, stablesr_cfw). The lightning Trainer,
#: ModelCheckpoint, CSVLogger, WandbLogger, DDP/FSDP strategies and the submitit launcher only appear in
#: the trainer/logger/callbacks/hydra groups, which a stored stage is never rebuilt from, so they are not
#: here. Add a class (exact path) only when a stage config legitimately names it.
LIBRARY_TARGETS: frozenset[str] = frozenset({"torch.optim.Adam", "torch.optim.AdamW"})

#: Function attributes that mark a plain function as a component a stored config may call:
#: ``timesteps`` (samplers, :func:`sr_lab.diffusion.samplers.registry.declares_timesteps`) and
#: ``backbone_name`` (:func:`sr_lab.models.backbone.backbone_builder`).
DECLARED_FUNCTIONS: tuple[str, ...] = ("timesteps", "backbone_name")

_MAX_DEPTH = 64
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PLAIN = re.compile(r"^[A-Za-z0-9_.\[\]-]*$")
_REFUSED = "not an allow-listed sr_lab class or function"


class UnsafeTarget(ValueError):
    """A stored config names a ``_target_`` outside the allow-list (one line: target and key path)."""


def _show(value: Any) -> str:
    """A value as one short line (crafted keys/targets may hold newlines or be very long)."""
    s = value if isinstance(value, str) else repr(value)
    if not _PLAIN.match(s):
        s = repr(s)
    return s if len(s) <= 200 else s[:197] + "..."


def _in_packages(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in COMPONENT_PACKAGES)


def _refusal(target: Any) -> str | None:
    """``None`` if ``target`` is allowed, else the reason (a short phrase)."""
    if not isinstance(target, str):
        return f"a {type(target).__name__}, not a dotted path; {_REFUSED}"
    if not _DOTTED.match(target):
        return _REFUSED
    library = target in LIBRARY_TARGETS
    # the dotted path first: nothing outside sr_lab's packages (or the exact library set) is imported
    if not library:
        if not any(target.startswith(p + ".") for p in COMPONENT_PACKAGES):
            return _REFUSED
        if any(part.startswith("_") for part in target.split(".")):
            return f"private name; {_REFUSED}"
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except Exception as exc:  # noqa: BLE001 - any failure to locate is a refusal
        cause = exc.__cause__ or exc
        detail = " ".join(str(cause).split())[:200]
        return f"cannot be located: {type(cause).__name__}" + (f": {detail}" if detail else "")
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return f"a {type(obj).__name__}, not a class or plain function; {_REFUSED}"
    if library:
        return None
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str) or not _in_packages(defined_in):
        return f"resolves to {_show(defined_in)}.{_show(getattr(obj, '__qualname__', '?'))}; {_REFUSED}"
    if inspect.isfunction(obj) and not any(getattr(obj, a, None) is not None for a in DECLARED_FUNCTIONS):
        # only functions that declare themselves components (samplers declare their timesteps, backbone
        # builders their name): no other sr_lab function (e.g. one that writes files) can be named
        return f"an sr_lab function that is not a declared component (sampler or backbone builder); {_REFUSED}"
    return None


def _default_key(cfg: Any) -> str:
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return str(cfg._get_full_key(None) or "")
        except Exception:  # noqa: BLE001
            return ""
    return ""


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _children(node: Any):
    """``(key, value, error)`` of a container; ``value`` resolved where possible, else the raw value and
    the resolution error."""
    if isinstance(node, (DictConfig, ListConfig)):
        if node._is_none() or node._is_missing():
            return
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        for k in keys:
            try:
                yield k, node[k], None
            except Exception as exc:  # noqa: BLE001 - unresolvable/missing: check the raw value
                try:
                    raw = node._get_node(k)._value()  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001
                    raw = None
                yield k, raw, exc
    elif isinstance(node, dict):
        yield from ((k, v, None) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        yield from ((i, v, None) for i, v in enumerate(node))


def check_targets(cfg: Any, where: str = "stored config", *, key: str | None = None) -> None:
    """Raise :class:`UnsafeTarget` on the first ``_target_`` in ``cfg`` (a DictConfig/ListConfig/dict/list,
    walked recursively, interpolations resolved where they resolve) that is not allow-listed.

    ``where`` starts the message (``"stored config"``); ``key`` is the key path of ``cfg`` itself
    (default: its full key in its config, e.g. ``module``)."""
    root = _default_key(cfg) if key is None else key
    # id -> node; the nodes are kept alive so that a temporary node made by a resolver (oc.create,
    # oc.decode) cannot be freed and its id reused by a later, unchecked one
    seen: dict[int, Any] = {}

    def walk(node: Any, path: str, depth: int) -> None:
        if not isinstance(node, (DictConfig, ListConfig, dict, list, tuple)):
            return
        if id(node) in seen:
            return
        if depth > _MAX_DEPTH:
            raise UnsafeTarget(f"{where} refuses {_show(path)} (nested deeper than {_MAX_DEPTH} levels)")
        seen[id(node)] = node
        for k, v, err in _children(node):
            sub = _join(path, k)
            if k == "_target_":
                if err is not None:
                    raise UnsafeTarget(f"{where} refuses {_show(sub)}={_show(v)} (cannot be resolved: "
                                       f"{type(err).__name__}; {_REFUSED})")
                reason = _refusal(v)
                if reason is not None:
                    raise UnsafeTarget(f"{where} refuses {_show(sub)}={_show(v)} ({reason})")
            else:
                walk(v, sub, depth + 1)

    walk(cfg, root, 0)


def safe_instantiate(cfg: Any, *args: Any, where: str = "stored config", **kwargs: Any) -> Any:
    """:func:`check_targets` then ``hydra.utils.instantiate(cfg, *args, **kwargs)``."""
    import hydra

    check_targets(cfg, where)
    return hydra.utils.instantiate(cfg, *args, **kwargs)

"""``degradation=compose``: a degradation model written in YAML as an ordered list of steps.

A pipeline is a list of steps. A leaf step is ``{op: <name>, p: <prob>, per: batch|sample, ...keys}``
with ``<name>`` one of :data:`sr_lab.degradation.ops.OPS` (Real-ESRGAN's building blocks and kornia's
functional operators). Group steps nest pipelines:

* ``{op: one_of, probs: [...], steps: [...]}`` — one of the ``steps`` (each a step or a list of steps);
* ``{op: shuffle, groups: [[...], [...]]}`` — all groups, in a uniformly random order (Real-ESRGAN's
  final stage: [resize + sinc] and [JPEG] in either order);
* ``{op: repeat, times: n, steps: [...]}`` — the same steps n times with independent draws (a
  second-order degradation whose two orders share their ranges);
* ``{op: sequence, steps: [...]}`` — a sub-pipeline (useful under ``p:``).

Randomness (all from the caller's explicit ``torch.Generator``, never a global RNG; same seed, same LR
on CPU): every step's *decisions* — whether it runs (``p``), which branch, which order, a resize's
scale and mode — are drawn from one vector of uniforms that crosses to the host once per batch, per
batch (``per: batch``, as Real-ESRGAN draws these) or per sample (``per: sample``, the default).
Every step's *values* (kernels, σ, qualities, jitter amounts) are per-sample tensors drawn on the
device, always (also when the step ends up not running), so one step's draws never shift another's.
Per-sample decisions are batched by running each group of samples that decided alike as one
sub-batch; when a per-sample decision can change the image size (``resize``) the whole pipeline runs
sample by sample, like ``RealESRGANDegradation(per_sample=True)``.

After the steps: clamp, optional bicubic upsampling to the HR size (``resize_lr_to_hr``) and 8-bit
rounding (``round_lr``) exactly as :class:`~sr_lab.degradation.RealESRGANDegradation` (spec §1.3 step
9); ``no_degradation_prob`` (StableSR) returns the target itself as LR. The pipeline must end at the LR
size (H/scale, W/scale): checked when it is built. A step that cannot apply to the image sizes it can
meet (e.g. a 41-px motion kernel on an image that may be 10 px by then) is an error at config
validation, naming the step and key.

``conf/degradation/realesrgan_compose.yaml`` writes Real-ESRGAN x4plus in this language; given the
same draws it reproduces ``realesrgan`` bit for bit (tests/test_degradation_compose.py).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .ops import OPS, USM, Op, SizeContext, StepError, read_bool, read_dist, read_prob
from .realesrgan import finalize_lr, undegraded_lr

__all__ = ["ComposeDegradation", "ComposeParams", "Draw", "parse_pipeline"]

_PERS = ("sample", "batch")
_COMMON = ("op", "p", "per", "label")


# ------------------------------------------------------------------------------------------------
# draws
# ------------------------------------------------------------------------------------------------
@dataclass
class Draw:
    """What one step drew for a batch: gate and decision (one per batch, or a list of one per sample),
    per-sample value tensors, and the draws of its sub-pipelines (``children[k]``: one per node of
    sub-pipeline k)."""

    per_sample: bool
    gate: bool | list[bool]
    decision: dict | list[dict]
    values: dict = field(default_factory=dict)
    children: list[list["Draw"]] = field(default_factory=list)

    def gate_of(self, i: int) -> bool:
        return self.gate[i] if self.per_sample else self.gate

    def decision_of(self, i: int) -> dict:
        return self.decision[i] if self.per_sample else self.decision

    def select(self, idx: list[int]) -> "Draw":
        """The draws of samples ``idx`` (a sub-batch)."""
        idx_cache: dict[torch.device, Tensor] = {}

        def take(v):
            if isinstance(v, Tensor) and v.ndim >= 1:
                t = idx_cache.get(v.device)
                if t is None:
                    t = idx_cache[v.device] = torch.tensor(idx, device=v.device, dtype=torch.long)
                return v.index_select(0, t)
            if isinstance(v, dict):
                return {k: take(x) for k, x in v.items()}
            return v

        return Draw(
            per_sample=self.per_sample,
            gate=[self.gate[i] for i in idx] if self.per_sample else self.gate,
            decision=[self.decision[i] for i in idx] if self.per_sample else self.decision,
            values=take(self.values),
            children=[[c.select(idx) for c in seq] for seq in self.children],
        )


@dataclass
class ComposeParams:
    """All draws of one call: ``no_degradation`` (per batch, StableSR) and one :class:`Draw` per step."""

    no_degradation: bool
    draws: list[Draw]

    def select(self, i: int) -> "ComposeParams":
        return ComposeParams(self.no_degradation, [d.select([i]) for d in self.draws])


class _Uniforms:
    """Hands out the python uniforms of one batch in order."""

    def __init__(self, values: list[float]):
        self.values, self.pos = values, 0

    def take(self, n: int) -> list[float]:
        out = self.values[self.pos: self.pos + n]
        self.pos += n
        return out


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------
def _fold_size(rules: Sequence[str]) -> str:
    state = "keep"
    for r in rules:
        if r != "keep":
            state = r
    return state


class Node:
    """A step of a pipeline: gate ``p``, granularity ``per``, and a body (leaf op or group)."""

    n_decisions = 0

    def __init__(self, spec: Mapping[str, Any], path: str):
        self.path = path
        self.p = read_prob("p", spec.get("p", 1.0))
        per = spec.get("per", "sample")
        if per not in _PERS:
            raise StepError("per", f"must be one of {list(_PERS)}, got {per!r}")
        self.per_sample = per == "sample"
        self.label = spec.get("label")

    # --- structure -------------------------------------------------------------------------------
    def body_size_rule(self) -> str:
        return "keep"

    @property
    def size_rule(self) -> str:
        r = self.body_size_rule()
        return r if (self.p == 1.0 or r == "keep") else "random"

    def own_randomness(self) -> bool:
        return self.p < 1.0 or self.n_decisions > 0

    def needs_sample_wise(self) -> bool:
        """Per-sample decisions that can give samples different sizes: the batch cannot stay one tensor."""
        return self.per_sample and self.own_randomness() and self.size_rule == "random"

    def n_uniforms(self, batch: int) -> int:
        rows = batch if self.per_sample else 1
        return rows * ((1 if self.p < 1.0 else 0) + self.n_decisions)

    # --- drawing -----------------------------------------------------------------------------------
    def decide(self, u: Sequence[float]) -> dict:
        return {}

    def draw_values(self, batch: int, generator: torch.Generator) -> tuple[dict, list[list[Draw]]]:
        return {}, []

    def _draw_decisions(self, batch: int, uniforms: _Uniforms) -> tuple[Any, Any]:
        rows = batch if self.per_sample else 1
        gates, decisions = [], []
        for _ in range(rows):
            gates.append(uniforms.take(1)[0] < self.p if self.p < 1.0 else True)
            decisions.append(self.decide(uniforms.take(self.n_decisions)))
        if self.per_sample:
            return gates, decisions
        return gates[0], decisions[0]

    # --- running -----------------------------------------------------------------------------------
    def body(self, x: Tensor, decision: dict, draw: Draw, generator: torch.Generator, ctx: SizeContext) -> Tensor:
        raise NotImplementedError

    def run(self, x: Tensor, draw: Draw, generator: torch.Generator, ctx: SizeContext) -> Tensor:
        """Apply this step to ``x`` (a batch whose samples ``draw`` describes)."""
        if not draw.per_sample:
            return self.body(x, draw.decision, draw, generator, ctx) if draw.gate else x
        groups: dict[Any, list[int]] = {}
        for i in range(x.shape[0]):
            key = _decision_key(draw.decision[i]) if draw.gate[i] else None
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:
            key = next(iter(groups))
            return x if key is None else self.body(x, draw.decision[0], draw, generator, ctx)
        parts = []
        for key, idx in groups.items():
            if key is None:
                parts.append((idx, x[idx]))
            else:
                sub = draw.select(idx)
                parts.append((idx, self.body(x[idx], sub.decision[0], sub, generator, ctx)))
        shapes = {tuple(p.shape[1:]) for _, p in parts}
        if len(shapes) != 1:  # excluded by needs_sample_wise; kept as a guard
            raise RuntimeError(f"{self.path}: per-sample decisions gave different sizes {sorted(shapes)}")
        out = x.new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for idx, part in parts:
            out[idx] = part
        return out

    # --- static size check ---------------------------------------------------------------------
    def side_bounds(self, lo: float, hi: float, lr_side: float, where: str) -> tuple[float, float]:
        olo, ohi = self.body_side_bounds(lo, hi, lr_side, where)
        if self.p < 1.0:
            return min(lo, olo), max(hi, ohi)
        return olo, ohi

    def body_side_bounds(self, lo, hi, lr_side, where) -> tuple[float, float]:
        return lo, hi

    def describe(self, draw: Draw, i: int) -> dict | None:
        if not draw.gate_of(i):
            return None
        out = {"op": self.name}
        if self.label:
            out["label"] = self.label
        out.update(self.describe_body(draw, i))
        return out

    def describe_body(self, draw: Draw, i: int) -> dict:
        return {}


def _decision_key(d: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


class Leaf(Node):
    """A step running one :class:`~sr_lab.degradation.ops.Op`."""

    def __init__(self, spec: Mapping[str, Any], path: str):
        super().__init__(spec, path)
        name = spec.get("op")
        cls = OPS[name]
        known = set(_COMMON) | set(cls.keys)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise StepError(unknown[0], f"unknown key for op {name}; its keys: {sorted(cls.keys)} "
                                        f"(+ {list(_COMMON[1:])})")
        self.name = name
        self.op: Op = cls(spec)
        self.n_decisions = cls.n_decisions

    def body_size_rule(self) -> str:
        return self.op.size_rule

    def decide(self, u):
        return self.op.decide(u)

    def draw_values(self, batch, generator):
        return self.op.draw(batch, generator), []

    def body(self, x, decision, draw, generator, ctx):
        return self.op.apply(x, decision, draw.values, generator, ctx)

    def body_side_bounds(self, lo, hi, lr_side, where):
        need = self.op.min_side()
        if lo < need:
            raise StepError(_size_key(self.op), f"needs images of at least {need} px per side, but at this step "
                                                 f"they can be as small as {int(lo)} px ({where})")
        return self.op.out_side_bounds(lo, hi, lr_side)

    def describe_body(self, draw, i):
        return self.op.describe(draw.decision_of(i), draw.values, i)


def _size_key(op: Op) -> str:
    for k in ("length", "radius", "sigma", "kernel_list"):
        if k in op.keys:
            return k
    return "op"


class Sequence_(Node):
    """Nodes run in order (a pipeline; also the body of ``sequence``)."""

    name = "sequence"

    def __init__(self, nodes: list[Node], path: str, spec: Mapping[str, Any] | None = None):
        super().__init__(spec or {}, path)
        self.nodes = nodes

    def body_size_rule(self):
        return _fold_size([n.size_rule for n in self.nodes])

    def needs_sample_wise(self):
        return super().needs_sample_wise() or any(n.needs_sample_wise() for n in self.nodes)

    def draw_all(self, batch: int, uniforms: _Uniforms, generator: torch.Generator) -> list[Draw]:
        return [_draw(n, batch, uniforms, generator) for n in self.nodes]

    def n_all(self, batch: int) -> int:
        return sum(_n_uniforms(n, batch) for n in self.nodes)

    def run_all(self, x, draws, generator, ctx):
        for node, d in zip(self.nodes, draws):
            x = node.run(x, d, generator, ctx)
        return x

    def body(self, x, decision, draw, generator, ctx):
        return self.run_all(x, draw.children[0], generator, ctx)

    def bounds_all(self, lo, hi, lr_side, where):
        for n in self.nodes:
            try:
                lo, hi = n.side_bounds(lo, hi, lr_side, where)
            except StepError as e:
                raise _at(e, n.path) from None
        return lo, hi

    def body_side_bounds(self, lo, hi, lr_side, where):
        return self.bounds_all(lo, hi, lr_side, where)

    def describe_all(self, draws, i):
        return [s for n, d in zip(self.nodes, draws) if (s := n.describe(d, i)) is not None]

    def describe_body(self, draw, i):
        return {"steps": self.describe_all(draw.children[0], i)}


class Group(Node):
    """A step with sub-pipelines ``seqs`` (one_of branches, shuffle groups, repeat copies)."""

    def __init__(self, spec, path, seqs: list[Sequence_]):
        super().__init__(spec, path)
        self.seqs = seqs

    def needs_sample_wise(self):
        return super().needs_sample_wise() or any(s.needs_sample_wise() for s in self.seqs)

    def children_n(self, batch):
        return sum(s.n_all(batch) for s in self.seqs)

    def draw_children(self, batch, uniforms, generator):
        return [s.draw_all(batch, uniforms, generator) for s in self.seqs]


class OneOf(Group):
    name = "one_of"
    n_decisions = 1

    def __init__(self, spec, path, seqs):
        super().__init__(spec, path, seqs)
        self.probs = read_dist("probs", spec.get("probs", [1.0 / len(seqs)] * len(seqs)), len(seqs))

    def body_size_rule(self):
        rules = {s.size_rule for s in self.seqs}
        return rules.pop() if len(rules) == 1 else "random"

    def decide(self, u):
        acc, k = 0.0, len(self.probs) - 1
        for j, p in enumerate(self.probs):
            acc += p
            if u[0] < acc:
                k = j
                break
        return {"branch": k}

    def body(self, x, decision, draw, generator, ctx):
        k = decision["branch"]
        return self.seqs[k].run_all(x, draw.children[k], generator, ctx)

    def body_side_bounds(self, lo, hi, lr_side, where):
        bounds = [s.bounds_all(lo, hi, lr_side, where) for s in self.seqs]
        return min(b[0] for b in bounds), max(b[1] for b in bounds)

    def describe_body(self, draw, i):
        k = draw.decision_of(i)["branch"]
        return {"branch": k, "steps": self.seqs[k].describe_all(draw.children[k], i)}


class Shuffle(Group):
    """All groups in a uniformly random order: order index ⌊u·k!⌋ in lexicographic order of the
    permutations (k = 2: u < 0.5 keeps the written order, as Real-ESRGAN's final stage)."""

    name = "shuffle"
    n_decisions = 1

    def __init__(self, spec, path, seqs):
        super().__init__(spec, path, seqs)
        if len(seqs) > 6:
            raise StepError("groups", f"at most 6 groups can be shuffled, got {len(seqs)}")
        self.orders = list(itertools.permutations(range(len(seqs))))

    def body_size_rule(self):
        rules = [s.size_rule for s in self.seqs]
        nonkeep = {r for r in rules if r != "keep"}
        if not nonkeep:
            return "keep"
        return "lr" if nonkeep == {"lr"} else "random"

    def decide(self, u):
        return {"order": list(self.orders[min(int(u[0] * len(self.orders)), len(self.orders) - 1)])}

    def body(self, x, decision, draw, generator, ctx):
        for k in decision["order"]:
            x = self.seqs[k].run_all(x, draw.children[k], generator, ctx)
        return x

    def body_side_bounds(self, lo, hi, lr_side, where):
        out_lo, out_hi = math.inf, -math.inf
        for order in self.orders:
            a, b = lo, hi
            for k in order:
                a, b = self.seqs[k].bounds_all(a, b, lr_side, where)
            out_lo, out_hi = min(out_lo, a), max(out_hi, b)
        return out_lo, out_hi

    def describe_body(self, draw, i):
        order = draw.decision_of(i)["order"]
        return {"order": order, "groups": [self.seqs[k].describe_all(draw.children[k], i) for k in order]}


class Repeat(Group):
    name = "repeat"

    def __init__(self, spec, path, seqs):
        super().__init__(spec, path, seqs)

    def body_size_rule(self):
        return _fold_size([s.size_rule for s in self.seqs])

    def body(self, x, decision, draw, generator, ctx):
        for s, d in zip(self.seqs, draw.children):
            x = s.run_all(x, d, generator, ctx)
        return x

    def body_side_bounds(self, lo, hi, lr_side, where):
        for s in self.seqs:
            lo, hi = s.bounds_all(lo, hi, lr_side, where)
        return lo, hi

    def describe_body(self, draw, i):
        return {"repeats": [s.describe_all(d, i) for s, d in zip(self.seqs, draw.children)]}


def _n_uniforms(node: Node, batch: int) -> int:
    n = node.n_uniforms(batch)
    if isinstance(node, Group):
        n += node.children_n(batch)
    elif isinstance(node, Sequence_):
        n += node.n_all(batch)
    return n


def _draw(node: Node, batch: int, uniforms: _Uniforms, generator: torch.Generator) -> Draw:
    gate, decision = node._draw_decisions(batch, uniforms)
    if isinstance(node, Group):
        values, children = {}, node.draw_children(batch, uniforms, generator)
    elif isinstance(node, Sequence_):
        values, children = {}, [node.draw_all(batch, uniforms, generator)]
    else:
        values, children = node.draw_values(batch, generator)
    return Draw(node.per_sample, gate, decision, values, children)


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def _at(e: StepError, path: str) -> StepError:
    """Prefix a step's path to a key relative to that step (keys that already carry a path stay)."""
    return e if e.key.startswith("steps[") else StepError(f"{path}.{e.key}", e.message)


def _plain(v: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(v, (DictConfig, ListConfig)):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return v


def parse_pipeline(steps: Any, path: str = "steps") -> Sequence_:
    """Parse a list of step specs into a :class:`Sequence_`; errors are :class:`StepError` with the path."""
    steps = _plain(steps)
    if isinstance(steps, Mapping):
        steps = [steps]
    if not isinstance(steps, list) or not steps:
        raise StepError(path, f"expected a non-empty list of steps, got {steps!r}")
    return Sequence_([_parse_step(s, f"{path}[{i}]") for i, s in enumerate(steps)], path)


_GROUP_KEYS = {"one_of": ("probs", "steps"), "shuffle": ("groups",), "repeat": ("times", "steps"),
               "sequence": ("steps",)}


def _parse_step(spec: Any, path: str) -> Node:
    if isinstance(spec, list):
        return parse_pipeline(spec, path)
    if not isinstance(spec, Mapping):
        raise StepError(path, f"a step must be a mapping with an `op` key, got {spec!r}")
    op = spec.get("op")
    try:
        if op in _GROUP_KEYS:
            unknown = sorted(set(spec) - set(_COMMON) - set(_GROUP_KEYS[op]))
            if unknown:
                raise StepError(unknown[0], f"unknown key for {op}; its keys: {list(_GROUP_KEYS[op])} "
                                            f"(+ {list(_COMMON[1:])})")
            if op == "shuffle":
                groups = spec.get("groups")
                if not isinstance(groups, list) or len(groups) < 2:
                    raise StepError("groups", f"expected a list of at least two groups (lists of steps), "
                                              f"got {groups!r}")
                seqs = [parse_pipeline(g, f"{path}.groups[{k}]") for k, g in enumerate(groups)]
                return Shuffle(spec, path, seqs)
            sub = spec.get("steps")
            if not isinstance(sub, list) or not sub:
                raise StepError("steps", f"expected a non-empty list of steps, got {sub!r}")
            if op == "one_of":
                seqs = [parse_pipeline(s if isinstance(s, list) else [s], f"{path}.steps[{k}]")
                        for k, s in enumerate(sub)]
                return OneOf(spec, path, seqs)
            if op == "repeat":
                times = spec.get("times")
                if isinstance(times, bool) or not isinstance(times, int) or times < 1:
                    raise StepError("times", f"must be an int >= 1, got {times!r}")
                return Repeat(spec, path, [parse_pipeline(sub, f"{path}.steps") for _ in range(times)])
            return Sequence_(parse_pipeline(sub, f"{path}.steps").nodes, path, spec)
        if op not in OPS:
            raise StepError("op", f"unknown op {op!r}; known: {sorted(OPS)} and groups {sorted(_GROUP_KEYS)}")
        return Leaf(spec, path)
    except StepError as e:
        if e.key.startswith(path):
            raise
        raise StepError(f"{path}.{e.key}", e.message) from None


def _check_usm(seq: Sequence_) -> None:
    for i, n in enumerate(seq.nodes):
        if isinstance(n, Leaf) and isinstance(n.op, USM) and n.op.target and (i != 0 or n.p != 1.0):
            raise StepError(f"{n.path}.target", "a usm step with target: true must be the first step, with p: 1 "
                                                "(it defines the HR target)")


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------
class ComposeDegradation(nn.Module):
    """A degradation defined by a YAML pipeline (see the module docstring); called like every other.

    ``deg(hr, generator) -> {"hr": target, "lr": lr}`` with ``hr`` (B, 3, H, W) float in [0, 1] and an
    explicit ``torch.Generator`` on its device; ``sample_params`` + ``degrade`` split the draws from the
    application (a test feeds Real-ESRGAN's draws to ``realesrgan_compose``); ``describe(params)`` lists
    what every sample drew (the testset manifest records it).

    Args:
        scale: SR factor; the pipeline must end at (H/scale, W/scale).
        steps: the pipeline (list of step mappings).
        round_lr / resize_lr_to_hr / no_degradation_prob: as :class:`~sr_lab.degradation.RealESRGANDegradation`.
        where: config path used in error messages.
        crop_size: if given, the size checks run for this HR size at construction.
    """

    def __init__(self, *, steps: Any, scale: int = 4, round_lr: bool = True, resize_lr_to_hr: bool = False,
                 no_degradation_prob: float = 0.0, where: str = "degradation", crop_size: int | None = None):
        super().__init__()
        self.where = where
        try:
            if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
                raise StepError("scale", f"must be a positive int, got {scale!r}")
            self.round_lr = read_bool("round_lr", round_lr)
            self.resize_lr_to_hr = read_bool("resize_lr_to_hr", resize_lr_to_hr)
            self.no_degradation_prob = read_prob("no_degradation_prob", no_degradation_prob)
            self.pipeline = parse_pipeline(steps)
            _check_usm(self.pipeline)
            rule = self.pipeline.size_rule
            if not (rule == "lr" or (rule == "keep" and scale == 1)):
                raise StepError("steps", "the pipeline must end at the LR size (H/scale, W/scale): end with "
                                         "{op: resize, relative_to: lr} (scale_prob [0, 0, 1]) after the last "
                                         f"size-changing step (its sizes end {rule!r})")
        except StepError as e:
            raise ValueError(f"{where}.{e.key}: {e.message}") from None
        self.scale = scale
        self.sample_wise = self.pipeline.needs_sample_wise()
        # the usm step (if first, with target) defines the returned HR; registered for .to(device)
        first = self.pipeline.nodes[0]
        self._usm_step = first if isinstance(first, Leaf) and isinstance(first.op, USM) else None
        self.usm = self._usm_step.op.usm if self._usm_step is not None else None
        self._checked: set[tuple[int, int]] = set()
        if crop_size is not None:
            self.check_sizes((int(crop_size), int(crop_size)))

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: Any, error: type[Exception]) -> None:
        """Config validation hook (sr_lab.config.validation): build the pipeline (cheap, no model) and run
        the size checks for ``data.crop_size``; raise ``error`` with one line naming the step and key."""
        from omegaconf import OmegaConf

        node = OmegaConf.select(cfg, "degradation")
        kwargs = {k: OmegaConf.select(node, k) for k in ("scale", "round_lr", "resize_lr_to_hr", "no_degradation_prob")
                  if OmegaConf.select(node, k) is not None}
        crop = OmegaConf.select(cfg, "data.crop_size")
        try:
            cls(steps=OmegaConf.select(node, "steps"), crop_size=crop, **kwargs)
        except ValueError as e:
            raise error(str(e)) from None

    def check_sizes(self, hw: tuple[int, int]) -> None:
        """Raise if some step cannot apply to the sizes an HR image of ``hw`` can reach at that step."""
        if hw in self._checked:
            return
        side = min(hw)
        if hw[0] % self.scale or hw[1] % self.scale:
            raise ValueError(f"{self.where}: HR size {hw} must be divisible by scale={self.scale}")
        try:
            self.pipeline.bounds_all(side, side, side / self.scale, f"HR {side} px, scale {self.scale}")
        except StepError as e:
            raise ValueError(f"{self.where}.{e.key}: {e.message}") from None
        self._checked.add(hw)

    # ---------------------------------------------------------------------------------------------
    def sample_params(self, batch: int, generator: torch.Generator) -> ComposeParams:
        """Draw every decision (one host transfer) and every per-sample value of a batch from ``generator``."""
        g = generator
        n = 1 + self.pipeline.n_all(batch)
        u = torch.rand(n, generator=g, device=g.device, dtype=torch.float64).tolist()
        uniforms = _Uniforms(u[1:])
        draws = self.pipeline.draw_all(batch, uniforms, g)
        return ComposeParams(no_degradation=u[0] < self.no_degradation_prob, draws=draws)

    def degrade(self, hr: Tensor, params: ComposeParams, generator: torch.Generator) -> dict[str, Tensor]:
        """Apply the pipeline with the draws ``params`` (noise maps drawn from ``generator`` as needed)."""
        hw = tuple(hr.shape[-2:])
        self.check_sizes(hw)
        ctx = SizeContext(hw, self.scale)
        x = hr.float()
        nodes, draws = self.pipeline.nodes, params.draws
        target, src = x, x
        if self._usm_step is not None:
            op = self._usm_step.op
            sharp = self.usm(x)
            target = sharp if op.target else x
            src = sharp if op.input else x
            nodes, draws = nodes[1:], draws[1:]
        if params.no_degradation:
            return {"hr": target, "lr": undegraded_lr(target, hw, self.scale, self.round_lr, self.resize_lr_to_hr)}
        if not self.sample_wise:
            out = self._run(src, nodes, draws, generator, ctx)
        else:
            outs = []
            for i in range(src.shape[0]):
                outs.append(self._run(src[i: i + 1], nodes, [d.select([i]) for d in draws], generator, ctx))
            out = torch.cat(outs, dim=0)
        lr = finalize_lr(out, hw, self.round_lr, self.resize_lr_to_hr)
        return {"hr": target, "lr": lr.contiguous()}

    @staticmethod
    def _run(x, nodes, draws, generator, ctx):
        for node, d in zip(nodes, draws):
            x = node.run(x, d, generator, ctx)
        return x

    def forward(self, hr: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Degrade ``hr`` (B, 3, H, W) in [0, 1] with randomness from ``generator``."""
        if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
            raise ValueError(f"hr: expected a float tensor (B, 3, H, W), got {tuple(hr.shape)} {hr.dtype}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != hr.device.type:
            raise ValueError(f"generator: on {generator.device}, but hr is on {hr.device}")
        self.check_sizes(tuple(hr.shape[-2:]))
        params = self.sample_params(hr.shape[0], generator)
        out = self.degrade(hr, params, generator)
        self._last_params = params
        return out

    @property
    def last_traces(self) -> list[dict]:
        """What each sample of the last call drew (sr-make-testset's manifest); built on access, so training
        pays no host transfers for it."""
        params = getattr(self, "_last_params", None)
        return [] if params is None else self.describe(params)

    @last_traces.setter
    def last_traces(self, value: list) -> None:  # sr-make-testset resets it before each call
        self._last_params = None

    def describe(self, params: ComposeParams) -> list[dict]:
        """Per sample: the steps that ran and what they drew (JSON-able)."""
        batch = _batch_of(params)
        return [{"no_degradation": params.no_degradation,
                 "steps": self.pipeline.describe_all(params.draws, i)} for i in range(batch)]

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, steps={len(self.pipeline.nodes)}, sample_wise={self.sample_wise}, "
                f"round_lr={self.round_lr}, resize_lr_to_hr={self.resize_lr_to_hr}")


def _batch_of(params: ComposeParams) -> int:
    def walk(d: Draw) -> int | None:
        if d.per_sample:
            return len(d.gate)
        for v in d.values.values():
            if isinstance(v, Tensor) and v.ndim >= 1:
                return v.shape[0]
            if isinstance(v, dict):
                for t in v.values():
                    if isinstance(t, Tensor) and t.ndim >= 1:
                        return t.shape[0]
        for seq in d.children:
            for c in seq:
                b = walk(c)
                if b is not None:
                    return b
        return None

    for d in params.draws:
        b = walk(d)
        if b is not None:
            return b
    return 1

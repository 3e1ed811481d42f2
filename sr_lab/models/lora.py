"""LoRA adaptation of the frozen SD parts, as in ClearSR (paper 003, Sec. 3.1 and App. A).

ClearSR adds rank-16 LoRA layers (a) to every convolution and attention layer of the VAE encoder that
encodes the LR image (so it maps LR images into the latent space correctly), and (b) to the attention
layers of the SD UNet decoder (the up blocks), to adapt the UNet to the mixed control signals. The
paper gives no LoRA alpha; we use peft's ``LoraConfig`` default (:data:`DEFAULT_ALPHA` = 8), i.e. the
LoRA branch is scaled by ``alpha / rank`` as in peft.

Two mechanisms, for two ownership situations:

* **Owned copy, peft injection** (:func:`add_peft_lora`, targets from :func:`encoder_lora_targets`):
  the LR encoder is a stage-owned *copy* of the pretrained encoder (+ ``quant_conv``); the HR targets
  keep using the frozen original. Since nobody else uses the copy, peft's LoRA layers are injected
  into it in place (``peft.inject_adapter_in_model``); the wrapped layers keep their base weights
  under ``<name>.base_layer.*`` and gain ``<name>.lora_A.<adapter>.weight`` /
  ``<name>.lora_B.<adapter>.weight``. Conv2d and Linear layers are both supported by peft.
* **Shared module, forward hooks** (:class:`HookedLoRA`, targets from
  :func:`decoder_attention_targets`): the UNet object is shared between stages (teacher and student,
  or a frozen second stage), so its module tree must not change. :class:`HookedLoRA` owns the LoRA
  weights (``lora_A`` / ``lora_B`` per target ``nn.Linear``) and adds ``scaling * B(A(x))`` to the
  targets' outputs through forward hooks that exist only while attached (:meth:`HookedLoRA.attach`,
  or the :meth:`HookedLoRA.attached` context manager around this stage's forward). It keeps no
  reference to the UNet, so neither its parameters nor its state dict include the UNet's.

Both initialise LoRA like peft's ``init_lora_weights=True`` (A: ``kaiming_uniform_(a=sqrt(5))``,
B: zeros, so the adapted model equals the base at init) from a seeded, forked CPU RNG: the result is
deterministic given ``seed`` and the global RNG is left untouched.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import torch
from torch import nn

DEFAULT_ALPHA = 8  # peft LoraConfig's default lora_alpha (the paper states only the rank, 16)

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")


def _attention_projections(module: nn.Module, prefix: str) -> list[str]:
    """Names of the q/k/v/out Linear projections of every diffusers-style attention inside ``module``
    (a module with ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]``; diffusers ``Attention``)."""
    names = []
    for name, sub in module.named_modules():
        if not all(hasattr(sub, a) for a in ("to_q", "to_k", "to_v", "to_out")):
            continue
        base = f"{prefix}{name}." if name else prefix
        for proj in ATTENTION_PROJECTIONS:
            full = base + proj
            try:
                layer = sub.get_submodule(proj)
            except AttributeError:
                continue
            if isinstance(layer, nn.Linear):
                names.append(full)
    return names


def encoder_lora_targets(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of every ``nn.Conv2d`` and every attention projection
    ``nn.Linear`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of diffusers ``Attention``) in it,
    in ``named_modules`` order: ClearSR's "each convolution layer and attention layer" of the VAE encoder."""
    convs = {name for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and name}
    projs = set(_attention_projections(module, ""))
    return [name for name, _ in module.named_modules() if name in convs or name in projs]


def decoder_attention_targets(unet: nn.Module) -> list[str]:
    """Names (relative to ``unet``) of ``to_q``/``to_k``/``to_v``/``to_out.0`` of every attention (self
    ``attn1`` and cross ``attn2``) inside ``unet.up_blocks`` of a diffusers ``UNet2DConditionModel``,
    e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``."""
    return _attention_projections(unet.up_blocks, "up_blocks.")


def add_peft_lora(module: nn.Module, targets: list[str], rank: int = 16, alpha: float = DEFAULT_ALPHA,
                  seed: int = 0, adapter_name: str = "default") -> nn.Module:
    """Inject peft LoRA (``r=rank``, ``lora_alpha=alpha``, no dropout, peft's default init) into exactly
    the submodules named in ``targets`` (Conv2d or Linear), in place; returns ``module``.

    Afterwards only the LoRA parameters (``<name>.lora_A.<adapter>.weight``,
    ``<name>.lora_B.<adapter>.weight``) require grad; base weights (``<name>.base_layer.*``) and all
    other parameters are frozen. ``lora_A`` is drawn from ``seed`` on a forked CPU RNG.
    """
    import peft

    _check_rank_alpha(rank, alpha)
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: nothing to add LoRA to")
    for name in targets:
        try:
            layer = module.get_submodule(name) if name else None
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"target {name!r} is not an nn.Conv2d/nn.Linear of the module "
                             f"(got {type(layer).__name__})")
    pattern = "(?:" + "|".join(re.escape(n) for n in targets) + ")"
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                             target_modules=pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, module, adapter_name=adapter_name)
    lora_key = re.compile(rf"(^|\.)lora_[AB]\.{re.escape(adapter_name)}\.")
    for name, p in module.named_parameters():
        p.requires_grad_(bool(lora_key.search(name)))
    wrapped = [n for n in targets if not hasattr(module.get_submodule(n), "lora_A")]
    if wrapped:
        raise RuntimeError(f"peft did not wrap target(s) {wrapped[:5]} with LoRA")
    return module


def _key(name: str) -> str:
    return name.replace(".", "__")


class HookedLoRA(nn.Module):
    """LoRA weights for ``nn.Linear`` layers of another (shared, frozen) module, applied only while
    attached via forward hooks: ``y = W x + b + (alpha / rank) * B(A(x))``, as peft's LoRA Linear.

    ``lora_A[key]`` is ``Linear(in, rank)``, ``lora_B[key]`` is ``Linear(rank, out)`` (no bias), with
    ``key`` the target name with ``.`` replaced by ``__``; ``targets`` keeps the original names. The
    root module is only inspected for shapes (and device) and never stored. The LoRA weights stay in
    the default dtype (float32) whatever the root's dtype: the hook computes the branch in the LoRA
    dtype and casts it to the layer output's dtype.
    """

    def __init__(self, root: nn.Module, targets: list[str], rank: int = 16,
                 alpha: float = DEFAULT_ALPHA, seed: int = 0):
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.targets = list(targets)
        if not self.targets:
            raise ValueError("targets is empty: nothing to add LoRA to")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets has duplicate names")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        layers = [self._linear(root, name) for name in self.targets]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, layer in zip(self.targets, layers):
                a = nn.Linear(layer.in_features, rank, bias=False)
                b = nn.Linear(rank, layer.out_features, bias=False)
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # peft init_lora_weights=True
                nn.init.zeros_(b.weight)
                self.lora_A[_key(name)] = a
                self.lora_B[_key(name)] = b
        self.to(device=layers[0].weight.device)  # float32 LoRA weights; cast with .to() if wanted

    @staticmethod
    def _linear(root: nn.Module, name: str) -> nn.Linear:
        try:
            layer = root.get_submodule(name) if name else None
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"target {name!r} is not an nn.Linear of the root module "
                             f"(got {type(layer).__name__})")
        return layer

    def _hook(self, name: str):
        key = _key(name)

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            a, b = self.lora_A[key], self.lora_B[key]
            delta = b(a(x.to(a.weight.dtype))) * self.scaling
            return output + delta.to(output.dtype)

        return hook

    def attach(self, root: nn.Module) -> list:
        """Register on every target of ``root`` a forward hook adding the LoRA branch; returns the
        handles (the caller removes them). On any error the handles already registered are removed."""
        handles = []
        try:
            for name in self.targets:
                layer = self._linear(root, name)
                a, b = self.lora_A[_key(name)], self.lora_B[_key(name)]
                if (layer.in_features, layer.out_features) != (a.in_features, b.out_features):
                    raise ValueError(f"target {name!r} is Linear({layer.in_features}, "
                                     f"{layer.out_features}), LoRA was built for "
                                     f"Linear({a.in_features}, {b.out_features})")
                handles.append(layer.register_forward_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    @contextlib.contextmanager
    def attached(self, root: nn.Module) -> Iterator["HookedLoRA"]:
        """``with lora.attached(unet): ...``: hooks exist only inside the block."""
        handles = self.attach(root)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def extra_repr(self) -> str:
        return f"targets={len(self.targets)}, rank={self.rank}, alpha={self.alpha}"

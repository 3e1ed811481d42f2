"""ClearSR (paper 003) on the tiny backbone: the composed adapter (LoRA'd LR encoder, DPM, GSPM, UNet-decoder
LoRA, CLIP image prompt) at initialisation, its gradients, the frozen rebuild of a trained run, LSA by hand
inside the real samplers, the ablation overrides and their config errors, compositions with CCSR / StableSR
parts, and the chain train -> sr-infer (ClearSR / ClearSR*) -> sr-eval over seeds."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import hydra
import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, compose_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.models.branches.base import upsample_to

CLEARSR = [*FAST, "experiment=clearsr"]
HR = (64, 64)
# the trainable parameter groups of the full adapter (names relative to the runner)
GROUPS = {
    "dpm.controlnet": lambda n: n.startswith("branches.dpm.controlnet."),
    "dpm.window_attn": lambda n: n.startswith("branches.dpm.window_attn."),
    "gspm.controlnet": lambda n: n.startswith("branches.gspm.controlnet."),
    "lr_encoder.lora_A": lambda n: n.startswith("branches.lr_encoder.") and ".lora_A." in n,
    "lr_encoder.lora_B": lambda n: n.startswith("branches.lr_encoder.") and ".lora_B." in n,
    "unet_lora.lora_A": lambda n: n.startswith("branches.unet_lora.lora.lora_A."),
    "unet_lora.lora_B": lambda n: n.startswith("branches.unet_lora.lora.lora_B."),
    "image_prompt.proj": lambda n: n.startswith("branches.image_prompt.proj."),
    "image_prompt.norm": lambda n: n.startswith("branches.image_prompt.norm."),
}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tiny backbone's ops are far too small to share between threads: one thread is ~as fast on idle
    cores and 10-30x faster when the (2) cores are shared with other processes (OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _runner(bb, overrides=()):
    """The adapter of the composed preset (plus overrides), built on ``bb`` as the stage builds it."""
    cfg = compose_train(["experiment=clearsr", *overrides])
    return hydra.utils.instantiate(cfg.adapter)(bb.unet, vae=bb.vae), cfg


def _inputs(bb, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    lr = torch.rand(b, 3, 16, 16, generator=g)
    return x, torch.tensor([10, 700][:b]), bb.prompt_embedding("", b), lr


def _zero_initialised(name: str) -> bool:
    """The outputs that make a branch exactly zero at init (ControlNet zero convs, including the last conv of
    its condition embedding, the window attention's output projection, LoRA B)."""
    return ("controlnet_down_blocks" in name or "controlnet_mid_block" in name or ".lora_B." in name
            or "controlnet_cond_embedding.conv_out." in name
            or (".window_attn." in name and ".to_out." in name))


def _perturb_zero_outputs(runner, seed=1, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    touched = []
    with torch.no_grad():
        for n, p in runner.named_parameters():
            if p.requires_grad and _zero_initialised(n):
                assert float(p.abs().sum()) == 0.0, f"{n} is not zero at initialisation"
                p.copy_(scale * torch.randn(p.shape, generator=g))
                touched.append(n)
    return touched


def _unet_hooks(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def _group(name: str) -> str | None:
    hits = [k for k, f in GROUPS.items() if f(name)]
    assert len(hits) <= 1, (name, hits)
    return hits[0] if hits else None


# ------------------------------------------------------------------------------ 1. the adapter at init
def test_at_init_without_image_prompt_the_adapter_is_exactly_the_frozen_unet(tiny_backbone):
    bb = tiny_backbone
    runner, _ = _runner(bb, ["~adapter.branches.image_prompt"])
    assert set(runner.branches) == {"lr_encoder", "dpm", "gspm", "unet_lora"}
    x, t, ctx, lr = _inputs(bb)
    hooks_before = _unet_hooks(bb.unet)
    calls = []  # the branches really run (the equality is not a skipped branch)
    wca = next(iter(runner.branches.dpm.window_attn.values()))
    h = wca.register_forward_hook(lambda *a: calls.append("wca"))
    try:
        with torch.no_grad():
            cond = runner.condition(bb, lr, HR)
            got = runner(bb.unet, x, t, ctx, cond)
            want = bb.unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        h.remove()
    assert calls and torch.equal(got, want)
    assert _unet_hooks(bb.unet) == hooks_before  # the LoRA hooks lived only for the forward
    # the same runner with its zero outputs moved is no longer the frozen UNet
    _perturb_zero_outputs(runner)
    with torch.no_grad():
        moved = runner(bb.unet, x, t, ctx, runner.condition(bb, lr, HR))
    assert not torch.allclose(moved, want, atol=1e-5)


def test_image_prompt_replaces_the_null_text_in_the_up_blocks_only(tiny_backbone):
    bb = tiny_backbone
    runner, _ = _runner(bb)
    branch = runner.branches.image_prompt
    x, t, ctx, lr = _inputs(bb)
    hooks_before = _unet_hooks(bb.unet)
    with torch.no_grad():
        cond = runner.condition(bb, lr, HR)
        emb = cond["image_context"]
        assert emb.shape == (2, branch.clip.embed_dim) and torch.equal(emb, branch.clip(lr))
        # the projection by hand: Linear -> (B, tokens, width) -> LayerNorm over width
        tokens = F.layer_norm(F.linear(emb, branch.proj.weight, branch.proj.bias).view(2, branch.tokens, -1),
                              (branch.width,), branch.norm.weight, branch.norm.bias, branch.norm.eps)
        assert tokens.shape == (2, 4, bb.unet.config.cross_attention_dim)
        assert torch.allclose(branch.prompt_tokens(emb), tokens, atol=1e-6)

        seen: dict[str, torch.Tensor] = {}
        attn2 = {n: m for n, m in bb.unet.named_modules() if n.endswith(".attn2")}
        assert any(n.startswith("up_blocks.") for n in attn2) and any(not n.startswith("up_blocks.") for n in attn2)

        def record(name):
            def hook(module, args, kwargs):
                seen[name] = kwargs["encoder_hidden_states"].detach().clone()
            return hook

        handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in attn2.items()]
        try:
            got = runner(bb.unet, x, t, ctx, cond)
        finally:
            for hd in handles:
                hd.remove()
        assert set(seen) == set(attn2)
        for name, ehs in seen.items():
            if name.startswith("up_blocks."):
                assert torch.allclose(ehs, tokens, atol=1e-6), name
            else:  # down and middle blocks keep the null text
                assert torch.equal(ehs, ctx), name

        frozen = bb.unet(x, t, encoder_hidden_states=ctx).sample
        assert not torch.allclose(got, frozen, atol=1e-4)  # the projection is not zero-initialised

        # the manual computation: the frozen UNet whose decoder transformers take the tokens instead
        def swap(module, args, kwargs):
            return args, {**kwargs, "encoder_hidden_states": tokens}

        ups = [m for n, m in bb.unet.named_modules() if n.startswith("up_blocks.") and n.count(".") == 3
               and ".attentions." in n]
        assert ups
        handles = [m.register_forward_pre_hook(swap, with_kwargs=True) for m in ups]
        try:
            manual = bb.unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            for hd in handles:
                hd.remove()
    assert torch.allclose(got, manual, atol=1e-6)
    assert _unet_hooks(bb.unet) == hooks_before


# ------------------------------------------------------------------------------------- 2. gradients
def test_one_backward_reaches_every_trainable_group_and_no_frozen_weight():
    from sr_lab.models.backbone import build_tiny

    bb = build_tiny(seed=0)  # a backbone of its own: the HR latents are compared before / after the branch
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(2, 3, 64, 64, generator=g)
    z_hr_before = bb.encode(hr)
    z_hr_sampled_before = bb.encode(hr, generator=torch.Generator().manual_seed(0), sample=True)

    runner, _ = _runner(bb)
    x, t, ctx, lr = _inputs(bb)
    up = upsample_to(lr, HR)
    # with LoRA B = 0 the LoRA'd LR encoder is the frozen VAE encoder (posterior mode, scaled)
    with torch.no_grad():
        lr_latent0 = runner.condition(bb, lr, HR)["lr_latent"]
    assert torch.equal(lr_latent0, bb.encode(up, sample=False))
    assert torch.equal(bb.encode(hr), z_hr_before)

    touched = _perturb_zero_outputs(runner)
    for part in ("controlnet_down_blocks", "controlnet_mid_block", "window_attn", "lr_encoder", "unet_lora"):
        assert any(part in n for n in touched), part

    runner.zero_grad(set_to_none=True)
    cond = runner.condition(bb, lr, HR)
    assert cond["lr_latent"].requires_grad and not cond["image_context"].requires_grad
    out = runner(bb.unet, x, t, ctx, cond)
    out.square().mean().backward()

    trainable = {n: p for n, p in runner.named_parameters() if p.requires_grad}
    by_group: dict[str, list[str]] = {k: [] for k in GROUPS}
    for n in trainable:
        grp = _group(n)
        assert grp is not None, f"{n} trains but belongs to no ClearSR part"
        by_group[grp].append(n)
    for grp, names in by_group.items():
        assert names, f"no trainable tensor in {grp}"
        assert all(trainable[n].grad is not None for n in names), grp
        assert sum(float(trainable[n].grad.abs().sum()) for n in names) > 0, f"{grp}: all-zero gradient"
    zero = [n for n, p in trainable.items() if float(p.grad.abs().sum()) == 0.0]
    assert not zero, f"{len(zero)} trainable tensors got an all-zero gradient, e.g. {zero[:3]}"

    frozen = {n: p for n, p in runner.named_parameters() if not p.requires_grad}
    assert any(".base_layer." in n for n in frozen) and any(".clip." in n for n in frozen)
    assert all(_group(n) is None for n in frozen)
    assert all(p.grad is None for p in frozen.values())
    assert all(not p.requires_grad and p.grad is None for p in bb.parameters())

    # HR targets stay on the frozen encoder; the LR condition moves with the LoRA'd copy
    with torch.no_grad():
        lr_latent1 = runner.condition(bb, lr, HR)["lr_latent"]
    assert not torch.allclose(lr_latent1, lr_latent0, atol=1e-5)
    assert not any("lora" in n for n, _ in bb.vae.named_modules())
    assert torch.equal(bb.encode(hr), z_hr_before)
    assert torch.equal(bb.encode(hr, generator=torch.Generator().manual_seed(0), sample=True), z_hr_sampled_before)


# ------------------------------------------------------------------------- 3. training and frozen rebuild
@pytest.fixture(scope="module")
def clearsr_run(tmp_path_factory):
    """A 3-iteration ClearSR run (sampler: 10 spaced steps + LSA) and the trained module itself. Three: the
    LR encoder's LoRA B is the first tensor behind three zero outputs and moves at iteration 3."""
    from sr_lab import train

    out = tmp_path_factory.mktemp("clearsr_run")
    captured = {}
    original = train.export_trainable

    def capture(module, out_dir, cfg, ema=None):
        captured["module"] = module
        return original(module, out_dir, cfg, ema=ema)

    cfg = compose_train([*CLEARSR, "train.iterations=3"], out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "export_trainable", capture)
        metrics = train.run(cfg)
    return SimpleNamespace(dir=out, export=out / "export", module=captured["module"], metrics=metrics, cfg=cfg)


def test_frozen_rebuild_gives_the_trained_eps_and_the_export_holds_only_trained_tensors(clearsr_run,
                                                                                       tiny_backbone):
    from sr_lab.models.backbone import build_tiny_trained
    from sr_lab.modules.stage_io import load_frozen_stage, load_stage

    assert math.isfinite(clearsr_run.metrics["train/loss"])
    trained = clearsr_run.module.eval()
    x, t, _, lr = _inputs(trained.backbone, seed=5)
    with torch.no_grad():
        cond = trained.prepare(lr, HR)[0]
        want = trained.denoise(x, t, cond)
        loaded, stored = load_stage(clearsr_run.export)
        frozen = load_frozen_stage(clearsr_run.export, build_tiny_trained())  # the run's backbone, built anew
        assert stored.task_name == "clearsr"
        for m in (loaded, frozen):
            assert not any(p.requires_grad for p in m.parameters())
            assert torch.allclose(m.denoise(x, t, cond), want, atol=1e-6)
            own = m.prepare(lr, HR)[0]  # its own condition: the restored LoRA'd LR encoder and CLIP
            assert torch.allclose(own["lr_latent"], cond["lr_latent"], atol=1e-6)
            assert torch.equal(own["image_context"], cond["image_context"])
            assert torch.allclose(m.denoise(x, t, own), want, atol=1e-6)
        # an untrained adapter on the same backbone gives another eps: the trained tensors were restored
        fresh = hydra.utils.instantiate(clearsr_run.cfg.adapter)(tiny_backbone.unet, vae=tiny_backbone.vae)
        untrained = fresh(tiny_backbone.unet, x, t, cond["context"], cond)
    assert not torch.allclose(untrained, want, atol=1e-6)

    state = load_file(clearsr_run.export / "trainable.safetensors")
    assert set(state) == trained.trainable_state_keys()
    allowed = ("adapter.branches.dpm.controlnet.", "adapter.branches.dpm.window_attn.",
               "adapter.branches.gspm.controlnet.", "adapter.branches.image_prompt.proj.",
               "adapter.branches.image_prompt.norm.")
    for k in state:
        assert "base_layer" not in k and ".clip." not in k and not k.startswith("backbone."), k
        assert k.startswith(allowed) or (".lora_A." in k or ".lora_B." in k), k
    for grp, member in GROUPS.items():
        assert any(member(k[len("adapter."):]) for k in state), f"export lacks {grp}"
    # they trained: the exported LoRA tensors differ from a fresh initialisation (same seed). The LR encoder
    # sits behind three zero outputs (ControlNet zero convs -> condition-embedding conv_out / window
    # attention to_out -> its LoRA B): its B first gets a gradient at iteration 3, its A at iteration 4.
    init = {f"adapter.{k}": v for k, v in fresh.state_dict().items()}
    for part, ab in (("unet_lora", "lora_A"), ("unet_lora", "lora_B"), ("lr_encoder", "lora_B")):
        keys = [k for k in state if f".{part}." in k and f".{ab}." in k]
        assert keys and any(not torch.equal(state[k], init[k]) for k in keys), (part, ab)
    b_keys = [k for k in state if ".lora_B." in k]
    assert all(float(init[k].abs().sum()) == 0 for k in b_keys)
    assert sum(float(state[k].abs().sum()) > 0 for k in b_keys) > len(b_keys) // 2


# ---------------------------------------------------------------------------------- 4. LSA by hand
def _sampler_case(name):
    from sr_lab.diffusion.samplers import ccsr_truncated, ddpm_spaced

    if name == "ddpm50":
        return ddpm_spaced.sample, {"steps": 50}, ddpm_spaced.timesteps(1000, 50)
    knobs = {"grid": 45, "t_max": 0.6667, "t_min": 0.3333}
    return ccsr_truncated.sample, knobs, ccsr_truncated.timesteps(1000, **knobs)


@pytest.mark.parametrize("name", ["ddpm50", "ccsr_truncated"])
def test_lsa_inside_the_sampler_matches_eq3_eq4_by_hand(name, tiny_backbone):
    from sr_lab.diffusion.hooks import LSAHook

    sample, knobs, ts = _sampler_case(name)
    n = len(ts)
    if name == "ccsr_truncated":  # CCSR: T-1, then 15 DDPM steps (16 model calls)
        from sr_lab.diffusion.samplers.ccsr_truncated import executed_steps

        assert n == 16 and executed_steps(1000, **knobs) == 15
    else:
        assert n == 50
    alpha, beta = 0.03, 0.05
    g = torch.Generator().manual_seed(0)
    x_lr = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    model_in, before, after = [], [], []

    def model(x, t, cond):
        model_in.append(x.clone())
        return 0.3 * x + 0.2 * cond["lr_latent"]

    def rec(store):
        def hook(i, n_, t, x_next, x0_hat, cond):
            store.append((i, n_, x_next.clone()))
            return x_next, cond
        return hook

    lsa = LSAHook(alpha=alpha, beta=beta)
    out = sample(model, noise, {"lr_latent": x_lr}, tiny_backbone.alphas_cumprod,
                 generator=torch.Generator().manual_seed(1), hook=[rec(before), lsa, rec(after)], **knobs)
    assert [i for i, _, _ in after] == list(range(n)) and {m for _, m, _ in after} == {n}
    early_end, late_start = math.ceil(0.3 * n), math.ceil(0.8 * n)
    if n == 50:  # the documented defaults: the first 15 steps early, steps 40-49 late
        assert (early_end, late_start) == (15, 40)
    phases = {}
    for (i, _, xb), (_, _, xa) in zip(before, after):
        if i < early_end:
            phases[i], want = "early", (1 - alpha) * xb + alpha * x_lr
        elif i >= late_start:
            phases[i], want = "late", (1 + beta) * xb - beta * x_lr
        else:
            phases[i], want = "middle", xb
        assert torch.allclose(xa, want, atol=1e-6, rtol=0), (i, phases[i])
        if phases[i] != "middle":
            assert not torch.allclose(xa, xb, atol=1e-4), i
        else:
            assert torch.equal(xa, xb), i
    for i, p in ((early_end - 1, "early"), (early_end, "middle"), (late_start - 1, "middle"), (late_start, "late")):
        assert phases[i] == p == lsa.phase(i, n), (i, p)
    # the adjusted latent is what the sampler continues from, and the last one is returned
    assert len(model_in) == n
    for i in range(n - 1):
        assert torch.equal(model_in[i + 1], after[i][2]), i
    assert torch.equal(out, after[-1][2])


# ---------------------------------------------------------------------------------- 5. ablations
def _check_no_gspm(r, bb):
    assert "gspm" not in r.branches and "dpm" in r.branches


def _check_no_window_attention(r, bb):
    assert not len(r.branches.dpm.window_attn)


def _window(size):
    def check(r, bb):
        wcas = list(r.branches.dpm.window_attn.values())
        assert wcas and all(w.window_size == size for w in wcas)
    return check


def _check_no_unet_lora(r, bb):
    assert "unet_lora" not in r.branches and not any("lora" in n for n, _ in r.branches.named_modules()
                                                     if not n.startswith("lr_encoder"))


def _check_ranks(r, bb):
    enc_a = [p for n, p in r.branches.lr_encoder.named_parameters() if ".lora_A." in n]
    enc_b = [p for n, p in r.branches.lr_encoder.named_parameters() if ".lora_B." in n]
    assert enc_a and all(p.shape[0] == 8 for p in enc_a) and all(p.shape[1] == 8 for p in enc_b)
    lora = r.branches.unet_lora.lora
    assert lora.rank == 32 and lora.scaling == pytest.approx(8 / 32)
    assert lora.targets and len(lora.lora_A) == len(lora.targets)
    for target in lora.targets:
        layer, key = bb.unet.get_submodule(target), target.replace(".", "__")
        assert lora.lora_A[key].weight.shape == (32, layer.in_features)
        assert lora.lora_B[key].weight.shape == (layer.out_features, 32)


@pytest.mark.parametrize("overrides,check", [
    (["~adapter.branches.gspm"], _check_no_gspm),
    (["adapter.branches.dpm.window_attention=false"], _check_no_window_attention),
    (["adapter.branches.dpm.window_size=null"], _window(None)),
    (["adapter.branches.dpm.window_size=8"], _window(8)),
    (["adapter.branches.dpm.window_size=32"], _window(32)),
    (["~adapter.branches.unet_lora"], _check_no_unet_lora),
    (["adapter.branches.lr_encoder.rank=8", "adapter.branches.unet_lora.rank=32"], _check_ranks),
], ids=["no_gspm", "no_window_attn", "no_window_partition", "window8", "window32", "no_unet_lora", "ranks"])
def test_ablation_overrides_compose_validate_and_build(overrides, check, tiny_backbone):
    bb = tiny_backbone
    cfg = compose_train([*CLEARSR, *overrides])
    validate_config(cfg)
    runner, _ = _runner(bb, overrides)
    check(runner, bb)
    x, t, ctx, lr = _inputs(bb, b=1)
    with torch.no_grad():
        out = runner(bb.unet, x, t, ctx, runner.condition(bb, lr, HR))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_without_the_lora_encoder_the_lr_latent_is_the_frozen_vae_encoding(tiny_backbone):
    bb = tiny_backbone
    over = ["~adapter.branches.lr_encoder"]
    validate_config(compose_train([*CLEARSR, *over]))
    runner, _ = _runner(bb, over)
    assert "lr_encoder" not in runner.branches and not runner.condition_requires_grad
    _perturb_zero_outputs(runner)  # whatever the branches' weights, the condition is the frozen VAE's
    _, _, _, lr = _inputs(bb)
    cond = runner.condition(bb, lr, HR)
    assert not cond["lr_latent"].requires_grad
    assert torch.equal(cond["lr_latent"], bb.encode(upsample_to(lr, HR), sample=False))


@pytest.mark.parametrize("override,match", [
    ("adapter.branches.dpm.window_size=0", "adapter.branches.dpm.window_size=0 must be a positive integer"),
    ("adapter.branches.dpm.kv_mode=foo", "adapter.branches.dpm.kv_mode=foo must be 'window' or 'resize'"),
    ("adapter.branches.lr_encoder.rank=0", "adapter.branches.lr_encoder.rank=0 must be a positive integer"),
    ("adapter.branches.unet_lora.alpha=-1", "adapter.branches.unet_lora.alpha=-1 must be > 0"),
    ("adapter.branches.image_prompt.tokens=0", "adapter.branches.image_prompt.tokens=0 must be a positive integer"),
    ("branch@adapter.branches.image_prompt=clip_image_prompt", "open_clip_model.safetensors"),
])
def test_bad_values_are_one_line_config_errors_before_any_model_is_built(override, match, tmp_path, monkeypatch):
    import re

    from sr_lab import train
    from sr_lab.models import backbone
    from sr_lab.models.runner import ControlledUNet

    empty = tmp_path / "weights"
    empty.mkdir()
    monkeypatch.setenv("SR_LAB_WEIGHTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(empty))

    def built(*a, **k):
        raise AssertionError("a model was built before the config error")

    monkeypatch.setattr(backbone, "build_tiny", built)
    monkeypatch.setattr(ControlledUNet, "__init__", built)
    cfg = compose_train([*CLEARSR, override], tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(match)) as exc:
        train.run(cfg)
    assert "\n" not in str(exc.value)
    if "clip_image_prompt" in override:  # the missing file and the folder searched are named
        assert "ViT-H-14/open_clip_model.safetensors" in str(exc.value) and str(empty) in str(exc.value)
    assert not (tmp_path / "run" / "export").exists()


# ---------------------------------------------------------------------------------- 6. compositions
@pytest.mark.parametrize("preset,steps", [("ccsr_stage1", None), ("stablesr_stage1", 10)])
def test_lsa_hook_composes_with_ccsr_and_stablesr_samplers(preset, steps, tiny_backbone, monkeypatch):
    from sr_lab.diffusion.hooks import LSAHook
    from sr_lab.diffusion.samplers import sampler_timesteps
    from sr_lab.utils.seeding import make_generator

    over = [f"experiment={preset}", "+hook@sampler.hook=lsa", "data.crop_size=64"]
    over += [f"sampler.steps={steps}"] if steps else []
    cfg = compose_train(over)
    validate_config(cfg)
    assert cfg.sampler.hook._target_ == "sr_lab.diffusion.hooks.LSAHook" and cfg.sampler.hook.key == "lr_latent"
    module = hydra.utils.instantiate(cfg.module, backbone=tiny_backbone)
    hook = module.sampler.keywords["hook"]
    assert isinstance(hook, LSAHook) and (hook.alpha, hook.beta) == (0.01, 0.01)
    n = len(sampler_timesteps(OmegaConf.to_container(cfg.sampler, resolve=True), 1000))
    assert n == (16 if preset == "ccsr_stage1" else steps)

    calls = []
    original = LSAHook.__call__

    def spy(self, i, n_, t, x_next, x0_hat, cond):
        x_out, c = original(self, i, n_, t, x_next, x0_hat, cond)
        calls.append((i, n_, self.phase(i, n_), not torch.equal(x_out, x_next)))
        if self.phase(i, n_) == "early":  # Eq. 3 with the stage's own LR latent
            assert torch.allclose(x_out, 0.99 * x_next + 0.01 * cond["lr_latent"], atol=1e-6)
        return x_out, c

    monkeypatch.setattr(LSAHook, "__call__", spy)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    if cfg.degradation.get("resize_lr_to_hr"):
        lr = upsample_to(lr, HR)
    with torch.no_grad():
        cond, x_t = module.prepare(lr, HR, generator=make_generator(0, "s", 0))
        assert cond["lr_latent"].shape == x_t.shape
        out = module.sampler(module.denoise, x_t, cond, tiny_backbone.alphas_cumprod,
                             generator=make_generator(0, "n", 0))
    assert torch.isfinite(out).all() and out.shape == x_t.shape
    assert [c[:2] for c in calls] == [(i, n) for i in range(n)]
    assert all(acted == (phase != "middle") for _, _, phase, acted in calls)  # it rewrote early / late latents
    assert {p for *_, p, _ in calls} == {"early", "middle", "late"}


def _trained_changes(export, cfg, bb):
    """Per ClearSR part: does any exported tensor differ from a fresh initialisation (same seed)?"""
    state = load_file(export / "trainable.safetensors")
    fresh = hydra.utils.instantiate(cfg.adapter)(bb.unet, vae=bb.vae).state_dict()
    changed = {}
    for k, v in state.items():
        name = k[len("adapter."):]
        changed.setdefault(_group(name), False)
        changed[_group(name)] |= not torch.equal(v, fresh[name])
    return changed


@pytest.mark.parametrize("mode", ["alternate", "combined"])
def test_clearsr_trains_with_ccsr_nutl_in_both_optimizer_modes(mode, tmp_path, tiny_backbone):
    from sr_lab.train import run

    cfg = compose_train([*CLEARSR, "loss=ccsr_nutl", "schedule=ccsr_nonuniform", f"optim.mode={mode}",
                         "train.iterations=2"], tmp_path)
    metrics = run(cfg)
    for k in ("train/loss", "train/eps", "train/x0_T", "train/x0_tmax"):
        assert k in metrics and math.isfinite(metrics[k]), (k, metrics)
    changed = _trained_changes(tmp_path / "export", cfg, tiny_backbone)
    assert set(changed) == set(GROUPS)
    # 2 iterations = 4 optimizer steps (alternate: one per NUTL part) or 2 (combined); the LR encoder's LoRA B
    # gets its first gradient at the 3rd step (behind three zero outputs, see the frozen-rebuild test)
    moved = ["dpm.controlnet", "dpm.window_attn", "gspm.controlnet", "unet_lora.lora_A", "unet_lora.lora_B",
             "image_prompt.proj", "image_prompt.norm"] + (["lr_encoder.lora_B"] if mode == "alternate" else [])
    assert all(changed[g] for g in moved), changed


def test_stablesr_cfw_trains_on_latents_sampled_by_a_clearsr_stage1(clearsr_run, tmp_path):
    from sr_lab.data.records import list_shards
    from sr_lab.train import run

    records = tmp_path / "records"
    run(compose_train([*FAST, "experiment=stablesr_latents", f"stage1={clearsr_run.export}",
                       f"records.dir={records}", "records.num=2", "records.shard_size=2", "sampler.steps=2"],
                      tmp_path / "latents"))
    shards = list_shards(records)
    assert [(a, b) for a, b, _ in shards] == [(0, 2)]
    rec = load_file(shards[0][2])
    assert rec["latent"].shape == (2, 4, 8, 8) and torch.isfinite(rec["latent"]).all()
    assert rec["hr"].shape == (2, 3, 64, 64) and rec["hr"].dtype == torch.uint8
    meta = json.loads((records / "meta.json").read_text())
    assert meta["num_records"] == 2
    metrics = run(compose_train([*FAST, "experiment=stablesr_cfw", f"records.dir={records}", "train.iterations=2",
                                 "perceptual.allow_random_init=true"], tmp_path / "cfw"))
    assert math.isfinite(metrics["train/loss"])
    assert (tmp_path / "cfw" / "export" / "trainable.safetensors").is_file()


# ---------------------------------------------------------------------------------- 7. end to end
@pytest.fixture(scope="module")
def lr_hr(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("clearsr_pairs")
    lr_dir, hr_dir = root / "lr", root / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")[0]
    hr = (base * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(hr).save(hr_dir / "a.png")
    Image.fromarray(hr).resize((8, 8), Image.BICUBIC).save(lr_dir / "a.png")
    return lr_dir, hr_dir


def test_infer_clearsr_and_clearsr_star_then_eval_over_seeds(clearsr_run, lr_hr, tmp_path):
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sr_lab.eval.run import run_eval
    from sr_lab.inference.run import run_inference
    from sr_lab.train import CONF_DIR

    lr_dir, hr_dir = lr_hr
    outs, metas = {}, {}
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="clearsr_e2e"):
        for sampler in ("clearsr", "clearsr_star"):
            cfg = compose(config_name="infer", overrides=[
                f"checkpoint={clearsr_run.export}", f"input={lr_dir}", f"output_dir={tmp_path / sampler}",
                f"sampler={sampler}", "sampler.steps=10", "seeds=[7]", "progress=false"])
            out = run_inference(cfg)
            metas[sampler] = json.loads((out / "run.json").read_text())
            outs[sampler] = np.asarray(Image.open(out / "seed_7" / "a.png"))
        ecfg = compose(config_name="eval", overrides=[
            "run_inference=true", f"infer.checkpoint={clearsr_run.export}", "infer.seeds=[0,1,2]",
            "infer.progress=false", "infer.sampler.steps=4", f"lr_dir={lr_dir}", f"hr_dir={hr_dir}",
            "metrics.names=[psnr,ssim]",
            f"hydra.run.dir={tmp_path / 'eval'}", f"paths.output_dir={tmp_path / 'eval'}", "logger=csv"])
    for sampler, alpha in (("clearsr", 0.01), ("clearsr_star", 0.03)):
        meta = metas[sampler]
        assert meta["model_calls_per_image"] == 10 and len(meta["timesteps"]) == 10
        assert meta["timesteps"][0] == 999
        hook = meta["sampler"]["hook"]
        assert hook["_target_"] == "sr_lab.diffusion.hooks.LSAHook"
        assert (hook["alpha"], hook["beta"]) == (alpha, 0.01)
        assert outs[sampler].shape == (32, 32, 3)
    assert not np.array_equal(outs["clearsr"], outs["clearsr_star"])  # same seed, alpha 0.01 vs 0.03

    summary = run_eval(ecfg)
    assert summary["n_runs"] == 3 and summary["n_images_all_runs"] == 1
    assert sorted(p.name for p in (tmp_path / "eval" / "infer").iterdir() if p.is_dir()) == \
        ["seed_0", "seed_1", "seed_2"]
    for name in ("psnr", "ssim"):
        m = summary["metrics"][name]
        assert m["available"] and len(m["per_run"]) == 3, m
        assert all(v is not None and math.isfinite(v) for v in m["per_run"].values())
        assert m["g_std"] is not None and m["g_std"] >= 0
    assert summary["metrics"]["psnr"]["g_std"] > 0  # the seeds differ
    assert summary["stability"]["l_std"] > 0


def test_a_rebuilt_condition_reuses_the_gradient_free_entries(monkeypatch):
    """Per loss part only the LoRA encoder's latent is rebuilt (it carries gradients); the CLIP image
    embedding of the first part is reused, not recomputed."""
    from sr_lab.models.backbone import build_tiny

    bb = build_tiny()
    runner, _ = _runner(bb)
    clip = runner.branches["image_prompt"].clip
    calls = []
    original = type(clip).forward
    monkeypatch.setattr(type(clip), "forward", lambda self, x: calls.append(1) or original(self, x))
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = runner.condition(bb, lr, (64, 64))
    second = runner.condition(bb, lr, (64, 64), reuse=first)
    assert len(calls) == 1
    assert second["image_context"] is first["image_context"]
    assert second["lr_latent"] is not first["lr_latent"] and second["lr_latent"].requires_grad
    assert torch.equal(second["lr_latent"], first["lr_latent"])

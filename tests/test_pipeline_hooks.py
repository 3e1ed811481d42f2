"""Step hooks through the inference wrappers: CFG + several aggregation tiles + several seeds give the
same images as the same computation written out by hand without any wrapper."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import compose_train
from sr_lab.diffusion.hooks import LSAHook, PSRHook
from sr_lab.diffusion.samplers import renoise
from sr_lab.inference import SRPipeline, TileSettings
from sr_lab.utils.seeding import make_generator

TS = [999, 749, 499, 249]
SEEDS = [0, 3]
CFG = 2.0


@pytest.fixture(scope="module")
def stage():
    import hydra

    module = hydra.utils.instantiate(compose_train(["experiment=ccsr_stage1", "data.crop_size=64"]).module)
    module.eval()

    def pointwise(x, t, cond):  # a pixel-wise model: tile aggregation is exact for it
        ctx = cond["context"].float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.1 * x - 0.05 * cond["lr_latent"] + 0.5 * ctx + 1e-4 * t.view(-1, 1, 1, 1).float()

    module.denoise = pointwise
    return module


def _by_hand(stage, lr, hook_kind):
    bb = stage.backbone
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    cond0, _ = stage.prepare(up, tuple(up.shape[-2:]))
    ctx_u = bb.prompt_embedding("blurry", lr.shape[0])
    a = bb.alphas_cumprod.double().tolist()
    outs = []
    for s in SEEDS:
        g = make_generator(s, "infer")
        x = torch.randn(1, 4, up.shape[-2] // 8, up.shape[-1] // 8, generator=g)
        lat0 = cond0["lr_latent"]
        lat = lat0
        for i, t in enumerate(TS):
            tt = torch.tensor([t])

            def f(ctx):
                return stage.denoise(x, tt, {"lr_latent": lat, "context": ctx})

            eps_c, eps_u = f(cond0["context"]), f(ctx_u)
            eps = eps_u + CFG * (eps_c - eps_u)
            at = torch.tensor(a[t]).float()
            x0 = (x - (1 - at).sqrt() * eps) / at.sqrt()
            if i + 1 < len(TS):
                s_ = torch.tensor(a[TS[i + 1]]).float()
                x = s_.sqrt() * x0 + (1 - s_).sqrt() * torch.randn(x.shape, generator=g)
            else:
                x = x0
            if hook_kind == "psr" and i + 1 < len(TS):
                lat = 0.5 * x0 + 0.5 * lat0
            if hook_kind == "lsa":
                n = len(TS)
                if i < math.ceil(n / 3 - 1e-9):  # early_end 1/3, late_start 2/3: all three phases in 4 steps
                    x = 0.9 * x + 0.1 * lat0
                elif i >= math.ceil(2 * n / 3 - 1e-9):
                    x = 1.2 * x - 0.2 * lat0
        outs.append(stage.decode_latent(x))
    return torch.stack(outs)


@pytest.mark.parametrize("hook_kind", ["psr", "lsa"])
def test_hook_under_cfg_tiles_and_seeds_equals_the_hand_computation(stage, hook_kind):
    hook = PSRHook(w=0.5) if hook_kind == "psr" else LSAHook(alpha=0.1, beta=0.2, early_end=1 / 3, late_start=2 / 3)
    sampler = lambda *a, **k: renoise.sample(*a, timesteps=TS, hook=hook, **k)  # noqa: E731
    lr = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    pipe = SRPipeline(stage, sampler, cfg_scale=CFG, negative_prompt="blurry", start="noise",
                      tile=TileSettings(True, 2, 1, 3))  # latent 4x6: 3x5 tiles
    got = pipe(lr, SEEDS)
    want = _by_hand(stage, lr, hook_kind)
    assert got.shape == want.shape == (2, 1, 3, 32, 48)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
    # the hook matters: without it the images differ
    plain = SRPipeline(stage, lambda *a, **k: renoise.sample(*a, timesteps=TS, **k), cfg_scale=CFG,
                       negative_prompt="blurry", start="noise", tile=TileSettings(True, 2, 1, 3))(lr, SEEDS)
    assert not torch.allclose(plain, got, atol=1e-4)


def test_psr_w0_reproduces_lr_conditioned_steps(stage):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = SRPipeline(stage, lambda *x, **k: renoise.sample(*x, timesteps=TS, hook=PSRHook(w=0.0), **k))(lr, [1])
    b = SRPipeline(stage, lambda *x, **k: renoise.sample(*x, timesteps=TS, **k))(lr, [1])
    assert torch.allclose(a, b, atol=1e-6)


def test_image_context_flows_through_cfg_tiles_and_seeds(stage):
    """An image-context entry (ClearSR's CLIP image embedding) reaches every model call with the rows of
    its latent, under CFG, tiling and seed batching."""
    seen = []
    orig = stage.denoise

    def spy(x, t, cond):
        seen.append((x.shape[0], cond["image_context"].shape[0], cond["context"].shape[0]))
        return orig(x, t, cond)

    stage.denoise = spy
    orig_prepare = stage.prepare

    def prepare(lr, hr_size, **kw):
        cond, x = orig_prepare(lr, hr_size, **kw)
        cond["image_context"] = torch.randn(lr.shape[0], 3, 8)
        return cond, x

    stage.prepare = prepare
    try:
        lr = torch.rand(1, 3, 8, 12)
        SRPipeline(stage, lambda *x, **k: renoise.sample(*x, timesteps=[999], **k), cfg_scale=CFG,
                   negative_prompt="", tile=TileSettings(True, 2, 1, 15))(lr, [0, 1, 2])
    finally:
        stage.denoise = orig
        del stage.prepare
    assert seen and all(a == b == c for a, b, c in seen)

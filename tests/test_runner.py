"""One UNet runner over several control branches (sr_lab/models/runner.py): summed residuals, SFT +
ControlNet together, declared condition keys, gradient-carrying conditions, per-sample prompts."""
import pytest
import torch
from torch import nn

from helpers import FAST, compose_train
from sr_lab.models.branches.controlnet import ControlNetBranch
from sr_lab.models.branches.time_aware_sft import TimeAwareSFTBranch
from sr_lab.models.runner import ControlledUNet


def _perturb(module, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _inputs(bb, b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    lr = torch.rand(b, 3, size * 2, size * 2, generator=g)
    return x, torch.tensor([10, 700])[:b], bb.prompt_embedding("", b), lr


def _hooks(unet):
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_two_branches_sum_their_residuals(tiny_backbone):
    bb = tiny_backbone
    a, b = ControlNetBranch(bb.unet, seed=1), ControlNetBranch(bb.unet, seed=2, cond_key="other")
    _perturb(a, 3)
    _perturb(b, 4)
    runner = ControlledUNet(bb.unet, {"a": a, "b": b})
    x, t, ctx, lr = _inputs(bb)
    cond = runner.condition(bb, lr, (64, 64))
    assert set(cond) == {"lr_latent", "other", "lr_image"}
    with torch.no_grad():
        got = runner(bb.unet, x, t, ctx, cond)
        da, ma = a.residuals(bb.unet, x, t, ctx, cond)
        db, mb = b.residuals(bb.unet, x, t, ctx, cond)
        want = bb.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=[p + q for p, q in zip(da, db)],
                       mid_block_additional_residual=ma + mb).sample
        only_a = ControlledUNet(bb.unet, {"a": a})(bb.unet, x, t, ctx, cond)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, only_a, atol=1e-4)


def test_sft_and_controlnet_together(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    sft, cn = TimeAwareSFTBranch(bb.unet, seed=1), ControlNetBranch(bb.unet, seed=2)
    runner = ControlledUNet(bb.unet, {"sft": sft, "controlnet": cn})
    x, t, ctx, lr = _inputs(bb)
    calls = []
    orig = bb.encode
    monkeypatch.setattr(bb, "encode", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    cond = runner.condition(bb, lr, (64, 64))
    assert len(calls) == 1  # both read lr_latent: built once
    with torch.no_grad():
        plain = bb.unet(x, t, encoder_hidden_states=ctx).sample
        assert torch.equal(runner(bb.unet, x, t, ctx, cond), plain)  # zero-initialised: the frozen UNet
    _perturb(sft.sft, 5)
    _perturb(cn, 6)
    with torch.no_grad():
        both = runner(bb.unet, x, t, ctx, cond)
        s_only = ControlledUNet(bb.unet, {"sft": sft})(bb.unet, x, t, ctx, cond)
        c_only = ControlledUNet(bb.unet, {"controlnet": cn})(bb.unet, x, t, ctx, cond)
    assert _hooks(bb.unet) == 0
    for other in (plain, s_only, c_only):
        assert not torch.allclose(both, other, atol=1e-5)
    both.shape == plain.shape
    out = runner(bb.unet, x, t, ctx, cond)
    out.square().mean().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sft.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in cn.parameters())


def test_sft_controlnet_adapter_option_trains_end_to_end(tmp_path):
    from sr_lab.train import run

    metrics = run(compose_train([*FAST, "experiment=ccsr_stage1", "adapter=sft_controlnet", "train.iterations=2",
                                 "sampler.timesteps=[999,500]"], tmp_path))
    assert metrics["train/loss"] == metrics["train/loss"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "export" / "trainable.safetensors").keys()
    assert any(k.startswith("adapter.branches.sft.") for k in keys)
    assert any(k.startswith("adapter.branches.controlnet.") for k in keys)


class GradConditionBranch(ControlNetBranch):
    """A ControlNet whose LR latent passes a trainable 1x1 conv (a stand-in for ClearSR's LoRA encoder)."""

    def __init__(self, unet, **kw):
        super().__init__(unet, **kw)
        self.lr_encoder = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.lr_encoder.weight.copy_(torch.eye(4).view(4, 4, 1, 1) * 1.1)
            self.lr_encoder.bias.fill_(0.01)

    @property
    def condition_requires_grad(self):
        return True

    def encode_condition(self, backbone, image01):
        with torch.no_grad():
            z = backbone.encode(image01, sample=False)
        return self.lr_encoder(z)


def test_gradient_carrying_condition_trains_with_alternate_nutl_and_accumulation(tmp_path):
    """Each backward of alternate-mode NUTL gets its own graph (a condition built once would raise
    'Trying to backward through the graph a second time'); gradients reach the condition encoder of
    every part; HR target latents stay on the frozen encoder."""
    import hydra

    from sr_lab.train import run
    from sr_lab.utils.seeding import make_generator

    over = [*FAST, "experiment=ccsr_stage1", "optim.mode=alternate", "train.total_batch_size=4",
            "train.iterations=2", "adapter.branches.controlnet._target_=test_runner.GradConditionBranch"]
    metrics = run(compose_train(over, tmp_path))  # accumulate 2 x 2 parts x 2 iterations
    assert metrics["train/loss"] == metrics["train/loss"]

    cfg = compose_train(over, tmp_path / "direct")
    module = hydra.utils.instantiate(cfg.module)
    _perturb(module.adapter.branches.controlnet.controlnet, 7, scale=0.02)
    assert module.adapter.condition_requires_grad
    g = torch.Generator().manual_seed(0)
    hr, lr = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    gen = make_generator(0, "train", 0, 0)
    x0 = module.backbone.encode(hr, generator=gen, sample=True)
    assert not x0.requires_grad
    enc = module.adapter.branches.controlnet.lr_encoder
    for part in module.loss.parts():
        enc.zero_grad()
        cond = module.prepare(lr, (64, 64))[0]
        assert cond["lr_latent"].requires_grad
        sum(part(module.denoise, x0, cond, module.backbone.alphas_cumprod, gen).values()).backward()
        assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.backbone.parameters())


def test_per_sample_prompts_embed_each_row(tiny_backbone):
    bb = tiny_backbone
    ctx = bb.prompt_embedding(["a cat", "", "a cat"], 3)
    assert ctx.shape[0] == 3
    assert torch.equal(ctx[0], ctx[2]) and not torch.equal(ctx[0], ctx[1])
    assert torch.equal(ctx[1], bb.prompt_embedding("", 1)[0])
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        bb.prompt_embedding(["a", "b"], 3)


def test_refine_blends_with_the_lr_in_latent_and_pixel_space(tiny_backbone):
    """PSR refinement (AddSR Eq. 2): latent space w·x̂0 + (1−w)·z_LR; pixel space E(w·D(x̂0) + (1−w)·I_LR);
    repeated refinements always blend with the LR's own entry, never with a previous refinement."""
    bb = tiny_backbone
    runner = ControlledUNet(bb.unet, {"controlnet": ControlNetBranch(bb.unet, seed=0)})
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = runner.condition(bb, lr, (64, 64))
    z_lr = cond["lr_latent"]
    x0 = torch.randn_like(z_lr)
    c1 = runner.refine(bb, cond, x0, 0.25, "latent")
    assert torch.allclose(c1["lr_latent"], 0.25 * x0 + 0.75 * z_lr)
    c2 = runner.refine(bb, c1, 2 * x0, 0.25, "latent")
    assert torch.allclose(c2["lr_latent"], 0.5 * x0 + 0.75 * z_lr, atol=1e-6)
    assert torch.equal(runner.refine(bb, c2, x0, 0.0)["lr_latent"], z_lr)
    cp = runner.refine(bb, cond, x0, 0.5, "pixel")
    with torch.no_grad():
        want = bb.encode((0.5 * bb.decode(x0) + 0.5 * cond["lr_image"]).clamp(0, 1), sample=False)
    assert torch.allclose(cp["lr_latent"], want, atol=1e-5)
    assert torch.equal(cond["lr_latent"], z_lr)  # the input condition is not modified

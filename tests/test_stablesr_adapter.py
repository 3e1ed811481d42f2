"""StableSR stage 1's adapter: time-aware encoder + SFT hooks on the frozen diffusers UNet (paper 001, Eq. 1)."""
import pytest
import torch
from omegaconf import OmegaConf

from sr_lab.models.branches.time_aware_sft import (SFTLayer, TimeAwareSFTBranch, derive_encoder_settings,
                                                   unet_resblock_levels)
from sr_lab.models.runner import ControlledUNet


def TimeAwareSFTAdapter(unet, **kw):
    """The StableSR stage-1 adapter: a runner with the one SFT branch (conf/adapter/time_aware_sft.yaml)."""
    return ControlledUNet(unet, {"sft": TimeAwareSFTBranch(unet, **kw)})

SD21_UNET = OmegaConf.create({"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                              "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]})


@pytest.fixture(scope="module")
def adapter(tiny_backbone):
    return TimeAwareSFTAdapter(tiny_backbone.unet, seed=0)


def _inputs(bb, b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    lr = torch.randn(b, 4, size, size, generator=g)
    return x, lr, bb.prompt_embedding("", b)


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_sd21_settings_are_table7():
    """Derived from SD 2.1-base's UNet, the encoder settings are the paper's Table 7."""
    s = derive_encoder_settings(SD21_UNET)
    assert s == {"model_channels": 256, "channel_mult": [1, 1, 2, 2], "num_res_blocks": 2,
                 "attention_levels": [0, 1, 2], "out_channels": 256, "sft_hidden": 128, "num_heads": 4}


def test_sd21_trainable_size_matches_the_paper():
    """~105M trainable parameters including SFT (paper App. A), counted on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                    use_linear_projection=True)
        ad = TimeAwareSFTAdapter(unet)
    n = sum(p.numel() for p in ad.parameters()) / 1e6
    assert len(ad.branches["sft"].sft) == 22  # every ResBlock: 8 down, 2 middle, 12 up
    assert 100 < n < 110, n


def test_every_resblock_gets_an_sft_at_its_level(tiny_backbone, adapter):
    blocks = unet_resblock_levels(tiny_backbone.unet)
    assert len(adapter.branches["sft"].sft) == len(blocks) == 11
    levels = dict(blocks)
    assert levels["down_blocks.0.resnets.0"] == 0 and levels["mid_block.resnets.0"] == 2
    assert levels["up_blocks.0.resnets.0"] == 2 and levels["up_blocks.2.resnets.1"] == 0


def test_zero_init_is_exactly_the_frozen_unet_and_hooks_are_removed(tiny_backbone, adapter):
    bb = tiny_backbone
    x, lr, ctx = _inputs(bb)
    t = torch.tensor([3, 800])
    before = _hook_count(bb.unet)
    with torch.no_grad():
        eps = adapter(bb.unet, x, t, ctx, {"lr_latent": lr})
        ref = bb.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(eps, ref)
    assert _hook_count(bb.unet) == before == 0


def test_hooks_are_removed_when_the_unet_raises(tiny_backbone, adapter):
    bb = tiny_backbone
    x, lr, ctx = _inputs(bb)
    with pytest.raises(Exception):
        adapter(bb.unet, x, torch.tensor([1, 2]), ctx[:, :, :5], {"lr_latent": lr})  # wrong context width
    assert _hook_count(bb.unet) == 0


def test_sft_modulates_when_trained_and_odd_tiles_work(tiny_backbone):
    bb = tiny_backbone
    ad = TimeAwareSFTAdapter(bb.unet, seed=1)
    with torch.no_grad():
        for layer in ad.branches["sft"].sft.values():
            layer.alpha.weight.normal_(0, 0.1)
            layer.beta.weight.normal_(0, 0.1)
    x, lr, ctx = _inputs(bb, b=1, size=13)
    t = torch.tensor([500])
    with torch.no_grad():
        eps = ad(bb.unet, x, t, ctx, {"lr_latent": lr})
        ref = bb.unet(x, t, encoder_hidden_states=ctx).sample
    assert eps.shape == ref.shape == (1, 4, 13, 13)
    assert not torch.allclose(eps, ref)


def test_eq1_sft_layer():
    """F' = (1 + α) ⊙ F + β with (α, β) from the condition."""
    layer = SFTLayer(3, 5, hidden=4)
    with torch.no_grad():
        layer.alpha.bias.fill_(0.5)
        layer.beta.bias.fill_(-1.0)
    f = torch.randn(2, 5, 6, 6)
    out = layer(f, torch.randn(2, 3, 6, 6))
    assert torch.allclose(out, 1.5 * f - 1.0)


def test_gradients_reach_only_encoder_and_sft(tiny_backbone):
    bb = tiny_backbone
    ad = TimeAwareSFTAdapter(bb.unet, seed=2)
    x, lr, ctx = _inputs(bb)
    ad(bb.unet, x, torch.tensor([10, 20]), ctx, {"lr_latent": lr}).square().mean().backward()
    assert all(p.grad is None for p in bb.parameters())
    # at zero init the α/β convs get gradients; the encoder gets them once α/β are non-zero
    assert all(layer.alpha.weight.grad is not None and layer.alpha.weight.grad.abs().sum() > 0
               for layer in ad.branches["sft"].sft.values())
    with torch.no_grad():
        for layer in ad.branches["sft"].sft.values():
            layer.alpha.weight.normal_(0, 0.05)
    ad.zero_grad()
    ad(bb.unet, x, torch.tensor([10, 20]), ctx, {"lr_latent": lr}).square().mean().backward()
    enc = [p for p in ad.branches["sft"].encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(enc) > 0.9 * len(list(ad.branches["sft"].encoder.parameters()))
    assert all(p.grad is None for p in bb.parameters())


def test_time_embedding_changes_the_encoder_features(adapter):
    lr = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = adapter.branches["sft"].encoder(lr, torch.tensor([10]))
        b = adapter.branches["sft"].encoder(lr, torch.tensor([900]))
        a2 = adapter.branches["sft"].encoder(lr, torch.tensor([10]))
    assert len(a) == 3 and [f.shape[-1] for f in a] == [8, 4, 2]
    assert all(torch.equal(u, v) for u, v in zip(a, a2))
    assert all(not torch.allclose(u, v) for u, v in zip(a, b))


def test_condition_is_the_lr_latent_at_hr_size(tiny_backbone, adapter):
    lr = torch.rand(2, 3, 16, 16)
    cond = adapter.condition(tiny_backbone, lr, (64, 64))
    assert set(cond) == {"lr_latent", "lr_image"} and cond["lr_image"].shape == (2, 3, 64, 64) and cond["lr_latent"].shape == (2, 4, 8, 8)


def test_bad_settings_are_rejected(tiny_backbone):
    with pytest.raises(ValueError, match="channel_mult has 2 levels"):
        TimeAwareSFTAdapter(tiny_backbone.unet, channel_mult=[1, 2])
    with pytest.raises(ValueError, match="position"):
        TimeAwareSFTAdapter(tiny_backbone.unet, position="input")

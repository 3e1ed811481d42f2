"""LoRA for ClearSR (paper 003 Sec. 3.1 / App. A): peft injection into an owned encoder copy and
hook-based LoRA on a shared UNet."""
import copy

import pytest
import torch
from torch import nn

from sr_lab.models.lora import (DEFAULT_ALPHA, HookedLoRA, add_peft_lora, decoder_attention_targets,
                                encoder_lora_targets)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True)
    return unet.eval().requires_grad_(False)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, sample_size=128)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
            torch.randn(1, 5, 32, generator=g))


def _run(unet, inputs):
    x, t, ctx = inputs
    return unet(x, t, encoder_hidden_states=ctx).sample


def _randomise_b(lora: HookedLoRA, std: float = 0.5, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * std)


def test_hooked_lora_matches_peft_on_linear():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20)).requires_grad_(False)
    peft_model = add_peft_lora(copy.deepcopy(base), ["0"], rank=4, alpha=6, seed=1)
    hooked = HookedLoRA(base, ["0"], rank=4, alpha=6, seed=1)
    assert hooked.scaling == pytest.approx(6 / 4)
    pl = peft_model[0]
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
        hooked.lora_A["0"].weight.copy_(pl.lora_A["default"].weight)
        hooked.lora_B["0"].weight.copy_(pl.lora_B["default"].weight)
    x = torch.randn(3, 7, 12)
    y_base = base(x)
    y_peft = peft_model(x)
    assert not torch.allclose(y_peft, y_base, atol=1e-3)
    handles = hooked.attach(base)
    assert len(handles) == 1
    torch.testing.assert_close(base(x), y_peft, atol=1e-6, rtol=0)
    for h in handles:
        h.remove()
    assert torch.equal(base(x), y_base)
    with hooked.attached(base):
        torch.testing.assert_close(base(x), y_peft, atol=1e-6, rtol=0)
    assert torch.equal(base(x), y_base)


def test_hooked_lora_init_like_peft_and_seeded():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 24))
    state = torch.random.get_rng_state()
    a = HookedLoRA(base, ["0"], rank=16, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = HookedLoRA(base, ["0"], rank=16, seed=5)
    c = HookedLoRA(base, ["0"], rank=16, seed=6)
    assert torch.equal(a.lora_A["0"].weight, b.lora_A["0"].weight)
    assert not torch.equal(a.lora_A["0"].weight, c.lora_A["0"].weight)
    assert torch.count_nonzero(a.lora_B["0"].weight) == 0
    bound = 1 / 40 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in=40
    w = a.lora_A["0"].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert a.scaling == DEFAULT_ALPHA / 16


def test_hooked_lora_errors():
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="'1'"):
        HookedLoRA(base, ["1"])
    with pytest.raises(ValueError, match="'nope'"):
        HookedLoRA(base, ["nope"])
    with pytest.raises(ValueError, match="rank"):
        HookedLoRA(base, ["0"], rank=0)
    with pytest.raises(ValueError, match="alpha"):
        HookedLoRA(base, ["0"], alpha=0)
    lora = HookedLoRA(base, ["0"], rank=2)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5))
    two = HookedLoRA(other, ["0", "1"], rank=2)
    wrong = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6))
    with pytest.raises(ValueError, match="'1'"):
        two.attach(wrong)
    assert not wrong[0]._forward_hooks and not wrong[0]._forward_hooks_with_kwargs  # rolled back
    assert len(lora.attach(other)) == 1


def test_decoder_attention_targets(unet):
    targets = decoder_attention_targets(unet)
    # two CrossAttnUpBlock2D x (layers_per_block + 1 = 2) transformers x (attn1, attn2) x 4 projections
    assert len(targets) == 2 * 2 * 2 * 4
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in targets
    assert "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0" in targets
    assert all(t.startswith("up_blocks.") for t in targets)
    assert {t.rsplit(".attn", 1)[1][0] for t in targets} == {"1", "2"}
    for t in targets:
        assert isinstance(unet.get_submodule(t), nn.Linear)
    # every attention projection of the UNet outside up_blocks is excluded
    all_attn = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)
                and (n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or n.endswith("to_out.0"))]
    outside = [n for n in all_attn if not n.startswith("up_blocks.")]
    assert outside and any(n.startswith("down_blocks.") for n in outside)
    assert any(n.startswith("mid_block.") for n in outside)
    assert set(targets) == {n for n in all_attn if n.startswith("up_blocks.")}


def test_hooked_lora_on_shared_unet(unet, unet_inputs):
    targets = decoder_attention_targets(unet)
    keys = list(unet.state_dict().keys())
    y_base = _run(unet, unet_inputs)
    lora = HookedLoRA(unet, targets, rank=4, seed=0)
    assert set(lora.state_dict()) == ({f"lora_A.{t.replace('.', '__')}.weight" for t in targets}
                                      | {f"lora_B.{t.replace('.', '__')}.weight" for t in targets})
    assert sum(p.numel() for p in lora.parameters()) == sum(
        4 * (m.in_features + m.out_features) for m in map(unet.get_submodule, targets))
    # B = 0 at init: bit-identical when attached
    with lora.attached(unet):
        assert torch.equal(_run(unet, unet_inputs), y_base)
    assert list(unet.state_dict().keys()) == keys
    # B random: changes only while attached
    _randomise_b(lora)
    assert torch.equal(_run(unet, unet_inputs), y_base)
    handles = lora.attach(unet)
    try:
        assert list(unet.state_dict().keys()) == keys
        y = _run(unet, unet_inputs)
        assert not torch.allclose(y, y_base, atol=1e-4)
        y.square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(_run(unet, unet_inputs), y_base)
    assert list(unet.state_dict().keys()) == keys
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    # a second, differently seeded HookedLoRA on the same UNet
    other = HookedLoRA(unet, targets, rank=4, seed=1)
    k = targets[0].replace(".", "__")
    assert not torch.equal(other.lora_A[k].weight, lora.lora_A[k].weight)


def test_add_peft_lora_on_vae_encoder():
    vae = _tiny_vae()
    lr_encoder = nn.ModuleDict({"encoder": copy.deepcopy(vae.encoder),
                                "quant_conv": copy.deepcopy(vae.quant_conv)})
    targets = encoder_lora_targets(lr_encoder)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in lr_encoder.modules())
    n_attn = sum(type(m).__name__ == "Attention" for m in lr_encoder.modules())
    assert n_attn >= 1 and len(targets) == n_conv + 4 * n_attn
    assert "quant_conv" in targets and "encoder.conv_in" in targets
    assert "encoder.mid_block.attentions.0.to_out.0" in targets

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = vae.quant_conv(vae.encoder(x))

    def run(m):
        with torch.no_grad():
            return m["quant_conv"](m["encoder"](x))

    state = torch.random.get_rng_state()
    out = add_peft_lora(lr_encoder, targets, rank=4, seed=0)
    assert out is lr_encoder
    assert torch.equal(torch.random.get_rng_state(), state)
    for t in targets:
        layer = lr_encoder.get_submodule(t)
        assert "default" in layer.lora_A and "default" in layer.lora_B, t
        assert layer.scaling["default"] == DEFAULT_ALPHA / 4
    sd = lr_encoder.state_dict()
    assert "encoder.conv_in.lora_A.default.weight" in sd
    assert "encoder.conv_in.base_layer.weight" in sd
    assert "quant_conv.lora_B.default.weight" in sd
    trainable = {n for n, p in lr_encoder.named_parameters() if p.requires_grad}
    assert trainable == ({f"{t}.lora_A.default.weight" for t in targets}
                         | {f"{t}.lora_B.default.weight" for t in targets})
    assert torch.equal(run(lr_encoder), ref)  # B = 0 at init
    # the frozen original is untouched
    assert not any(hasattr(m, "lora_A") for m in vae.modules())

    def lora_a(seed):
        m = nn.ModuleDict({"encoder": copy.deepcopy(vae.encoder)})
        add_peft_lora(m, encoder_lora_targets(m), rank=4, seed=seed)
        return m.encoder.conv_in.lora_A["default"].weight

    same, diff = lora_a(0), lora_a(1)
    assert torch.equal(same, lr_encoder.encoder.conv_in.lora_A["default"].weight)
    assert not torch.equal(same, diff)

    # non-zero B changes the output and gradients reach only LoRA params
    with torch.no_grad():
        for n, p in lr_encoder.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    assert not torch.allclose(run(lr_encoder), ref, atol=1e-4)
    lr_encoder["quant_conv"](lr_encoder["encoder"](x)).square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in lr_encoder.parameters())


def test_add_peft_lora_validation():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="rank"):
        add_peft_lora(copy.deepcopy(m), ["0"], rank=-1)
    with pytest.raises(ValueError, match="rank"):
        add_peft_lora(copy.deepcopy(m), ["0"], rank=2.0)
    with pytest.raises(ValueError, match="alpha"):
        add_peft_lora(copy.deepcopy(m), ["0"], alpha=0)
    with pytest.raises(ValueError, match="'1'"):
        add_peft_lora(copy.deepcopy(m), ["1"])

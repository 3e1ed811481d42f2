"""Tiny backbone, ControlNet adapter and the pretrained loader's failure mode."""
import time

import pytest
import torch

from sr_lab.models.branches.controlnet import ControlNetBranch
from sr_lab.models.runner import ControlledUNet
from sr_lab.models.backbone import BackboneUnavailable, build_tiny, load_pretrained


def test_tiny_backbone_is_seeded_frozen_and_sd_shaped(tiny_backbone):
    bb = tiny_backbone
    again = build_tiny(seed=0)
    other = build_tiny(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(bb.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(bb.unet.parameters(), other.unet.parameters()))
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.latent_scale == pytest.approx(0.18215) and bb.vae_factor == 8 and bb.num_timesteps == 1000
    z = bb.encode(torch.rand(2, 3, 64, 96))
    assert z.shape == (2, 4, 8, 12)
    assert bb.decode(z).shape == (2, 3, 64, 96)
    bb.train()
    assert not bb.unet.training and not bb.vae.training


def test_empty_prompt_embedding_is_cached(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    bb._prompt_cache.clear()
    calls = []
    orig = bb.prompt_encoder.forward
    monkeypatch.setattr(bb.prompt_encoder, "forward", lambda p: (calls.append(p), orig(p))[1])
    e1 = bb.prompt_embedding("", 3)
    e2 = bb.prompt_embedding("", 5)
    assert e1.shape == (3, 77, 32) and e2.shape == (5, 77, 32)
    assert len(calls) == 1 and torch.equal(e1[0], e2[0])


def test_controlnet_starts_as_identity_and_only_it_trains(tiny_backbone):
    bb = tiny_backbone
    ad = ControlledUNet(bb.unet, {"controlnet": ControlNetBranch(bb.unet, seed=0)})
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    cond = ad.condition(bb, torch.rand(2, 3, 16, 16), (64, 64))
    assert cond["lr_latent"].shape == (2, 4, 8, 8)
    ctx = bb.prompt_embedding("", 2)
    eps = ad(bb.unet, x, t, ctx, cond)
    ref = bb.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(eps, ref)  # zero convs: the frozen UNet exactly
    eps.square().mean().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())


def test_missing_pretrained_fails_fast_with_instructions(tmp_path):
    t0 = time.time()
    with pytest.raises(BackboneUnavailable, match="backbone.path"):
        load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(BackboneUnavailable, match="missing subfolder"):
        load_pretrained(str(tmp_path / "sd"))
    with pytest.raises(BackboneUnavailable, match="huggingface-cli download"):
        load_pretrained("stabilityai/stable-diffusion-2-1-base", local_files_only=True)
    assert time.time() - t0 < 30

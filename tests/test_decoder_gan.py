"""Decoder-GAN stages: CFW (StableSR Eq. 6), CCSR stage-2 decoder finetune, PatchGAN/hinge/adaptive weight,
LPIPS weights policy, alternating updates, presets end to end with exact resume."""
import pytest
import torch

from helpers import FAST, compose_train
from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.losses.gan import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from sr_lab.losses.perceptual import VGG16_FILE, LPIPSLoss
from sr_lab.models.decoders import CFWDecoder, VAEDecoderFinetune
from sr_lab.train import run
from sr_lab.utils.weights import MissingWeights
from stage_inputs import fake_records, stage1_export

GAN_FAST = [*FAST, "perceptual.allow_random_init=true", "module.discriminator.ndf=16", "module.disc_start=1"]


def _weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _randomize(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def cfw(tiny_backbone):
    dec = CFWDecoder(tiny_backbone, levels=[1, 2], num_rrdb=1)
    _randomize(dec)
    return dec


def _latent_lr(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g)


def test_cfw_at_w0_is_exactly_the_plain_vae_decoder(tiny_backbone, cfw):
    latent, lr = _latent_lr()
    with torch.no_grad():
        out = cfw.reconstruct(tiny_backbone, latent, lr, w=0.0)
        plain = tiny_backbone.vae.decode(latent / tiny_backbone.latent_scale).sample
        fused = cfw.reconstruct(tiny_backbone, latent, lr, w=1.0)
    assert torch.equal(out, plain)
    assert ((out + 1) / 2).clamp(0, 1).allclose(tiny_backbone.decode(latent))
    assert not torch.allclose(fused, plain)
    assert sum(len(m._forward_hooks) for m in tiny_backbone.vae.modules()) == 0


def test_cfw_fusion_is_linear_in_w(tiny_backbone, cfw):
    """F_m = F_d + C(F_e, F_d) · w (Eq. 6), at the fusion block and at the first fused decoder level."""
    enc, dec = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4)
    block = cfw.fusion["2"]
    f0, f1, fh = block(enc, dec, 0.0), block(enc, dec, 1.0), block(enc, dec, 0.25)
    assert torch.equal(f0, dec) and torch.allclose(fh, dec + 0.25 * (f1 - dec), atol=1e-6)

    latent, lr = _latent_lr(1)
    seen = []
    up = tiny_backbone.vae.decoder.up_blocks[1].upsamplers[0]  # runs right after the level-2 fusion
    handle = up.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for w in (0.0, 0.5, 1.0):
                cfw.reconstruct(tiny_backbone, latent, lr, w=w)
    finally:
        handle.remove()
    a, h, b = seen
    assert torch.allclose(h, (a + b) / 2, atol=1e-5) and not torch.allclose(a, b)


def test_cfw_trains_only_the_fusion_layers(tiny_backbone):
    dec = CFWDecoder(tiny_backbone, levels=[1, 2], num_rrdb=1)
    latent, lr = _latent_lr(2)
    dec.reconstruct(tiny_backbone, latent, lr, w=1.0).square().mean().backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert all(p.grad is not None for p in dec.trainable_parameters())
    assert dec.last_layer(tiny_backbone) is None
    with pytest.raises(ValueError, match="w=1.5"):
        CFWDecoder(tiny_backbone, w=1.5)
    with pytest.raises(ValueError, match="levels"):
        CFWDecoder(tiny_backbone, levels=[4])


def test_vae_decoder_finetune_copies_and_leaves_the_backbone_alone(tiny_backbone):
    dec = VAEDecoderFinetune(tiny_backbone)
    latent, _ = _latent_lr(3)
    with torch.no_grad():  # a copy in train mode (attention may pick another kernel): equal to float precision
        assert torch.allclose(dec.reconstruct(tiny_backbone, latent),
                              tiny_backbone.vae.decode(latent / tiny_backbone.latent_scale).sample, atol=1e-5)
    assert all(p.requires_grad for p in dec.trainable_parameters())
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    assert dec.last_layer(tiny_backbone) is dec.decoder.conv_out.weight


def test_patchgan_hinge_and_adaptive_weight():
    d = NLayerDiscriminator(ndf=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake) == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake) == pytest.approx(0.75)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, g = (3 * w).sum(), (w ** 2).sum()  # grads (3, 3) and (2, 4)
    lam = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert lam.item() == pytest.approx(0.5 * (18 ** 0.5) / (20 ** 0.5 + 1e-4), rel=1e-5)
    frozen = torch.tensor([1.0, 2.0])
    assert adaptive_weight(rec, g, frozen, 0.025).item() == pytest.approx(0.025)
    assert adaptive_weight(rec, g, None, 0.025).item() == pytest.approx(0.025)


def test_lpips_needs_local_weights_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SR_LAB_WEIGHTS", raising=False)
    with pytest.raises(MissingWeights, match=VGG16_FILE):
        LPIPSLoss()
    loss = LPIPSLoss(allow_random_init=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss.random_trunk and torch.equal(loss(x, x), torch.zeros(2)) and (loss(x, -x) > 0).all()
    # a torchvision-format VGG16 file is found through SR_LAB_WEIGHTS and loaded into the trunk
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        features = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith("features.")}
    (tmp_path / "w").mkdir()
    torch.save(features, tmp_path / "w" / VGG16_FILE)
    monkeypatch.setenv("SR_LAB_WEIGHTS", str(tmp_path / "w"))
    real = LPIPSLoss()
    assert not real.random_trunk
    assert torch.equal(getattr(real.lpips.net.slice2, "5").weight, features["features.5.weight"])


def test_decoder_config_checks(tmp_path, tmp_path_factory, tiny_backbone, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SR_LAB_WEIGHTS", raising=False)
    records = fake_records(tmp_path_factory.mktemp("rec"))
    base = ["experiment=stablesr_cfw", f"records.dir={records}"]
    with pytest.raises(ConfigError, match="perceptual: missing weight file vgg16-397923af.pth"):
        validate_config(compose_train(base, tmp_path))
    sd = tmp_path / "sd21"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd / sub).mkdir(parents=True)
    with pytest.raises(ConfigError, match="perceptual.allow_random_init=true is only for smoke runs on backbone=tiny"):
        validate_config(compose_train([*base, "perceptual.allow_random_init=true", "backbone=sd21_base",
                                       f"backbone.path={sd}"], tmp_path))
    ok = [*base, "perceptual.allow_random_init=true"]
    validate_config(compose_train(ok, tmp_path))
    for override, match in [("module.decoder.w=1.5", "module.decoder.w=1.5 must be in"),
                            ("module.disc_start=-1", "module.disc_start=-1 must be an integer"),
                            ("module.disc_weight=-0.1", "module.disc_weight=-0.1 must be"),
                            (f"records.dir={tmp_path}/none", "holds no latent record shards")]:
        with pytest.raises(ConfigError, match=match):
            validate_config(compose_train([*ok, override], tmp_path))
    with pytest.raises(ConfigError, match="stage1 is required"):
        validate_config(compose_train(["experiment=ccsr_stage2", "perceptual.allow_random_init=true"], tmp_path))


def test_cfw_and_ccsr_stage2_presets_have_the_authors_settings(tmp_path, tmp_path_factory, tiny_backbone):
    records = fake_records(tmp_path_factory.mktemp("rec"))
    c = compose_train(["experiment=stablesr_cfw", f"records.dir={records}"], tmp_path)
    assert c.module.disc_weight == pytest.approx(0.025) and c.module.adaptive_disc_weight is False
    assert c.module.disc_start == 501 and c.optim.lr == pytest.approx(5e-5) and list(c.optim.betas) == [0.5, 0.9]
    assert c.module.decoder.w == 0.5 and c.module.decoder.train_w == 1.0 and c.module.latent_source is None
    s = compose_train(["experiment=ccsr_stage2", "stage1=/x"], tmp_path)
    assert s.module.disc_weight == pytest.approx(0.5) and s.module.adaptive_disc_weight is True
    assert s.optim.lr == pytest.approx(5e-6) and list(s.optim.betas) == [0.5, 0.9]
    assert s.module.latent_source.start == "hr" and s.sampler.grid == 45 and s.method.paper_iterations == 100


class _StepSpy:
    """Records, for every optimizer step of a DecoderGANFinetune, which parameters changed."""

    def __init__(self, module):
        self.module, self.log, self._orig = module, [], module.step_optimizer
        module.step_optimizer = self

    def __call__(self, opt):
        m = self.module
        names = {id(p): n for n, p in m.named_parameters()}
        params = {n: p for n, p in m.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        owned = {names[id(p)] for g in opt.param_groups for p in g["params"]}
        with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
        self._orig(opt)
        changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
        self.log.append((owned, with_grad, changed))


def test_alternating_halves_update_only_their_own_weights(tmp_path, tmp_path_factory, tiny_backbone):
    import hydra

    records = fake_records(tmp_path_factory.mktemp("rec"))
    cfg = compose_train([*GAN_FAST, "experiment=stablesr_cfw", f"records.dir={records}", "train.iterations=2",
                         "train.export_weights=false", "data.batch_size=1", "train.total_batch_size=1"], tmp_path)
    module = hydra.utils.instantiate(cfg.module, backbone=tiny_backbone)
    spy = _StepSpy(module)
    import sr_lab.train as train_mod

    orig = hydra.utils.instantiate

    def inst(config, *args, **kwargs):  # hand the spied module to sr_lab.train
        if config is cfg.module:
            return module
        return orig(config, *args, **kwargs)

    train_mod.hydra.utils.instantiate = inst
    try:
        run(cfg)
    finally:
        train_mod.hydra.utils.instantiate = orig
    gen = {n for n, _ in module.named_parameters() if n.startswith("decoder.")}
    disc = {n for n, _ in module.named_parameters() if n.startswith("discriminator.")}
    assert len(spy.log) == 4  # generator, discriminator per iteration
    for i, (owned, with_grad, changed) in enumerate(spy.log):
        half = gen if i % 2 == 0 else disc
        assert owned == half
        assert with_grad <= half, "the other half's weights got gradients"
        if i == 1:  # iteration 0 < disc_start=1: the discriminator step has no gradients, changes nothing
            assert not with_grad and not changed
        else:
            assert changed and changed <= half


@pytest.mark.parametrize("preset", ["stablesr_cfw", "ccsr_stage2"])
def test_decoder_presets_train_and_resume_to_the_same_weights(preset, tmp_path, tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("inputs")
    inputs = [f"records.dir={fake_records(root)}"] if preset == "stablesr_cfw" else \
        [f"stage1={stage1_export('ccsr_stage1', root, tiny_backbone)}", "sampler.steps=3"]  # the deprecated alias of grid (FAST sets steps too)
    # iteration 0: reconstruction losses only (disc_start=1); iteration 1: the GAN terms as well.
    # CFW with 2 micro-batches per iteration (gradient accumulation of both halves)
    acc = ["data.batch_size=1", "train.total_batch_size=2"] if preset == "stablesr_cfw" else []
    val = "train.val_every=2" if preset == "stablesr_cfw" else "train.val_every=100"
    base = [*GAN_FAST, f"experiment={preset}", *inputs, *acc, "train.iterations=2", val]
    full = run(compose_train([*base, "train.ckpt_every=1"], tmp_path / "full"))
    for key in ("train/l1", "train/lpips", "train/g_loss", "train/d_loss", "train/d_weight"):
        assert key in full and full[key] == full[key], key
    if preset == "stablesr_cfw":
        assert full["train/d_weight"] == pytest.approx(0.025)  # fixed: the decoder's last layer is frozen
        assert all(k in full for k in ("val/psnr_y", "val/ssim_y", "val/lpips", "val/psnr_y_w0"))
    else:
        assert full["train/d_weight"] != pytest.approx(0.5)  # adaptive: ||grad L_rec|| / ||grad L_G|| x 0.5
    mid = tmp_path / "full" / "checkpoints" / "step0000002.ckpt"  # 2 optimizer steps per iteration
    run(compose_train([*base, f"ckpt_path={mid}", "train.export_weights=false"], tmp_path / "resumed"))
    a = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    prefix = ("decoder.fusion.", "discriminator.") if preset == "stablesr_cfw" else ("decoder.decoder.",
                                                                                    "decoder.post_quant_conv.",
                                                                                    "discriminator.")
    assert a and all(k.startswith(prefix) for k in a)
    assert any("running_mean" in k for k in a)  # discriminator BatchNorm statistics travel with it
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert any(not torch.equal(a[k], v) for k, v in _weights(mid).items())
    assert (tmp_path / "full" / "export" / "trainable.safetensors").is_file()


@pytest.mark.slow  # two CPU processes (~40 s); run with `make test-slow`
@pytest.mark.timeout(400)
def test_cfw_ddp_two_cpu_processes(tmp_path, tmp_path_factory):
    """trainer=ddp on 2 CPU processes (gloo): both halves' gradients are all-reduced by hand, the replicas
    end identical (checked by the module), rank 0 exports."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import ROOT

    records = fake_records(tmp_path_factory.mktemp("rec"), num=8, shard_size=4)
    args = ["experiment=stablesr_cfw", f"records.dir={records}", "perceptual.allow_random_init=true",
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32",
            "train.total_batch_size=4", "data.batch_size=1", "train.iterations=2", "train.val_every=2",
            "train.ckpt_every=2", "data.crop_size=32", "module.disc_start=0", "module.discriminator.ndf=16",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "sr-train"), *args], cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "accumulate=2 world=2" in out and "DDP replicas in sync" in out
    assert (tmp_path / "export" / "trainable.safetensors").is_file()
    assert "train/d_loss" in json.loads((tmp_path / "metrics.json").read_text())

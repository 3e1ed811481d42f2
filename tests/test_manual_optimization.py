"""Manual optimisation shared by the stage modules (sr_lab/modules/manual_optimization.py) and the contract
between sr_lab.train and a stage (sr_lab/modules/protocol.py): alternating optimizers, gradient
accumulation against a hand-written loop, the decoder GAN's generator-then-discriminator steps, the
optimizer factory, and a non-conforming module refused by train.run."""
from __future__ import annotations

import itertools

import hydra
import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from helpers import FAST, compose_train
from sr_lab.config.validation import ConfigError
from sr_lab.modules.decoder_gan import DecoderGANFinetune
from sr_lab.modules.diffusion_finetune import DiffusionAdapterFinetune
from sr_lab.modules.latent_records import LatentRecordWriter
from sr_lab.modules.manual_optimization import OptimizerFactory
from sr_lab.modules.protocol import TrainableStage, missing_members
from sr_lab.train import run
from sr_lab.utils.seeding import make_generator
from stage_inputs import fake_records

LR = 1e-2  # large enough that a step between the two loss parts moves the weights far beyond 1e-6
ATOL = 1e-6


def _diffusion_module(backbone, tmp_path, mode: str):
    cfg = compose_train(["experiment=ccsr_stage1", "data.crop_size=64", f"optim.mode={mode}", f"optim.lr={LR}"],
                        tmp_path)
    return hydra.utils.instantiate(cfg.module, backbone=backbone), cfg


def _batches(n: int, size: int = 64, scale: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"hr": torch.rand(2, 3, size, size, generator=g), "lr": torch.rand(2, 3, size // scale, size // scale,
                                                                                 generator=g)} for _ in range(n)]


def _fit(module, batches: list[dict], accumulate: int) -> pl.Trainer:
    """Train ``module`` on ``batches`` (one micro-batch each) with a bare Lightning trainer."""
    module.configure_run(accumulate, {})
    iterations = len(batches) // accumulate
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1,
                         max_steps=iterations * module.optimizer_steps_per_iteration, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    assert module._micro == len(batches)
    return trainer


def _condition(module, lr, hr_size):
    """The stage's condition for LR images (``make_condition``; ``prepare`` where it replaced it)."""
    if hasattr(module, "make_condition"):
        return module.make_condition(lr, hr_size)
    return module.prepare(lr, hr_size)[0]


def _snapshot(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def _spy_parts(module) -> list[torch.Tensor]:
    """Record the trainable weights every time a loss part is evaluated."""
    seen: list[torch.Tensor] = []
    orig = module.loss.parts

    def wrap(part):
        def spied(*args, **kwargs):
            seen.append(_snapshot(module.trainable_parameters()))
            return part(*args, **kwargs)
        return spied

    module.loss.parts = lambda: [wrap(p) for p in orig()]
    return seen


def _reference(module, batches: list[dict], accumulate: int, alternate: bool, init: torch.Tensor):
    """The documented optimisation written out by hand, from weights ``init``: per micro-batch the
    generator make_generator(seed, "train", micro, rank 0) draws the HR latent, then every loss part in
    turn; one AdamW per part (alternate) or one (combined); gradients of a part accumulate over the
    micro-batches of an iteration (divided by ``accumulate``); with ``accumulate == 1`` in alternate mode
    part i's optimizer steps right after part i's backward, else all step in turn at the end of the
    iteration. Returns (final weights, weights seen by every part evaluation, optimizers)."""
    params = module.trainable_parameters()
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(init[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    parts = module.loss.parts()
    opts = [torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
            for _ in range(len(parts) if alternate else 1)]
    seen = []

    def step(opt, grads):  # a weight no part reached keeps grad None (AdamW skips it, as in the module)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def add(a, b):
        return b if a is None else a if b is None else a + b

    for it in range(len(batches) // accumulate):
        acc: list[list[torch.Tensor] | None] = [None] * len(opts)
        for m in range(accumulate):
            micro = it * accumulate + m
            hr, lr = batches[micro]["hr"], batches[micro]["lr"]
            gen = make_generator(module.seed, "train", micro, 0)
            x0 = module.backbone.encode(hr, generator=gen, sample=True)
            cond = _condition(module, lr, tuple(hr.shape[-2:]))
            for i, part in enumerate(parts):
                seen.append(_snapshot(params))
                values = part(module.denoise, x0, cond, module.backbone.alphas_cumprod, gen)
                grads = torch.autograd.grad(sum(values.values()) / accumulate, params, allow_unused=True)
                k = i if alternate else 0
                acc[k] = list(grads) if acc[k] is None else [add(a, g) for a, g in zip(acc[k], grads)]
                if alternate and accumulate == 1:
                    step(opts[k], acc[k])
                    acc[k] = None
        for k, opt in enumerate(opts):
            if acc[k] is not None:
                step(opt, acc[k])
    return _snapshot(params), seen, opts


def _adam_state(opt, p) -> torch.Tensor:
    return opt.state[p]["exp_avg"]


def test_alternate_second_part_sees_the_first_steps_weights_and_states_are_separate(tiny_backbone, tmp_path):
    module, _ = _diffusion_module(tiny_backbone, tmp_path, "alternate")
    assert module.n_parts == 2
    init = _snapshot(module.trainable_parameters())
    seen = _spy_parts(module)
    batches = _batches(2)
    _fit(module, batches, accumulate=1)
    trained = _snapshot(module.trainable_parameters())
    assert len(seen) == 4  # 2 batches x 2 parts
    # part 2 of a batch sees the weights after part 1's step, the next batch after part 2's step
    for a, b in itertools.pairwise(seen):
        assert not torch.equal(a, b)
    opts = [o.optimizer for o in module.optimizers()]
    assert len(opts) == 2 and opts[0] is not opts[1] and all(type(o) is torch.optim.AdamW for o in opts)
    p = next(p for p in module.trainable_parameters() if _adam_state(opts[0], p).abs().sum() > 0)
    s0, s1 = _adam_state(opts[0], p), _adam_state(opts[1], p)
    assert s0 is not s1 and not torch.allclose(s0, s1)  # two states, from the two parts' gradients
    assert int(opts[0].state[p]["step"]) == int(opts[1].state[p]["step"]) == 2

    del module.loss.parts  # un-spy
    ref, ref_seen, ref_opts = _reference(module, batches, accumulate=1, alternate=True, init=init)
    assert torch.allclose(trained, ref, rtol=0, atol=ATOL)
    assert all(torch.allclose(a, b, rtol=0, atol=ATOL) for a, b in zip(seen, ref_seen))
    for o, r in zip(opts, ref_opts):
        assert torch.allclose(_adam_state(o, p), _adam_state(r, p), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["alternate", "combined"])
def test_accumulation_matches_a_hand_written_loop(mode, tiny_backbone, tmp_path):
    module, _ = _diffusion_module(tiny_backbone, tmp_path, mode)
    init = _snapshot(module.trainable_parameters())
    seen = _spy_parts(module)
    batches = _batches(4, seed=1)  # 2 iterations x 2 micro-batches
    _fit(module, batches, accumulate=2)
    trained = _snapshot(module.trainable_parameters())
    assert not torch.equal(trained, init)
    # within an iteration nothing steps: every part of both micro-batches sees the same weights
    assert all(torch.equal(seen[0], s) for s in seen[:4]) and not torch.equal(seen[0], seen[4])
    assert all(g is None for slot in module._grad_stash for g in slot)  # the stash is empty between iterations
    del module.loss.parts
    ref, _, ref_opts = _reference(module, batches, accumulate=2, alternate=mode == "alternate", init=init)
    assert torch.allclose(trained, ref, rtol=0, atol=ATOL), float((trained - ref).abs().max())
    opts = [o.optimizer for o in module.optimizers()] if mode == "alternate" else [module.optimizers().optimizer]
    assert len(opts) == len(ref_opts)
    p = module.trainable_parameters()[0]
    for o, r in zip(opts, ref_opts):
        assert int(o.state[p]["step"]) == 2
        assert torch.allclose(_adam_state(o, p), _adam_state(r, p), rtol=0, atol=ATOL)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_decoder_gan_steps_the_generator_then_the_discriminator(accumulate, tiny_backbone, tmp_path,
                                                                  tmp_path_factory):
    records = fake_records(tmp_path_factory.mktemp("rec"))
    cfg = compose_train(["experiment=stablesr_cfw", f"records.dir={records}", "perceptual.allow_random_init=true",
                         "data.crop_size=64", "module.discriminator.ndf=16", "module.disc_start=0",
                         "module.perceptual_weight=0", "optim.lr=1e-3"], tmp_path)
    module = hydra.utils.instantiate(cfg.module, backbone=tiny_backbone)
    assert isinstance(module, DecoderGANFinetune)
    gen_params, disc_params = module.generator_parameters(), list(module.discriminator.parameters())
    log: list[tuple[str, bool, bool]] = []  # (which optimizer, generator moved, discriminator moved)
    after_g: list[torch.Tensor] = []
    orig = module.step_optimizer

    def spy(opt):
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        which = "G" if owned == {id(p) for p in gen_params} else "D" if owned == {id(p) for p in disc_params} else "?"
        g0, d0 = _snapshot(gen_params), _snapshot(disc_params)
        orig(opt)
        log.append((which, not torch.equal(g0, _snapshot(gen_params)), not torch.equal(d0, _snapshot(disc_params))))
        if which == "G":
            after_g.append(_snapshot(gen_params))

    module.step_optimizer = spy
    disc_sees: list[torch.Tensor] = []  # generator weights whenever the discriminator runs
    module.discriminator.register_forward_pre_hook(lambda m, a: disc_sees.append(_snapshot(gen_params)))
    g = torch.Generator().manual_seed(0)
    batches = [{"hr": torch.rand(1, 3, 64, 64, generator=g), "lr": torch.rand(1, 3, 64, 64, generator=g),
                "latent": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2 * accumulate)]
    _fit(module, batches, accumulate=accumulate)
    assert [w for w, _, _ in log] == ["G", "D", "G", "D"]
    assert all(gm and not dm for w, gm, dm in log if w == "G")
    assert all(dm and not gm for w, gm, dm in log if w == "D")
    opt_g, opt_d = (o.optimizer for o in module.optimizers())
    assert type(opt_g) is type(opt_d) is torch.optim.Adam and opt_g.defaults["betas"] == (0.5, 0.9)
    # per micro-batch the discriminator runs 3 times: on the reconstruction (generator half), then on
    # the real and the fake image (discriminator half); on the last micro-batch of an iteration the
    # discriminator half sees the generator after its step
    assert len(disc_sees) == 3 * len(batches)
    for it in range(2):
        last = (it + 1) * accumulate - 1
        assert torch.equal(disc_sees[3 * last + 1], after_g[it]) and torch.equal(disc_sees[3 * last + 2], after_g[it])
        assert not torch.equal(disc_sees[3 * last], after_g[it])


def test_stage_modules_conform_and_the_optimizer_comes_from_the_config(tiny_backbone, tmp_path, tmp_path_factory):
    diff, cfg = _diffusion_module(tiny_backbone, tmp_path, "alternate")
    assert isinstance(diff, TrainableStage) and missing_members(diff) == []
    assert OmegaConf.select(cfg, "optim.optimizer._target_") == "torch.optim.AdamW"
    opt = diff.optimizer_factory(diff.trainable_parameters())
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == LR and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["weight_decay"] == 0.01
    records = fake_records(tmp_path_factory.mktemp("rec"))
    gan_cfg = compose_train(["experiment=stablesr_cfw", f"records.dir={records}", "perceptual.allow_random_init=true",
                             "module.discriminator.ndf=16"], tmp_path)
    gan = hydra.utils.instantiate(gan_cfg.module, backbone=tiny_backbone)
    assert isinstance(gan, TrainableStage)
    opt = gan.optimizer_factory(gan.generator_parameters())
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["lr"] == 5e-5 and opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["weight_decay"] == 0.0
    s2 = compose_train(["experiment=ccsr_stage2", "stage1=/x"], tmp_path)
    assert s2.optim.optimizer._target_ == "torch.optim.Adam" and s2.module.optimizer.lr == pytest.approx(5e-6)

    # from Python, without the config: today's optimiser, or lr/betas/weight_decay over it
    plain = hydra.utils.instantiate(cfg.module, backbone=tiny_backbone, optimizer=None)
    opt = plain.optimizer_factory(plain.trainable_parameters())
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.999)
    legacy = hydra.utils.instantiate(cfg.module, backbone=tiny_backbone, optimizer=None, lr=5e-5, betas=[0.5, 0.9])
    opt = legacy.optimizer_factory(legacy.trainable_parameters())
    assert opt.defaults["lr"] == 5e-5 and opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(InstantiationException, match="pass either optimizer or lr, not both"):
        hydra.utils.instantiate(cfg.module, backbone=tiny_backbone, lr=5e-5)
    gan_plain = hydra.utils.instantiate(gan_cfg.module, backbone=tiny_backbone, optimizer=None)
    opt = gan_plain.optimizer_factory(gan_plain.discriminator.parameters())
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["lr"] == 5e-5
    assert repr(OptimizerFactory(torch.optim.SGD)) == "OptimizerFactory(SGD())"

    # the run contract
    diff.configure_run(3, {"a": 1})
    assert diff.accumulate == 3 and diff.run_config == {"a": 1}
    with pytest.raises(ValueError, match="accumulate=0 must be >= 1"):
        diff.configure_run(0, {})
    with pytest.raises(ValueError, match="accumulate=2 must be 1"):
        LatentRecordWriter.configure_run(object.__new__(LatentRecordWriter), 2, {})
    assert isinstance(diff, DiffusionAdapterFinetune)


def test_train_refuses_a_module_that_is_not_a_stage(tmp_path):
    cfg = compose_train([*FAST, "experiment=ccsr_stage1", "train.export_weights=false"], tmp_path)
    cfg.module = OmegaConf.create({"_target_": "torch.nn.Identity"})
    with pytest.raises(ConfigError) as info:
        run(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == ("module._target_=torch.nn.Identity builds Identity, not an sr_lab stage "
                   "(sr_lab.modules.protocol.TrainableStage): it lacks optimizer_steps_per_iteration, "
                   "trainable_parameters, configure_run")

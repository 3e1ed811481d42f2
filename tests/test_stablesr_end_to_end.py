"""StableSR's three stages and CCSR's two chained on the tiny backbone, then used by the inference engine:
`decoder_checkpoint=<decoder stage export>` + `decoder_w` (StableSR Eq. 6 w, CCSR stage-2 decoder)."""
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from helpers import FAST, compose_train
from sr_lab.inference import load_stage
from sr_lab.inference.run import run_inference
from sr_lab.train import CONF_DIR
from sr_lab.train import run as train_run

TINY = [*FAST, "train.iterations=1", "train.ckpt_every=1", "data.num_val_images=1"]
GAN = ["perceptual.allow_random_init=true", "module.discriminator.ndf=16", "module.disc_start=0"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    train_run(compose_train([*TINY, "experiment=stablesr_stage1"], root / "s1"))
    train_run(compose_train([*TINY, "experiment=stablesr_latents", f"stage1={root / 's1' / 'export'}",
                             f"records.dir={root / 'records'}", "records.num=4", "records.shard_size=2",
                             "sampler.steps=3"], root / "latents"))
    train_run(compose_train([*TINY, *GAN, "experiment=stablesr_cfw", f"records.dir={root / 'records'}",
                             "data.crop_size=32"], root / "cfw"))
    train_run(compose_train([*TINY, "experiment=ccsr_stage1"], root / "c1"))
    # stage1= takes a run folder as well as an export folder, a trainable.safetensors or a .ckpt
    train_run(compose_train([*TINY, *GAN, "experiment=ccsr_stage2", f"stage1={root / 'c1'}",
                             "sampler.steps=3"], root / "c2"))
    return root


def _infer(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_chain"):
        cfg = compose(config_name="infer", overrides=[*overrides, "progress=false", "sampler.steps=4"])
    return run_inference(cfg)


@pytest.fixture(scope="module")
def lr_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("lr")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / "x.png")
    return d / "x.png"


def test_decoder_stages_load_for_inference(chain):
    cfw, cfg = load_stage(chain / "cfw" / "export")
    assert cfg.task_name == "stablesr_cfw" and cfw.w == 0.5
    cfw.w = 0.0
    latent, lr = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32)
    assert torch.equal(cfw.decode_latent(latent, lr), cfw.backbone.decode(latent))  # w = 0: the plain decoder
    cfw.w = 1.0
    assert not torch.equal(cfw.decode_latent(latent, lr), cfw.backbone.decode(latent))
    with pytest.raises(ValueError, match="w=2"):
        cfw.w = 2
    c2, _ = load_stage(chain / "c2" / "export")
    assert not hasattr(c2, "w")  # no fidelity knob: the pipeline leaves decoder_w alone
    out = c2.decode_latent(latent, lr)
    assert out.shape == (1, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    records = sorted((chain / "records").glob("records-*.safetensors"))
    assert [p.name for p in records] == ["records-000000000-000000002.safetensors",
                                         "records-000000002-000000004.safetensors"]


def test_stablesr_inference_with_the_cfw_decoder_and_w(chain, lr_image, tmp_path):
    base = [f"checkpoint={chain / 's1' / 'export'}", f"input={lr_image}", "start=lr", "seeds=[1]"]
    plain = _infer([*base, f"output_dir={tmp_path / 'plain'}"])
    w0 = _infer([*base, f"output_dir={tmp_path / 'w0'}", f"decoder_checkpoint={chain / 'cfw' / 'export'}",
                 "decoder_w=0.0"])
    w1 = _infer([*base, f"output_dir={tmp_path / 'w1'}", f"decoder_checkpoint={chain / 'cfw' / 'export'}",
                 "decoder_w=1.0"])
    img = {k: np.asarray(Image.open(p / "seed_1" / "x.png")) for k, p in (("plain", plain), ("w0", w0), ("w1", w1))}
    assert img["plain"].shape == (48, 40, 3)
    assert np.array_equal(img["w0"], img["plain"])        # CFW at w = 0 is the plain VAE decoder
    assert not np.array_equal(img["w1"], img["plain"])    # w = 1 fuses the LR encoder features
    meta = json.loads((w1 / "run.json").read_text())
    assert meta["config"]["decoder_w"] == 1.0 and meta["decoder_checkpoint"]


def test_ccsr_inference_with_the_stage2_decoder(chain, lr_image, tmp_path):
    base = [f"checkpoint={chain / 'c1' / 'export'}", f"input={lr_image}", "seeds=[0]"]
    plain = _infer([*base, f"output_dir={tmp_path / 'plain'}"])
    tuned = _infer([*base, f"output_dir={tmp_path / 'tuned'}", f"decoder_checkpoint={chain / 'c2' / 'export'}"])
    a = np.asarray(Image.open(plain / "seed_0" / "x.png"))
    b = np.asarray(Image.open(tuned / "seed_0" / "x.png"))
    assert a.shape == b.shape == (48, 40, 3) and not np.array_equal(a, b)  # the finetuned decoder decodes


def test_ccsr_stage2_decoder_decodes_the_sampled_latent(chain):
    """The stage-2 decoder is applied to exactly the latent the stage-1 sampler returned: the pipeline's
    output equals ``c2.decode_latent`` of that latent, the plain output ``c1.decode_latent`` of it."""
    import hydra
    import torch.nn.functional as F

    from sr_lab.inference import SRPipeline, TileSettings

    c1, cfg = load_stage(chain / "c1" / "export")
    c2, _ = load_stage(chain / "c2" / "export")
    sampler = hydra.utils.instantiate(cfg.sampler)
    seen = []

    def recording(*a, **k):
        seen.append(sampler(*a, **k))
        return seen[-1]

    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    tiles = TileSettings(enabled=False)
    tuned = SRPipeline(c1, recording, decoder_stage=c2, tile=tiles)(lr, [0])[0]
    plain = SRPipeline(c1, recording, tile=tiles)(lr, [0])[0]
    assert torch.equal(seen[0], seen[1])  # same seed, same latent
    up = F.interpolate(lr, size=(48, 40), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        assert torch.allclose(tuned, c2.decode_latent(seen[0], up), atol=1e-6)
        assert torch.allclose(plain, c1.decode_latent(seen[0], up), atol=1e-6)
    assert not torch.allclose(tuned, plain, atol=1e-3)


def test_checkpoint_and_decoder_checkpoint_kinds_are_checked(chain, lr_image, tmp_path):
    from sr_lab.config.validation import ConfigError

    with pytest.raises(ConfigError, match="checkpoint=.* does not denoise .*give it as decoder_checkpoint="):
        _infer([f"checkpoint={chain / 'cfw' / 'export'}", f"input={lr_image}", f"output_dir={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match="decoder_checkpoint=.* without a trained decoder"):
        _infer([f"checkpoint={chain / 's1' / 'export'}", f"input={lr_image}", f"output_dir={tmp_path / 'b'}",
                f"decoder_checkpoint={chain / 'c1' / 'export'}"])


def test_a_stage_loads_from_every_reference_and_as_a_trainable_student(chain, tiny_backbone):
    """run folder, export folder, trainable.safetensors: the same tensors; trainable=True on a shared
    backbone gives exactly the stored tensors requires_grad (a student initialised from a teacher)."""
    from safetensors.torch import load_file

    from sr_lab.modules.stage_io import load_frozen_stage

    stored = load_file(chain / "c1" / "export" / "trainable.safetensors")
    for ref in (chain / "c1", chain / "c1" / "export", chain / "c1" / "export" / "trainable.safetensors"):
        m, _ = load_stage(ref)
        state = m.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stored.items())
        assert not any(p.requires_grad for p in m.parameters())
    student, _ = load_stage(chain / "c1", backbone=tiny_backbone, trainable=True)
    teacher = load_frozen_stage(chain / "c1", tiny_backbone)
    assert student.backbone is teacher.backbone is tiny_backbone
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names == set(stored)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_start_a_stage_was_validated_with_is_the_inference_default(chain):
    from sr_lab.diffusion.samplers import ddim
    from sr_lab.inference import SRPipeline

    s1, cfg = load_stage(chain / "s1")
    c1, _ = load_stage(chain / "c1")
    assert cfg.module.start == "lr" and s1.start == "lr" and c1.start == "noise"
    assert SRPipeline(s1, ddim.sample).start_mode == "lr" and SRPipeline(c1, ddim.sample).start_mode == "noise"
    assert SRPipeline(s1, ddim.sample, start="noise").start_mode == "noise"

"""The inference path end to end on a short tiny CCSR stage-1 run: stage loading, the SR pipeline
(sizes, seeds, tiling, start, decoder stage), `make infer` and its config checks."""
import json
from functools import partial
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, compose_train
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from sr_lab.config.validation import ConfigError
from sr_lab.diffusion.samplers import ccsr_truncated, ddim
from sr_lab.diffusion.schedule import q_sample
from sr_lab.inference import SRPipeline, StageLoadError, TileSettings, VAETileSettings, load_stage
from sr_lab.inference.pipeline import seed_generators
from sr_lab.inference.run import effective_sampler_config, run_inference
from sr_lab.train import CONF_DIR


@pytest.fixture(scope="session")
def stage(trained_run):
    module, cfg = load_stage(trained_run / "export")
    return module


def compose_infer(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_infer"):
        return compose(config_name="infer", overrides=list(overrides))


def ddim_sampler(steps=2, eta=0.0):
    return lambda model, noise, cond, abar, **kw: ddim.sample(model, noise, cond, abar, steps=steps, eta=eta, **kw)


# ---------------------------------------------------------------- stage loading
def test_load_stage_from_export_and_ckpt_gives_the_trained_weights(trained_run, stage):
    exported = load_file(trained_run / "export" / "trainable.safetensors")
    assert exported and all(k.startswith("adapter.") for k in exported)
    own = stage.state_dict()
    assert all(torch.equal(own[k], v) for k, v in exported.items())
    assert not stage.training and not any(p.requires_grad for p in stage.parameters())
    from_ckpt, cfg = load_stage(trained_run / "checkpoints" / "last.ckpt")
    assert cfg.task_name == "ccsr_stage1"
    ck = from_ckpt.state_dict()
    assert all(torch.equal(ck[k], v) for k, v in exported.items())
    run_folder, _ = load_stage(trained_run)  # a run folder resolves to its export/
    assert torch.equal(run_folder.state_dict()[next(iter(exported))], next(iter(exported.values())))


def test_load_stage_errors_name_the_file(trained_run, tmp_path):
    with pytest.raises(StageLoadError, match="does not exist"):
        load_stage(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageLoadError, match=r"lacks config\.yaml and trainable\.safetensors"):
        load_stage(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((trained_run / "export" / "config.yaml").read_text())
    state = load_file(trained_run / "export" / "trainable.safetensors")
    save_file({**state, "adapter.not_a_weight": torch.zeros(1)}, str(bad / "trainable.safetensors"))
    with pytest.raises(StageLoadError,
                       match=r"bad/trainable\.safetensors: 1 stored tensors do not exist.*not_a_weight"):
        load_stage(bad)
    k = next(iter(state))
    save_file({kk: v for kk, v in state.items() if kk != k}, str(bad / "trainable.safetensors"))
    with pytest.raises(StageLoadError, match="lacks 1 trainable tensors"):
        load_stage(bad)


# ---------------------------------------------------------------- pipeline
def test_odd_sized_input_comes_out_at_exactly_4x_with_and_without_tiling(stage):
    lr = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    plain = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(enabled=False))
    out = plain(lr, [0])
    assert out.shape == (1, 1, 3, 148, 212) and out.min() >= 0 and out.max() <= 1
    # many aggregation tiles (latent 19x27, tiles 8 / overlap 4) and many VAE tiles: same size
    tiled = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(True, 8, 4, 6),
                       vae_tile=VAETileSettings(True, 64, 16), color_fix="wavelet")
    assert tiled(lr, [0]).shape == (1, 1, 3, 148, 212)


def test_tiled_content_equals_untiled_for_a_local_model():
    """Content, not only shape: with a pixel-wise denoiser and a block-local VAE (the stub), aggregation
    tiles (Gaussian-weighted average of identical per-pixel predictions) and feathered VAE tiles must
    reproduce the untiled image everywhere, on an odd-sized input."""
    stage = StubStage()
    lr = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    plain = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(enabled=False),
                       vae_tile=VAETileSettings(enabled=False))(lr, [0, 1])
    tiled = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(True, 8, 4, 6),
                       vae_tile=VAETileSettings(True, 64, 16))(lr, [0, 1])
    assert tiled.shape == plain.shape == (2, 1, 3, 148, 212)
    assert torch.allclose(tiled, plain, atol=1e-5), float((tiled - plain).abs().max())
    assert float(plain.std()) > 0.05  # the images have content


def test_tiled_equals_untiled_when_one_tile_covers_the_latent(stage):
    lr = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    a = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(enabled=False))(lr, [5])
    b = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(True, 64, 32))(lr, [5])
    c = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(True, 12, 6))(lr, [5])  # 8x12 latent: one tile
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_seeds_batched_equal_one_by_one(stage):
    lr = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(2))
    sampler = partial(ccsr_truncated.sample, grid=9)  # ancestral: draws noise
    batched = SRPipeline(stage, sampler)(lr, [0, 1, 2])
    alone = torch.cat([SRPipeline(stage, sampler)(lr, [s]) for s in (0, 1, 2)])
    chunks = SRPipeline(stage, sampler, seed_batch=2)(lr, [0, 1, 2])
    single_image = SRPipeline(stage, sampler)(lr[1:], [1])
    assert batched.shape == (3, 2, 3, 48, 80)
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, chunks, atol=1e-5)
    assert torch.allclose(batched[1, 1], single_image[0, 0], atol=1e-5)  # also independent of the image batch
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # seeds differ


def test_start_from_lr_noises_the_lr_latent_with_the_seed_noise(stage):
    seen = {}

    def recording(model, noise, cond, abar, *, generator):
        seen["x_T"] = noise.clone()
        return noise

    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = SRPipeline(stage, recording, start="lr")
    pipe(lr, [4])
    up, _ = pipe.prepare_lr(lr)
    z = stage.backbone.encode(up)
    eps = torch.randn(z.shape, generator=seed_generators([4], 1, "cpu")[0])
    want = q_sample(stage.backbone.alphas_cumprod, z, torch.tensor([999]), eps)
    assert torch.allclose(seen["x_T"], want, atol=1e-5)
    SRPipeline(stage, recording, start="noise")(lr, [4])
    assert torch.allclose(seen["x_T"], eps)


def test_cfg_and_decoder_stage_are_used(stage):
    class Decoder:
        w = 1.0

        def decode_latent(self, latent, lr):
            assert lr.shape[-2:] == (latent.shape[-2] * 8, latent.shape[-1] * 8)
            return torch.full((latent.shape[0], 3, *lr.shape[-2:]), 0.25)

    dec = Decoder()
    lr = torch.rand(1, 3, 8, 8)
    out = SRPipeline(stage, ddim_sampler(2), decoder_stage=dec, decoder_w=0.3)(lr, [0])
    assert dec.w == 0.3 and torch.allclose(out, torch.full_like(out, 0.25))
    plain = SRPipeline(stage, ddim_sampler(2))(lr, [0])
    guided = SRPipeline(stage, ddim_sampler(2), cfg_scale=1.0, negative_prompt="blurry")(lr, [0])
    assert torch.equal(plain, guided)  # s = 1: guidance off
    strong = SRPipeline(stage, ddim_sampler(2), cfg_scale=5.0, negative_prompt="blurry")(lr, [0])
    assert strong.shape == plain.shape and not torch.allclose(strong, plain, atol=1e-4)


class StubBackbone(torch.nn.Module):
    """A cheap stand-in with the backbone protocol: 8x average-pool 'VAE', SD schedule."""

    def __init__(self):
        super().__init__()
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1 - betas)))
        self.vae_factor, self.latent_scale = 8, 1.0
        self.unet = type("U", (), {"config": type("C", (), {"in_channels": 4})()})()
        self.vae = type("V", (), {"config": type("C", (), {"latent_channels": 4})()})()
        self.encoded = []

    def encode(self, image01, generator=None, sample=False):
        self.encoded.append(tuple(image01.shape[-2:]))
        z = F.avg_pool2d(image01 * 2 - 1, 8)
        return torch.cat([z, z.mean(1, keepdim=True)], 1)

    def decode(self, latent):
        return ((F.interpolate(latent[:, :3], scale_factor=8, mode="nearest") + 1) / 2).clamp(0, 1)


class StubStage:
    def __init__(self):
        self.backbone = StubBackbone()

    def prepare(self, lr01, hr_size, prompts=None, negative_prompts=None, **_):
        return {"lr_latent": self.backbone.encode(lr01), "context": torch.zeros(lr01.shape[0], 2, 3),
                "lr_image": lr01}, None

    def denoise(self, x, t, cond):
        return 0.1 * x - 0.05 * cond["lr_latent"]

    def decode_latent(self, latent, lr01=None):
        return self.backbone.decode(latent)


def test_large_input_comes_out_at_exactly_4x():
    """1000x750 -> 4000x3000 through aggregation tiles and VAE tiles (cheap stand-in stage)."""
    stage = StubStage()
    lr = torch.rand(1, 3, 750, 1000, generator=torch.Generator().manual_seed(4))
    out = SRPipeline(stage, ddim_sampler(2), tile=TileSettings(True, 64, 32, 16))(lr, [0])
    assert out.shape == (1, 1, 3, 3000, 4000)
    assert max(max(s) for s in stage.backbone.encoded) <= 1024  # the LR was encoded in VAE tiles


# ---------------------------------------------------------------- the app
def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (11, 17, 3), dtype=np.uint8)).save(folder / "rgb.png")
    sub = folder / "sub"
    sub.mkdir()
    Image.fromarray(rng.integers(0, 65535, (9, 9), dtype=np.uint16)).save(sub / "gray16.png")
    Image.fromarray(rng.integers(0, 255, (8, 12, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    (folder / "broken.png").write_bytes((folder / "rgb.png").read_bytes()[:60])


def test_make_infer_end_to_end(trained_run, tmp_path):
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = (f"checkpoint={trained_run / 'export'} input={tmp_path / 'in'} output_dir={out} seeds=[0,3] "
            f"sampler.steps=6 color_fix=adain progress=false batch_size=2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["make", "-s", "infer", f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (0, 3):
        sizes = {p.relative_to(out / f"seed_{seed}").as_posix(): Image.open(p).size
                 for p in (out / f"seed_{seed}").rglob("*.png")}
        assert sizes == {"rgb.png": (68, 44), "rgba.png": (48, 32), "sub/gray16.png": (36, 36)}
    meta = json.loads((out / "run.json").read_text())
    assert meta["seeds"] == [0, 3] and meta["sr_lab_version"] and meta["device"]["type"] == "cpu"
    assert meta["config"]["color_fix"] == "adain" and meta["config"]["checkpoint"] == str(trained_run / "export")
    assert meta["sampler"]["_target_"].endswith("ccsr_truncated.sample") and meta["sampler"]["steps"] == 6
    assert meta["sampler"]["t_max"] == pytest.approx(0.6667)  # the checkpoint's own sampler, steps overridden
    assert len(meta["images"]) == 3 and all(r["seconds"] > 0 for r in meta["images"])
    assert {r["outputs"]["3"] for r in meta["images"]} == {"seed_3/rgb.png", "seed_3/rgba.png", "seed_3/sub/gray16.png"}
    assert [Path(s["input"]).name for s in meta["skipped"]] == ["broken.png"]
    assert meta["timings"]["total_s"] > 0 and meta["timings"]["per_image_s"] > 0
    a = np.asarray(Image.open(out / "seed_0" / "rgb.png"))
    b = np.asarray(Image.open(out / "seed_3" / "rgb.png"))
    assert a.shape == (44, 68, 3) and not np.array_equal(a, b)


def test_run_inference_in_process_and_sampler_choice(trained_run, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.full((8, 10, 3), 128, np.uint8)).save(img)
    cfg = compose_infer([f"checkpoint={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={img}",
                         f"output_dir={tmp_path / 'o'}", "sampler=ddim", "sampler.steps=2", "progress=false",
                         "upscale=2", "start=lr", "cfg_scale=2", "negative_prompt=noisy"])
    out = run_inference(cfg)
    assert Image.open(out / "seed_0" / "x.png").size == (20, 16)
    meta = json.loads((out / "run.json").read_text())
    assert meta["sampler"] == {"_target_": "sr_lab.diffusion.samplers.ddim.sample", "_partial_": True,
                               "steps": 2, "eta": 0.0}  # null knobs are dropped
    assert meta["timesteps"] == [999, 0] and meta["model_calls_per_image"] == 2
    own = {"_target_": "sr_lab.diffusion.samplers.ccsr_truncated.sample", "_partial_": True, "grid": 45,
           "steps": None, "t_max": 0.6667, "t_min": 0.3333, "chain": "continuous", "timesteps": None, "hook": None}
    stage_cfg = compose_train(["experiment=ccsr_stage1"], tmp_path)
    assert effective_sampler_config(compose_infer(["checkpoint=x", "input=y", "sampler.t_max=0.5"]).sampler,
                                    stage_cfg) == {**own, "t_max": 0.5}


@pytest.mark.parametrize("override,match", [
    (["checkpoint=/no/such/run"], "checkpoint=/no/such/run does not exist"),
    (["input=/no/such/dir"], "input=/no/such/dir does not exist"),
    (["seeds=[]"], "seeds=[] must be a non-empty list"),
    (["seeds=[1,1]"], "seeds=[1, 1] has duplicates"),
    (["color_fix=histogram"], "color_fix=histogram must be one of"),
    (["start=hr"], "start=hr must be null (the stage's own) or one of"),
    (["precision=16"], "precision=16 must be one of"),
    (["device=tpu"], "device=tpu must be auto, cpu, cuda"),
    (["tile.overlap=64"], "tile.overlap=64 must be an integer in [0, tile.size=64)"),
    (["vae_tile.size=1020"], "vae_tile.size=1020 must be a multiple of the VAE factor 8"),
    (["sampler.steps=0"], "sampler.steps=0 must be an integer"),
    (["sampler.t_min=0.9"], "sampler.t_min=0.9 must be smaller than sampler.t_max"),
    (["sampler.eta=0.5"], "sampler.eta is not a knob of sr_lab.diffusion.samplers.ccsr_truncated.sample"),
    (["sampler.steps=5000"], "sampler.steps=5000 must be an integer in [1, 1000]"),
    (["cfg_scale=-1"], "cfg_scale=-1 must be a number >= 0"),
    (["decoder_w=2"], "decoder_w=2 must be a number in [0, 1]"),
    (["upscale=0"], "upscale=0 must be a positive integer"),
    (["batch_size=0"], "batch_size=0 must be a positive integer"),
])
def test_bad_values_name_the_key(override, match, trained_run, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    base = [f"checkpoint={trained_run / 'export'}", f"input={img}", f"output_dir={tmp_path / 'o'}"]
    cfg = compose_infer([*base, *override])
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        run_inference(cfg)
    assert not (tmp_path / "o" / "run.json").exists()


def test_cli_reports_a_config_error_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sr_lab.inference.run", f"input={tmp_path}",
                           f"output_dir={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: checkpoint is required (checkpoint=...)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_input_and_name_clashes_are_config_errors(trained_run, tmp_path):
    base = [f"checkpoint={trained_run / 'export'}", f"output_dir={tmp_path / 'o'}"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image"):
        run_inference(compose_infer([*base, f"input={tmp_path / 'empty'}"]))
    clash = tmp_path / "clash"
    clash.mkdir()
    for ext in ("png", "jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(clash / f"a.{ext}")
    with pytest.raises(ConfigError, match=r"a\.jpg and a\.png would both be written as a\.png"):
        run_inference(compose_infer([*base, f"input={clash}"]))


@pytest.mark.parametrize("first,want", [(1, [999]), (None, [999, 749, 499, 249])])
def test_addsr_sampler_with_psr_hook_from_config(first, want, trained_run, tmp_path):
    """`sampler=addsr` (re-noise rule + PSR step hook, a nested _target_) runs through sr-infer; run.json
    records exactly the listed timesteps (1-step: the model once at T-1)."""
    img = tmp_path / "x.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(img)
    over = [f"checkpoint={trained_run / 'export'}", f"input={img}", f"output_dir={tmp_path / 'o'}", "sampler=addsr",
            "progress=false", "seeds=[0,1]"]
    if first is not None:
        over.append(f"sampler.first={first}")
    out = run_inference(compose_infer(over))
    meta = json.loads((out / "run.json").read_text())
    assert meta["timesteps"] == want and meta["model_calls_per_image"] == len(want)
    assert meta["sampler"]["hook"]["_target_"] == "sr_lab.diffusion.hooks.PSRHook"
    assert Image.open(out / "seed_1" / "x.png").size == (32, 32)


def test_sampler_hook_knobs_merge_onto_the_stage_hook():
    """`sampler.hook.alpha=0.03` tunes the checkpoint's hook (ClearSR -> ClearSR*) instead of replacing it;
    a whole hook (`+hook@sampler.hook=psr`) replaces it; the infer config's null placeholders set nothing."""
    from omegaconf import OmegaConf

    from sr_lab.config.validation import ConfigError
    from sr_lab.inference.run import effective_sampler_config

    lsa = {"_target_": "sr_lab.diffusion.hooks.LSAHook", "alpha": 0.01, "beta": 0.01, "early_end": 0.3,
           "late_start": 0.8, "key": "lr_latent"}
    stage = OmegaConf.create({"sampler": {"_target_": "sr_lab.diffusion.samplers.ddpm_spaced.sample",
                                          "steps": 50, "hook": lsa}})
    nulls = {"alpha": None, "beta": None, "early_end": None, "late_start": None, "w": None, "space": None}
    knobs = OmegaConf.create({"steps": None, "hook": {**nulls, "alpha": 0.03}})
    got = effective_sampler_config(knobs, stage)
    assert got["hook"] == {**lsa, "alpha": 0.03} and got["steps"] == 50
    assert effective_sampler_config(OmegaConf.create({"hook": nulls}), stage)["hook"] == lsa
    psr = {**nulls, "_target_": "sr_lab.diffusion.hooks.PSRHook", "w": 0.5, "space": "latent"}
    assert effective_sampler_config(OmegaConf.create({"hook": psr}), stage)["hook"] == \
        {"_target_": "sr_lab.diffusion.hooks.PSRHook", "w": 0.5, "space": "latent"}
    no_hook = OmegaConf.create({"sampler": {"_target_": "sr_lab.diffusion.samplers.ddpm_spaced.sample",
                                            "steps": 50, "hook": None}})
    with pytest.raises(ConfigError, match="sampler.hook.alpha"):
        effective_sampler_config(knobs, no_hook)

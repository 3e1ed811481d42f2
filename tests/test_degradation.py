"""RealESRGANDegradation / BicubicDegradation: presets, determinism, per-sample variety, order, validation."""
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sr_lab.degradation import BicubicDegradation, RealESRGANDegradation
from sr_lab.degradation.filters import usm_sharp
from sr_lab.degradation.realesrgan import StageChoice

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["realesrgan", "stablesr", "ccsr", "bicubic"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def hr_batch(b=4, h=64, w=64, seed=0):
    small = torch.rand(b, 3, h // 4, w // 4, generator=gen(seed))
    img = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return torch.clamp(img + 0.05 * torch.rand(b, 3, h, w, generator=gen(seed + 100)), 0, 1)


def compose_preset(name, tmp_path):
    hydra = pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    root = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "degradation", root / "degradation")
    (root / "config.yaml").write_text(f"defaults:\n  - degradation: {name}\n  - _self_\nupscale: 4\n")
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = compose(config_name="config")
    return cfg.degradation, hydra.utils.instantiate(cfg.degradation)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    return {name: compose_preset(name, tmp_path_factory.mktemp(name)) for name in PRESETS}


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_and_range(presets, name):
    cfg, deg = presets[name]
    hr = hr_batch()
    for seed in range(3):
        out = deg(hr, gen(seed))
        upsampled = cfg.resize_lr_to_hr
        assert out["hr"].shape == hr.shape
        assert out["lr"].shape == ((4, 3, 64, 64) if upsampled else (4, 3, 16, 16))
        for t in out.values():
            assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1 and torch.isfinite(t).all()
        if cfg.round_lr:
            assert torch.equal(out["lr"] * 255, torch.round(out["lr"] * 255))


def test_preset_values(presets):
    cfg, deg = presets["stablesr"]
    assert list(cfg.jpeg_range2) == [60.0, 100.0] and cfg.no_degradation_prob == 0.01
    assert deg.blur_sigma == (0.2, 1.5) and deg.second_blur_prob == 0.5 and deg.noise_range2 == (1.0, 12.0)
    assert deg.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # inherited from realesrgan
    assert deg.use_usm and deg.usm_target and not deg.round_lr and deg.resize_lr_to_hr and deg.scale == 4
    _, ccsr = presets["ccsr"]
    assert not ccsr.use_usm and ccsr.round_lr and ccsr.resize_lr_to_hr and ccsr.resize_range == (0.3, 1.5)
    _, x4 = presets["realesrgan"]
    assert x4.resize_range == (0.15, 1.5) and x4.jpeg_range == (30.0, 95.0) and x4.round_lr and not x4.resize_lr_to_hr
    assert x4.resize_prob2 == (0.3, 0.4, 0.3) and x4.poisson_scale_range2 == (0.05, 2.5)
    _, bic = presets["bicubic"]
    assert isinstance(bic, BicubicDegradation) and bic.scale == 4


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("per_sample", [False, True])
def test_same_seed_identical_different_seed_different(per_sample):
    deg = RealESRGANDegradation(per_sample=per_sample)
    hr = hr_batch()
    a, b, c = deg(hr, gen(7)), deg(hr, gen(7)), deg(hr, gen(8))
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"])
    assert not torch.equal(a["lr"], c["lr"])


def test_global_rng_untouched():
    deg = RealESRGANDegradation()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    deg(hr_batch(), gen(1))
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- per-sample variety
def test_per_sample_parameters_vary_even_without_per_sample_flag():
    deg = RealESRGANDegradation(per_sample=False)
    p = deg.sample_params(8, gen(3))
    assert len(p.choices) == 1
    for kernels in (p.kernel1, p.kernel2):
        flat = kernels.flatten(1)
        assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i))
    for t in (p.sigma1, p.sigma2, p.jpeg_quality1, p.jpeg_quality2, p.poisson_scale1):
        assert len(torch.unique(t)) == 8
    assert p.sigma1.min() >= 1 and p.sigma1.max() <= 30 and p.jpeg_quality2.max() <= 95


def test_identical_images_get_different_degradations():
    """Same image x6, no noise at all: differences can only come from per-sample kernels / JPEG quality."""
    deg = RealESRGANDegradation(noise_range=(0, 0), noise_range2=(0, 0), poisson_scale_range=(0, 0),
                                poisson_scale_range2=(0, 0), round_lr=False)
    hr = hr_batch(1, 64, 64, seed=4).expand(6, 3, 64, 64).contiguous()
    lr = deg(hr, gen(5))["lr"]
    for i in range(6):
        for j in range(i):
            assert (lr[i] - lr[j]).abs().mean() > 1e-3
    # control: with every per-sample range collapsed, all samples come out the same
    flat = RealESRGANDegradation(noise_range=(0, 0), noise_range2=(0, 0), poisson_scale_range=(0, 0),
                                 poisson_scale_range2=(0, 0), round_lr=False, kernel_list=["iso"], kernel_prob=[1.0],
                                 sinc_prob=0, sinc_prob2=0, blur_sigma=(0.05, 0.05), blur_sigma2=(0.05, 0.05),
                                 final_sinc_prob=0, jpeg_range=(80, 80), jpeg_range2=(80, 80))
    lr = flat(hr, gen(5))["lr"]
    assert (lr - lr[:1]).abs().max() < 1e-5


def test_per_sample_flag_draws_batch_choices_per_sample():
    deg = RealESRGANDegradation(per_sample=True)
    p = deg.sample_params(16, gen(6))
    assert len(p.choices) == 16
    assert len({c.resize1 for c in p.choices}) > 4 and len({c.mode_final for c in p.choices}) > 1
    assert len({c.gaussian1 for c in p.choices}) == 2


# ---------------------------------------------------------------- order / plumbing with fixed decisions
def _neutral(**kw):
    args = dict(kernel_list=["iso"], kernel_prob=[1.0], sinc_prob=0, sinc_prob2=0, blur_sigma=(0.01, 0.01),
                blur_sigma2=(0.01, 0.01), final_sinc_prob=0, noise_range=(0, 0), noise_range2=(0, 0),
                poisson_scale_range=(0, 0), poisson_scale_range2=(0, 0), jpeg_range=(100, 100),
                jpeg_range2=(100, 100), use_usm=False, usm_target=False, round_lr=False)
    args.update(kw)
    return RealESRGANDegradation(**args)


def _blocky(b=2, h=64, w=64, block=8, seed=9):
    small = torch.rand(b, 3, h // block, w // block, generator=gen(seed))
    return small.repeat_interleave(block, -2).repeat_interleave(block, -1)


def _choice(**kw):
    c = dict(no_degradation=False, resize1=1.0, mode1="area", gaussian1=True, second_blur=True, resize2=1.0,
             mode2="area", gaussian2=False, resize_first=True, mode_final="bicubic")
    c.update(kw)
    return StageChoice(**c)


def test_neutral_pipeline_is_a_plain_resize():
    """Identity blur/noise/JPEG: the LR must be the step-6 area resize of the HR (resize to H/4 happens there)."""
    deg = _neutral()
    hr = _blocky()
    for resize_first in (True, False):
        p = deg.sample_params(2, gen(10))
        p = replace(p, choices=(_choice(resize_first=resize_first),))
        lr = deg.degrade(hr, p, gen(11))["lr"]
        assert torch.allclose(lr, F.interpolate(hr, size=(16, 16), mode="area"), atol=1e-4)
    # resize2 = 0.5 (to 8x8), JPEG, then the final resize to H/4 with mode_final. 16-px blocks stay 2x2 blocks at
    # 8x8, so JPEG(100) is lossless there and the result is exactly the two resizes.
    hr16 = _blocky(block=16)
    p = replace(deg.sample_params(2, gen(12)), choices=(_choice(resize2=0.5, resize_first=False, mode_final="bilinear"),))
    lr = deg.degrade(hr16, p, gen(13))["lr"]
    ref = F.interpolate(F.interpolate(hr16, size=(8, 8), mode="area"), size=(16, 16), mode="bilinear")
    assert lr.shape == (2, 3, 16, 16)
    assert torch.allclose(lr, ref, atol=1e-4)


def test_finalize_rounding_and_upsampling():
    hr = _blocky()
    ref = F.interpolate(hr, size=(16, 16), mode="area")
    deg = _neutral(round_lr=True, resize_lr_to_hr=True)
    p = replace(deg.sample_params(2, gen(14)), choices=(_choice(),))
    lr = deg.degrade(hr, p, gen(15))["lr"]
    expected = torch.round(torch.clamp(F.interpolate(ref, size=(64, 64), mode="bicubic"), 0, 1) * 255) / 255
    assert lr.shape == hr.shape and (lr - expected).abs().max() <= 1 / 255 + 1e-6


def test_usm_input_and_target_switches():
    hr = hr_batch(2)
    sharp = usm_sharp(hr)
    assert torch.equal(RealESRGANDegradation(usm_target=False)(hr, gen(0))["hr"], hr)
    assert torch.allclose(RealESRGANDegradation(usm_target=True)(hr, gen(0))["hr"], sharp)
    a = RealESRGANDegradation(use_usm=True, usm_target=False)(hr, gen(1))["lr"]
    b = RealESRGANDegradation(use_usm=False, usm_target=False)(hr, gen(1))["lr"]
    assert not torch.equal(a, b)  # same draws, different degradation input


def test_no_degradation_branch():
    hr = hr_batch(2)
    out = RealESRGANDegradation(no_degradation_prob=1.0, resize_lr_to_hr=True, round_lr=False)(hr, gen(0))
    assert torch.equal(out["lr"], out["hr"])
    out = RealESRGANDegradation(no_degradation_prob=1.0, per_sample=True)(hr, gen(0))
    ref = torch.round(torch.clamp(F.interpolate(out["hr"], size=(16, 16), mode="bicubic", antialias=True), 0, 1) * 255) / 255
    assert torch.equal(out["lr"], ref)


def test_bicubic_degradation():
    hr = hr_batch(2)
    out = BicubicDegradation()(hr, gen(0))
    assert torch.equal(out["hr"], hr)
    assert torch.allclose(out["lr"], torch.clamp(F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True), 0, 1))
    up = BicubicDegradation(scale=2, resize_lr_to_hr=True, round_lr=True)(hr)["lr"]
    assert up.shape == hr.shape and torch.equal(up * 255, torch.round(up * 255))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_and_is_deterministic():
    deg = RealESRGANDegradation().cuda()
    hr = hr_batch().cuda()
    g = lambda s: torch.Generator(device="cuda").manual_seed(s)  # noqa: E731
    a, b = deg(hr, g(3)), deg(hr, g(3))
    assert a["lr"].device.type == "cuda" and torch.equal(a["lr"], b["lr"])


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(sinc_prob=1.5), "sinc_prob"),
        (dict(gray_noise_prob2=-0.1), "gray_noise_prob2"),
        (dict(kernel_prob=[0.5, 0.2, 0.1, 0.1, 0.05, 0.0]), "kernel_prob"),
        (dict(kernel_list=["iso", "box"], kernel_prob=[0.5, 0.5]), "kernel_list"),
        (dict(kernel_list=["iso"]), "kernel_prob"),  # length mismatch with default probs
        (dict(resize_prob=[0.5, 0.5]), "resize_prob"),
        (dict(resize_prob2=[0.5, 0.6, -0.1]), "resize_prob2"),
        (dict(noise_range=[30, 1]), "noise_range"),
        (dict(resize_range=[1.2, 1.5]), "resize_range"),
        (dict(blur_sigma=[0.0, 1.0]), "blur_sigma"),
        (dict(betag_range2=[1.5, 4.0]), "betag_range2"),
        (dict(jpeg_range=[0, 90]), "jpeg_range"),
        (dict(jpeg_range2=[30, 120]), "jpeg_range2"),
        (dict(scale=0), "scale"),
        (dict(scale=2.5), "scale"),
        (dict(no_degradation_prob=2), "no_degradation_prob"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        RealESRGANDegradation(**kwargs)


def test_invalid_inputs():
    deg = RealESRGANDegradation()
    with pytest.raises(ValueError, match="divisible"):
        deg(torch.rand(1, 3, 62, 64), gen(0))
    with pytest.raises(ValueError, match="hr"):
        deg(torch.rand(1, 1, 64, 64), gen(0))
    with pytest.raises(ValueError, match="divisible"):
        BicubicDegradation(scale=3)(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="scale"):
        BicubicDegradation(scale=0)

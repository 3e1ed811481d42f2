"""degradation=compose: the YAML pipeline language (sr_lab/degradation/compose.py, ops.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.degradation import ComposeDegradation, RealESRGANDegradation
from sr_lab.degradation.compose import ComposeParams, Draw
from sr_lab.train import CONF_DIR


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _deg(name: str, **edit):
    cfg = _cfg(f"degradation={name}")
    node = OmegaConf.to_container(cfg.degradation, resolve=True)
    node.update(edit)
    return instantiate(node)


def _hr(b=4, s=64, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# realesrgan_compose == realesrgan given the same draws
# ------------------------------------------------------------------------------------------------
def _plain(gate=True, decision=None, values=None, children=None, per_sample=False):
    return Draw(per_sample, gate, decision or {}, values or {}, children or [])


def _from_realesrgan(p, per_sample: bool = False) -> ComposeParams:
    """Real-ESRGAN's draws (DegradationParams) written as realesrgan_compose's draws."""
    cs = p.choices

    def dec(f):  # one decision per batch, or per sample
        return [f(c) for c in cs] if per_sample else f(cs[0])

    def node(decision=None, values=None, children=None, gate=True):
        g = [gate(c) for c in cs] if (per_sample and callable(gate)) else (gate(cs[0]) if callable(gate) else gate)
        if per_sample and not callable(gate):
            g = [gate] * len(cs)
        return _plain(g, dec(decision) if decision else ([{}] * len(cs) if per_sample else {}), values, children,
                      per_sample)

    def noise(sigma, gray, scale):
        return [[_plain(values={"sigma": sigma, "gray": gray})], [_plain(values={"scale": scale, "gray": gray})]]

    draws = [
        _plain(),  # usm
        _plain(values={"kernel": p.kernel1, "kernel_params": p.kernel1_params}),
        node(lambda c: {"scale": c.resize1, "mode": c.mode1}),
        node(lambda c: {"branch": 0 if c.gaussian1 else 1}, children=noise(p.sigma1, p.gray1, p.poisson_scale1)),
        _plain(values={"quality": p.jpeg_quality1}),
        node(values={"kernel": p.kernel2, "kernel_params": p.kernel2_params}, gate=lambda c: c.second_blur),
        node(lambda c: {"scale": c.resize2, "mode": c.mode2}),
        node(lambda c: {"branch": 0 if c.gaussian2 else 1}, children=noise(p.sigma2, p.gray2, p.poisson_scale2)),
        node(lambda c: {"order": [0, 1] if c.resize_first else [1, 0]}, children=[
            [node(lambda c: {"scale": 1.0, "mode": c.mode_final}),
             _plain(values={"kernel": p.sinc_kernel, "sinc_params": p.sinc_params})],
            [_plain(values={"quality": p.jpeg_quality2})],
        ]),
    ]
    return ComposeParams(no_degradation=cs[0].no_degradation, draws=draws)


def _per_sample_compose():
    cfg = OmegaConf.to_container(_cfg("degradation=realesrgan_compose").degradation, resolve=True)

    def walk(x):
        if isinstance(x, dict):
            if x.get("per") == "batch":
                x["per"] = "sample"
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(cfg["steps"])
    return instantiate(cfg)


@pytest.mark.parametrize("seed", range(10))
def test_realesrgan_compose_equals_realesrgan_given_the_same_draws(seed):
    ref = _deg("realesrgan")
    comp = _deg("realesrgan_compose")
    hr = _hr(3, 64, seed)
    params = ref.sample_params(3, torch.Generator().manual_seed(100 + seed))
    want = ref.degrade(hr, params, torch.Generator().manual_seed(7))
    got = comp.degrade(hr, _from_realesrgan(params), torch.Generator().manual_seed(7))
    assert torch.equal(got["hr"], want["hr"])
    assert torch.equal(got["lr"], want["lr"])


def test_the_equality_covers_every_branch_of_realesrgan():
    """The seeds above reach both noise types in both orders, both final orders and both second-blur states."""
    ref = _deg("realesrgan")
    seen = set()
    for seed in range(10):
        c = ref.sample_params(3, torch.Generator().manual_seed(100 + seed)).choices[0]
        seen |= {("g1", c.gaussian1), ("g2", c.gaussian2), ("first", c.resize_first), ("blur2", c.second_blur),
                 ("up1", c.resize1 > 1), ("down1", c.resize1 < 1)}
    assert len(seen) == 12


@pytest.mark.parametrize("seed", range(3))
def test_per_sample_variant_equals_realesrgan_per_sample(seed):
    ref = RealESRGANDegradation(scale=4, per_sample=True)
    comp = _per_sample_compose()
    assert comp.sample_wise  # per-sample resizes: the pipeline runs sample by sample, as the reference
    hr = _hr(3, 64, seed)
    params = ref.sample_params(3, torch.Generator().manual_seed(200 + seed))
    want = ref.degrade(hr, params, torch.Generator().manual_seed(9))
    got = comp.degrade(hr, _from_realesrgan(params, per_sample=True), torch.Generator().manual_seed(9))
    assert torch.equal(got["lr"], want["lr"])


def test_realesrgan_compose_independent_draws_match_realesrgan_distribution():
    """Own draws: LR statistics over 96 images follow the same distributions (two-sample KS, p > 0.01)."""
    from scipy.stats import ks_2samp

    ref, comp = _deg("realesrgan"), _deg("realesrgan_compose")

    def stats(deg, salt):
        rows = []
        for k in range(24):
            hr = _hr(4, 64, 1000 + k)
            lr = deg(hr, torch.Generator().manual_seed(salt + k))["lr"]
            lap = (lr[..., 1:-1, 1:-1] * 4 - lr[..., :-2, 1:-1] - lr[..., 2:, 1:-1] - lr[..., 1:-1, :-2]
                   - lr[..., 1:-1, 2:]).abs().mean(dim=(1, 2, 3))
            down = torch.nn.functional.interpolate(hr, size=lr.shape[-2:], mode="area")
            rows.append(torch.stack([lr.std(dim=(1, 2, 3)), lap, (lr - down).abs().mean(dim=(1, 2, 3))], 1))
        return torch.cat(rows).T

    a, b = stats(ref, 0), stats(comp, 50_000)
    for name, x, y in zip(("std", "laplacian", "error vs area-downscale"), a, b):
        p = ks_2samp(x.numpy(), y.numpy()).pvalue
        assert p > 0.01, f"{name}: KS p={p:.4f}"
    # and the two are not trivially the same stream
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# determinism, variety, sub-batching
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["realesrgan_compose", "realesrgan_motion", "compose"])
def test_same_seed_same_lr_and_per_sample_variety(name):
    deg = _deg(name)
    hr = _hr(4, 64, 3).expand(4, -1, -1, -1).contiguous() * 0 + _hr(1, 64, 3)  # one image, four times
    a = deg(hr, torch.Generator().manual_seed(5))
    b = deg(hr, torch.Generator().manual_seed(5))
    c = deg(hr, torch.Generator().manual_seed(6))
    assert torch.equal(a["lr"], b["lr"]) and a["lr"].shape == (4, 3, 16, 16)
    assert not torch.equal(a["lr"], c["lr"])
    lr = a["lr"]
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    assert torch.equal(torch.round(lr * 255) / 255, lr)  # round_lr
    # same image, per-sample draws: the four LRs differ
    assert len({tuple(x.flatten()[:64].tolist()) for x in lr}) == 4


def _one(op_spec, **top):
    steps = [op_spec, {"op": "resize", "relative_to": "lr", "modes": ["area"]}]
    return ComposeDegradation(steps=steps, scale=4, **top)


def test_per_sample_gate_runs_only_the_chosen_samples():
    deg = _one({"op": "gaussian_noise", "p": 0.5, "sigma": [20, 20], "gray_prob": 0.0}, round_lr=False)
    hr = _hr(8, 32, 1)
    params = deg.sample_params(8, torch.Generator().manual_seed(3))
    gate = params.draws[0].gate
    assert isinstance(gate, list) and 0 < sum(gate) < 8
    out = deg.degrade(hr, params, torch.Generator().manual_seed(3))["lr"]
    plain = torch.nn.functional.interpolate(hr, size=(8, 8), mode="area")
    for i, gi in enumerate(gate):
        same = torch.allclose(out[i], torch.clamp(plain[i], 0, 1))
        assert same != gi


def test_per_sample_one_of_groups_samples_by_branch():
    steps = [{"op": "one_of", "probs": [0.5, 0.5], "steps": [{"op": "brightness", "delta": [0.3, 0.3]},
                                                              {"op": "brightness", "delta": [-0.3, -0.3]}]},
             {"op": "resize", "relative_to": "lr", "modes": ["area"]}]
    deg = ComposeDegradation(steps=steps, scale=2, round_lr=False)
    assert not deg.sample_wise
    hr = torch.full((6, 3, 8, 8), 0.5)
    params = deg.sample_params(6, torch.Generator().manual_seed(0))
    out = deg.degrade(hr, params, torch.Generator())["lr"]
    for i, d in enumerate(params.draws[0].decision):
        want = 0.8 if d["branch"] == 0 else 0.2
        assert torch.allclose(out[i], torch.full_like(out[i], want), atol=1e-6)


def test_repeat_draws_independently_and_sequence_under_p():
    steps = [{"op": "repeat", "times": 2, "steps": [{"op": "brightness", "delta": [-0.2, 0.2]}]},
             {"op": "sequence", "p": 0.0, "steps": [{"op": "brightness", "delta": [0.5, 0.5]}]},
             {"op": "resize", "relative_to": "lr", "modes": ["area"]}]
    deg = ComposeDegradation(steps=steps, scale=2, round_lr=False)
    hr = torch.full((3, 3, 8, 8), 0.5)
    params = deg.sample_params(3, torch.Generator().manual_seed(0))
    r1, r2 = (params.draws[0].children[k][0].values["delta"] for k in (0, 1))
    assert not torch.equal(r1, r2)
    out = deg.degrade(hr, params, torch.Generator())["lr"]
    want = torch.clamp(torch.clamp(0.5 + r1, 0, 1) + r2, 0, 1)
    assert torch.allclose(out[:, 0, 0, 0], want, atol=1e-6)


def test_shuffle_order_follows_the_uniform_and_describe_reports_it():
    deg = _deg("realesrgan_compose")
    orders = set()
    for s in range(12):
        p = deg.sample_params(2, torch.Generator().manual_seed(s))
        d = deg.describe(p)
        assert len(d) == 2
        orders.add(tuple(d[0]["steps"][-1]["order"]))
    assert orders == {(0, 1), (1, 0)}


def test_hydra_presets_instantiate_and_run_on_the_data_module_path():
    from sr_lab.data.datamodule import SRDataModule

    cfg = _cfg("experiment=ccsr_stage1", "degradation=realesrgan_motion")
    validate_config(cfg)
    deg = instantiate(cfg.degradation)
    assert isinstance(deg, ComposeDegradation)
    assert SRDataModule is not None


# ------------------------------------------------------------------------------------------------
# validation: one line naming the step index and key, before any model is built
# ------------------------------------------------------------------------------------------------
BASE = [{"op": "blur"}, {"op": "resize", "relative_to": "lr"}]


@pytest.mark.parametrize("edit, where", [
    (lambda s: s[0].update(op="blurr"), "degradation.steps[0].op: unknown op 'blurr'"),
    (lambda s: s[0].update(p=1.5), "degradation.steps[0].p: a probability must be a number in [0, 1], got 1.5"),
    (lambda s: s[0].update(p=-0.1), "degradation.steps[0].p:"),
    (lambda s: s[0].update(blur_sigma=[3.0, 0.2]), "degradation.steps[0].blur_sigma: inverted range"),
    (lambda s: s[0].update(blur_sigma=[]), "degradation.steps[0].blur_sigma: expected a range [lo, hi], got an empty"),
    (lambda s: s[0].update(sigmaa=1), "degradation.steps[0].sigmaa: unknown key for op blur"),
    (lambda s: s[0].update(per="image"), "degradation.steps[0].per: must be one of"),
    (lambda s: s.insert(1, {"op": "one_of", "probs": [0.6, 0.6], "steps": [{"op": "clamp"}, {"op": "clamp"}]}),
     "degradation.steps[1].probs: probabilities must sum to 1"),
    (lambda s: s.insert(1, {"op": "one_of", "steps": [{"op": "jpeg", "quality": [0, 90]}]}),
     "degradation.steps[1].steps[0][0].quality: lo must be > 0"),
    (lambda s: s.insert(1, {"op": "shuffle", "groups": [[{"op": "clamp"}], [{"op": "gamma", "gamma": [2, 1]}]]}),
     "degradation.steps[1].groups[1][0].gamma: inverted range"),
    (lambda s: s.pop(), "degradation.steps: the pipeline must end at the LR size"),
    (lambda s: s.insert(0, {"op": "clamp"}) or s.insert(1, {"op": "usm"}), "degradation.steps[1].target: a usm step"),
    (lambda s: s.append({"op": "repeat", "times": 0, "steps": [{"op": "clamp"}]}), "degradation.steps[2].times:"),
])
def test_config_errors_name_step_and_key(edit, where):
    steps = copy.deepcopy(BASE)
    edit(steps)
    with pytest.raises(ValueError) as e:
        ComposeDegradation(steps=steps, scale=4)
    assert str(e.value).startswith(where), str(e.value)
    assert "\n" not in str(e.value)


def test_step_that_cannot_apply_to_the_size_is_a_config_error_before_any_model():
    cfg = _cfg("experiment=ccsr_stage1", "degradation=compose", "data.crop_size=64")
    validate_config(cfg)  # the example pipeline fits 64-px crops
    steps = OmegaConf.to_container(cfg.degradation.steps)
    steps.insert(3, {"op": "motion_blur", "length": [31, 41]})  # after the resize to 16 px
    cfg.degradation.steps = steps
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert msg.startswith("degradation.steps[3].length: needs images of at least 21 px"), msg
    assert "16 px" in msg


def test_validation_uses_the_smallest_size_a_random_resize_can_reach():
    steps = [{"op": "resize", "per": "batch", "scale_prob": [0, 1, 0], "scale_range": [0.25, 1.0]},
             {"op": "gaussian_blur", "sigma": [1.0, 3.0]},  # needs 10 px; 64 * 0.25 = 16 ok, 32 * 0.25 = 8 not
             {"op": "resize", "relative_to": "lr"}]
    ComposeDegradation(steps=steps, scale=4, crop_size=64)
    with pytest.raises(ValueError, match=r"steps\[1\]\.sigma: needs images of at least 10 px.*as small as 8 px"):
        ComposeDegradation(steps=steps, scale=4, crop_size=32)


def test_every_op_runs_in_a_pipeline_and_keeps_range():
    from sr_lab.degradation.ops import OPS

    hr = _hr(2, 32, 4)
    for name in sorted(OPS):
        if name in ("resize",):
            continue
        steps = [{"op": name}, {"op": "resize", "relative_to": "lr"}]
        deg = ComposeDegradation(steps=steps, scale=2)
        out = deg(hr, torch.Generator().manual_seed(0))
        assert out["lr"].shape == (2, 3, 16, 16), name
        assert float(out["lr"].min()) >= 0 and float(out["lr"].max()) <= 1, name


def test_sr_make_testset_with_a_composed_degradation(tmp_path):
    import json

    from sr_lab.eval.testset import make_testset

    out = tmp_path / "set"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("testset", overrides=[f"out_dir={out}", f"paths.output_dir={out}", "crop_size=64",
                                            "crop=center", "max_images=2", "device=cpu",
                                            "degradation=realesrgan_motion"])
    make_testset(cfg)
    man = json.loads((out / "manifest.json").read_text())
    assert man["degradation"]["_target_"] == "sr_lab.degradation.ComposeDegradation"
    pair = man["pairs"][0]
    assert pair["lr_size"] == [16, 16]
    steps = pair["drawn"]["trace"]["steps"]
    assert steps[0]["op"] == "usm" and steps[1]["op"] == "one_of" and steps[-1]["op"] == "shuffle"
    assert len(list((out / "LR").glob("*.png"))) == 2


@pytest.mark.parametrize("name", ["brightness", "contrast", "gamma", "saturation"])
def test_colour_ops_accept_the_overshoot_of_a_bicubic_resize(name):
    """A bicubic resize leaves values slightly outside [0, 1]; colour ops must not turn them into NaN."""
    x = torch.tensor([-0.08, 0.0, 0.5, 1.07]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    deg = ComposeDegradation(steps=[{"op": name}], scale=1, round_lr=False)
    out = deg.pipeline.nodes[0].op.apply(x, {}, deg.pipeline.nodes[0].op.draw(1, torch.Generator()), None, None)
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1

"""Schedules, respacing and samplers against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from sr_lab.diffusion.samplers import ccsr_truncated, ddpm_spaced
from sr_lab.diffusion.schedule import eps_from_x0, q_sample, x0_from_eps
from sr_lab.diffusion.timesteps import CCSRNonUniformTimesteps, UniformTimesteps, space_timesteps


def sd_alphas_cumprod(T=1000, b0=0.00085, b1=0.012):
    betas = np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float64) ** 2  # "scaled_linear"
    return np.cumprod(1 - betas)


def test_tiny_backbone_uses_sd_schedule(tiny_backbone):
    ref = sd_alphas_cumprod()
    assert np.allclose(tiny_backbone.alphas_cumprod.numpy(), ref, rtol=1e-6)


def test_q_sample_and_inversions_by_hand():
    abar = torch.tensor(sd_alphas_cumprod())
    x0 = torch.tensor([[0.5, -1.0]]).reshape(2, 1)
    noise = torch.tensor([[0.3], [2.0]])
    t = torch.tensor([10, 900])
    xt = q_sample(abar, x0, t, noise)
    for i, ti in enumerate([10, 900]):
        a = float(abar[ti])
        assert float(xt[i]) == pytest.approx(math.sqrt(a) * float(x0[i]) + math.sqrt(1 - a) * float(noise[i]), rel=1e-6)
    assert torch.allclose(x0_from_eps(abar, xt, t, noise), x0, atol=1e-5)
    assert torch.allclose(eps_from_x0(abar, xt, t, x0), noise, atol=1e-4)


def test_space_timesteps_matches_hand_values():
    ts = space_timesteps(1000, 45)
    assert len(ts) == 45 and ts[0] == 0 and ts[-1] == 999
    stride = 999 / 44
    # accumulated float stride, rounded (IDDPM respacing)
    cur, ref = 0.0, []
    for _ in range(45):
        ref.append(round(cur))
        cur += stride
    assert ts == ref
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_ccsr_truncated_timesteps_T1000_45_steps():
    t_T, t_start, ts = ccsr_truncated.truncated_timesteps(1000, 45, 0.6667, 0.3333)
    kept = [round(i * 999 / 44) for i in range(45)]
    assert t_T == 999
    # re-noise to kept index round(44 * 2/3) = 29; executed kept indices 29 .. 15 (15 steps)
    assert t_start == kept[29] == 658
    assert ts == [658, 636, 613, 590, 568, 545, 522, 499, 477, 454, 431, 409, 386, 363, 341]
    assert len(ts) == 15 and ts[-1] == kept[15]


@pytest.mark.parametrize("t_max,t_min", [(0.5, 0.5), (0.3, 0.6), (1.2, 0.1)])
def test_ccsr_truncated_rejects_bad_fractions(t_max, t_min):
    with pytest.raises(ValueError):
        ccsr_truncated.truncated_timesteps(1000, 45, t_max, t_min)


def test_training_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = UniformTimesteps(1000).sample(20000, g, torch.device("cpu"))
    assert u.min() >= 0 and u.max() <= 999 and u.max() > 990
    s = CCSRNonUniformTimesteps(1000, 0.6667, 0.3333)
    assert (s.t_max_step, s.anchor_T) == (667, 999)
    v = s.sample(20000, g, torch.device("cpu"))
    assert v.min() >= 0 and v.max() == 666
    with pytest.raises(ValueError, match="t_min"):
        CCSRNonUniformTimesteps(1000, 0.3, 0.5)


def test_posterior_step_by_hand():
    x_t, x0, n = torch.tensor(1.2), torch.tensor(-0.4), torch.tensor(0.7)
    at, as_ = 0.3, 0.6
    beta = 1 - at / as_
    mean = math.sqrt(as_) * beta / (1 - at) * -0.4 + math.sqrt(1 - beta) * (1 - as_) / (1 - at) * 1.2
    var = (1 - as_) / (1 - at) * beta
    got = ddpm_spaced.posterior_step(x_t, x0, at, as_, n)
    assert float(got) == pytest.approx(mean + math.sqrt(var) * 0.7, rel=1e-6)


def test_ddpm_with_oracle_model_recovers_x0():
    """With the exact eps of a known x0, every x̂0 equals x0, so the sampler must return x0."""
    abar = torch.tensor(sd_alphas_cumprod())
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, t, cond):
        return eps_from_x0(abar, x, t, target)

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    out = ddpm_spaced.sample(oracle, noise, {}, abar, generator=g, steps=20)
    assert torch.allclose(out, target, atol=1e-4)
    seen = []
    ccsr_truncated.sample(oracle, noise, {}, abar, generator=g, callback=lambda t, x0: seen.append(t))
    assert seen == [999, 658, 636, 613, 590, 568, 545, 522, 499, 477, 454, 431, 409, 386, 363, 341]


def test_samplers_deterministic_under_seed():
    abar = torch.tensor(sd_alphas_cumprod())

    def model(x, t, cond):
        return 0.5 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, 4, 8, 8, generator=g)
        return ccsr_truncated.sample(model, noise, {}, abar, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))

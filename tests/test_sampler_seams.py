"""Samplers as timestep list + step rule + hook (sr_lab/diffusion/samplers/loop.py): exact model calls,
the re-noise rule by hand, CCSR's truncated lists (Table 5 counts, the authors' chain), hooks."""
import math
from functools import partial

import numpy as np
import pytest
import torch

from sr_lab.diffusion.hooks import LSAHook, PSRHook
from sr_lab.diffusion.samplers import ccsr_truncated, ddim, ddpm_spaced, renoise, sampler_timesteps
from sr_lab.diffusion.samplers.loop import compose_hooks, run_steps
from sr_lab.diffusion.samplers.steps import ddpm_posterior
from sr_lab.diffusion.schedule import eps_from_x0
from sr_lab.diffusion.timesteps import space_timesteps
from sr_lab.eval.inference import executed_steps, model_calls


def abar_sd(T=1000):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas))


class Spy:
    """A model that records every timestep it is called at."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append(int(t[0]))
        return 0.3 * x + 0.01


def test_space_timesteps_one_step_is_T_minus_1():
    assert space_timesteps(1000, 1) == [999]
    assert space_timesteps(10, 2) == [0, 9]


@pytest.mark.parametrize("sample,knobs", [(ddpm_spaced.sample, {"steps": 1}), (ddim.sample, {"steps": 1}),
                                          (renoise.sample, {"steps": 1}), (renoise.sample, {"first": 1})])
def test_one_step_sampler_calls_the_model_once_at_T_minus_1_and_returns_x0(sample, knobs):
    abar, spy = abar_sd(), Spy()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(spy, x, {}, abar, generator=torch.Generator().manual_seed(1), **knobs)
    assert spy.calls == [999]
    a = float(abar[999])
    want = (x - math.sqrt(1 - a) * (0.3 * x + 0.01)) / math.sqrt(a)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sample", [ddpm_spaced.sample, ddim.sample, renoise.sample, ccsr_truncated.sample])
def test_explicit_list_is_exactly_the_model_calls(sample):
    abar, spy = abar_sd(), Spy()
    ts = [999, 749, 499, 249]
    sample(spy, torch.randn(1, 4, 4, 4), {}, abar, generator=torch.Generator().manual_seed(0), timesteps=ts)
    assert spy.calls == ts
    assert sampler_timesteps(partial(sample, timesteps=ts), 1000) == ts


def test_addsr_default_list_and_first_k():
    assert renoise.timesteps(1000) == [999, 749, 499, 249]
    assert renoise.timesteps(1000, first=2) == [999, 749]
    assert sampler_timesteps({"_target_": "sr_lab.diffusion.samplers.renoise.sample", "steps": 4, "first": 3},
                             1000) == [999, 749, 499]
    with pytest.raises(ValueError, match="descending"):
        renoise.timesteps(1000, timesteps=[249, 999])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        renoise.timesteps(1000, timesteps=[1000, 5])


def test_renoise_rule_by_hand():
    """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) z with a fresh z; the 2-step chain by hand."""
    abar = abar_sd()
    target = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(6))

    def model(x, t, cond):  # eps of the point (x - 0.5 * target)
        return eps_from_x0(abar, x, t, 0.5 * target)

    got = renoise.sample(model, x, {}, abar, generator=torch.Generator().manual_seed(7), timesteps=[999, 500])
    g = torch.Generator().manual_seed(7)
    x0 = 0.5 * target
    z = torch.randn(x.shape, generator=g)
    a = torch.tensor(float(abar[500]), dtype=torch.float64).float()
    x500 = a.sqrt() * x0 + (1 - a).sqrt() * z
    t = torch.tensor([500])
    want = (x500 - (1 - a).sqrt() * model(x500, t, {})) / a.sqrt()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, 0.5 * target, atol=1e-4)


def test_ccsr_truncated_lists_and_table5_counts():
    assert ccsr_truncated.timesteps(1000) == [999, 658, 636, 613, 590, 568, 545, 522, 499, 477, 454, 431, 409,
                                              386, 363, 341]
    counts = []
    for t_max, t_min in [(0.5, 0.3333), (0.6667, 0.5), (0.8, 0.3333), (0.6667, 0.2), (0.6667, 0.3333)]:
        cfg = {"_target_": "sr_lab.diffusion.samplers.ccsr_truncated.sample", "grid": 45, "t_max": t_max,
               "t_min": t_min}
        counts.append(executed_steps(cfg, 1000))
        assert model_calls(cfg, 1000) == counts[-1] + 1
    assert counts == [8, 8, 21, 21, 15]  # CCSR Table 5: A1-A4, CCSR


def test_ccsr_authors_chain_for_grid_50():
    cont = ccsr_truncated.timesteps(1000, grid=50)
    auth = ccsr_truncated.timesteps(1000, grid=50, chain="authors")
    assert cont[:3] == [999, 673, 652] and cont[-1] == 347 and len(cont) == 18
    assert auth[:2] == [999, 652] and auth[-1] == 347 and len(auth) == 17
    # the authors' chain re-noises to 673 but evaluates at 652 next
    spy = Spy()
    abar = abar_sd()
    seen = []
    ccsr_truncated.sample(spy, torch.zeros(1, 4, 2, 2), {}, abar, generator=torch.Generator().manual_seed(0),
                          grid=50, chain="authors", hook=lambda i, n, t, x, x0, c: (seen.append(x.clone()), (x, c))[1])
    assert spy.calls == auth
    # x after step 0 is x0_hat re-noised to 673 (not 652): check against the renoise formula
    g = torch.Generator().manual_seed(0)
    x0 = (torch.zeros(1, 4, 2, 2) - math.sqrt(1 - float(abar[999])) * 0.01) / math.sqrt(float(abar[999]))
    a = torch.tensor(float(abar[673]), dtype=torch.float64).float()
    assert torch.allclose(seen[0], a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(1, 4, 2, 2, generator=g), atol=1e-6)
    # identical chains where the index rules agree
    assert ccsr_truncated.timesteps(1000, chain="authors") == ccsr_truncated.timesteps(1000)


def test_ccsr_steps_is_a_deprecated_alias_of_grid(caplog, monkeypatch):
    monkeypatch.setattr(ccsr_truncated, "_WARNED_STEPS", set())
    assert ccsr_truncated.timesteps(1000, steps=50) == ccsr_truncated.timesteps(1000, grid=50)
    assert ccsr_truncated.timesteps(1000, steps=50) == ccsr_truncated.timesteps(1000, grid=50)
    assert caplog.text.count("renamed sampler.grid") == 1  # once, not at every sampling call
    with pytest.raises(ValueError, match="contradicts"):
        ccsr_truncated.timesteps(1000, grid=30, steps=50)


def test_oracle_model_every_x0_hat_is_the_target():
    abar = abar_sd()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, t, cond):
        return eps_from_x0(abar, x, t, target)

    for sample, knobs in [(ddpm_spaced.sample, {"steps": 20}), (ddim.sample, {"steps": 10, "eta": 1.0}),
                          (ccsr_truncated.sample, {}), (renoise.sample, {})]:
        x0s = []
        out = sample(oracle, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), {}, abar,
                     generator=torch.Generator().manual_seed(3), callback=lambda t, x0: x0s.append(x0), **knobs)
        assert len(x0s) == len(sampler_timesteps(partial(sample, **knobs), 1000))
        assert all(torch.allclose(x0, target, atol=2e-3) for x0 in x0s), sample
        assert torch.allclose(out, target, atol=2e-3)


def test_hook_rewrites_latent_and_condition_like_a_hand_loop():
    """run_steps with a hook == the same loop written out by hand."""
    abar = abar_sd()
    ts = [999, 600, 300, 0]

    def model(x, t, cond):
        return 0.2 * x + cond["c"]

    def hook(i, n, t, x_next, x0, cond):
        return 0.9 * x_next + 0.1, {"c": cond["c"] + 0.01 * x0.mean()}

    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    got = run_steps(model, x, {"c": torch.tensor(0.05)}, abar, ts, ddpm_posterior,
                    generator=torch.Generator().manual_seed(9), hook=[hook])
    g = torch.Generator().manual_seed(9)
    a = abar.tolist()
    c = torch.tensor(0.05)
    for i, t in enumerate(ts):
        eps = 0.2 * x + c
        x0 = (x - math.sqrt(1 - a[t]) * eps) / math.sqrt(a[t])
        if i + 1 < len(ts):
            s = ts[i + 1]
            beta = 1 - a[t] / a[s]
            mean = math.sqrt(a[s]) * beta / (1 - a[t]) * x0 + math.sqrt(1 - beta) * (1 - a[s]) / (1 - a[t]) * x
            x = mean + math.sqrt((1 - a[s]) / (1 - a[t]) * beta) * torch.randn(x.shape, generator=g)
        else:
            x = x0
        x, c = 0.9 * x + 0.1, c + 0.01 * x0.mean()
    assert torch.allclose(got, x, atol=1e-5)


def test_hooks_compose_in_order():
    order = []
    h1 = lambda i, n, t, x, x0, c: (order.append(("a", i)), (x + 1, c))[1]  # noqa: E731
    h2 = lambda i, n, t, x, x0, c: (order.append(("b", i)), (x * 2, c))[1]  # noqa: E731
    h = compose_hooks([h1, None, h2])
    x, _ = h(0, 1, 999, torch.tensor(1.0), torch.tensor(0.0), {})
    assert float(x) == 4.0 and order == [("a", 0), ("b", 0)]
    assert compose_hooks([]) is None and compose_hooks(None) is None


def test_lsa_hook_eq3_eq4_at_phase_boundaries():
    """ClearSR Eq. 3 (early) / Eq. 4 (late) with boundaries at 30 % and 80 % of the executed steps."""
    h = LSAHook(alpha=0.1, beta=0.2)
    x, lr = torch.tensor([2.0]), torch.tensor([1.0])
    phases = [h.phase(i, 15) for i in range(15)]
    assert phases == ["early"] * 5 + ["middle"] * 7 + ["late"] * 3
    assert [h.phase(i, 50) for i in (14, 15, 39, 40)] == ["early", "middle", "middle", "late"]
    thirds = LSAHook(early_end=1 / 3, late_start=2 / 3)
    assert [thirds.phase(i, 15) for i in range(15)] == ["early"] * 5 + ["middle"] * 5 + ["late"] * 5
    early, _ = h(0, 15, 999, x, x, {"lr_latent": lr})
    late, _ = h(14, 15, 1, x, x, {"lr_latent": lr})
    mid, _ = h(7, 15, 500, x, x, {"lr_latent": lr})
    assert float(early) == pytest.approx(0.9 * 2 + 0.1 * 1)
    assert float(late) == pytest.approx(1.2 * 2 - 0.2 * 1)
    assert float(mid) == 2.0
    with pytest.raises(ValueError):
        LSAHook(early_end=0.8, late_start=0.5)


def test_psr_hook_calls_refine_except_after_the_last_step():
    seen = []

    def refine(cond, x0, w, space):
        seen.append((w, space))
        return {**cond, "lr_latent": x0}

    h = PSRHook(w=0.5)
    x0 = torch.ones(1)
    _, c = h(0, 4, 999, x0, x0, {"refine": refine, "lr_latent": torch.zeros(1)})
    assert torch.equal(c["lr_latent"], x0) and seen == [(0.5, "latent")]
    _, c2 = h(3, 4, 249, x0, 2 * x0, c)
    assert c2 is c and len(seen) == 1
    with pytest.raises(ValueError):
        PSRHook(w=1.5)

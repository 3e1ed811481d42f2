"""NUTL (CCSR Eq. 3) and the eps loss against values computed by hand on a toy eps-model."""
import math

import numpy as np
import pytest
import torch

from sr_lab.diffusion.timesteps import CCSRNonUniformTimesteps, UniformTimesteps
from sr_lab.losses.diffusion import CCSRNUTL, EpsMSE


def abar_table(T=1000):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
    return torch.tensor(np.cumprod(1 - betas))


class Toy(torch.nn.Module):
    """ε_θ(x, t) = c · x + d (scalars), a model whose losses are easy to write by hand."""

    def __init__(self, c=0.8, d=0.1):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.d = torch.nn.Parameter(torch.tensor(d, dtype=torch.float64))

    def forward(self, x, t, cond):
        return self.c * x + self.d


def test_eps_loss_by_hand():
    abar = abar_table()
    x0 = torch.tensor([[0.2, -0.5], [1.0, 0.3]], dtype=torch.float64).view(2, 1, 1, 2)
    loss = EpsMSE(UniformTimesteps(1000))
    toy = Toy()
    got = loss.eps_part(toy, x0, {}, abar, torch.Generator().manual_seed(5))["eps"]
    g = torch.Generator().manual_seed(5)  # same draw order: t, then noise
    t = torch.randint(0, 1000, (2,), generator=g)
    n = torch.randn(x0.shape, generator=g, dtype=torch.float32).double().numpy()
    x, a = x0.numpy(), abar.numpy()[t.numpy()].reshape(2, 1, 1, 1)
    xt = np.sqrt(a) * x + np.sqrt(1 - a) * n
    want = np.mean((0.8 * xt + 0.1 - n) ** 2)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_nutl_anchor_part_by_hand():
    abar = abar_table()
    sched = CCSRNonUniformTimesteps(1000, 0.6667, 0.3333)
    x0 = torch.tensor([0.2, -0.5, 1.0, 0.3, -0.1, 0.6], dtype=torch.float64).view(2, 1, 1, 3)
    toy = Toy()
    got = CCSRNUTL(sched).anchor_part(toy, x0, {}, abar, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # draw order: ε1 (for x_T), ε2 (re-noise to t_max)
    e1 = torch.randn(x0.shape, generator=g).double().numpy()
    e2 = torch.randn(x0.shape, generator=g).double().numpy()
    x = x0.numpy()
    aT, am = float(abar[999]), float(abar[667])
    xT = math.sqrt(aT) * x + math.sqrt(1 - aT) * e1
    x0T = (xT - math.sqrt(1 - aT) * (0.8 * xT + 0.1)) / math.sqrt(aT)
    xm = math.sqrt(am) * x0T + math.sqrt(1 - am) * e2
    epsm = 0.8 * xm + 0.1
    x0m = (xm - math.sqrt(1 - am) * epsm) / math.sqrt(am)
    assert float(got["x0_T"]) == pytest.approx(np.mean((x - x0T) ** 2), rel=1e-5)
    assert float(got["x0_tmax"]) == pytest.approx(np.mean((x - x0m) ** 2), rel=1e-5)
    assert float(got["eps_tmax"]) == pytest.approx(np.mean((e2 - epsm) ** 2), rel=1e-5)


def test_nutl_eps_part_only_below_t_max_and_grad_through_x0T():
    abar = abar_table()
    sched = CCSRNonUniformTimesteps(1000, 0.5, 0.2)
    seen = []

    def spy(x, t, cond):
        seen.append(t.clone())
        return 0.5 * x

    loss = CCSRNUTL(sched)
    for s in range(20):
        loss.eps_part(spy, torch.zeros(8, 1, 2, 2), {}, abar, torch.Generator().manual_seed(s))
    assert torch.cat(seen).max() < 500
    # the anchor part calls the model at T-1 then t_max, and l_tmax depends on ε̂_T (no detach)
    seen.clear()
    toy = Toy()
    out = loss.anchor_part(lambda x, t, c: (seen.append(t.clone()), toy(x, t, c))[1],
                           torch.ones(2, 1, 2, 2, dtype=torch.float64), {}, abar, torch.Generator().manual_seed(0))
    assert [int(t[0]) for t in seen] == [999, 500]
    out["x0_tmax"].backward()
    assert toy.c.grad is not None and toy.c.grad != 0


def test_nutl_needs_ccsr_schedule():
    with pytest.raises(ValueError, match="ccsr_nonuniform"):
        CCSRNUTL(UniformTimesteps(1000))
    assert len(CCSRNUTL(CCSRNonUniformTimesteps()).parts()) == 2
    assert len(EpsMSE(UniformTimesteps()).parts()) == 1

"""Blur kernels of the Real-ESRGAN degradation against independent numpy/scipy closed forms (spec §1.2)."""
import math

import numpy as np
import pytest
import torch
from scipy import special

from sr_lab.degradation import kernels as K


# ---------------------------------------------------------------- independent numpy references
def np_grid(k):
    ax = np.arange(k, dtype=np.float64) - k // 2
    xx, yy = np.meshgrid(ax, ax)  # xx[i, j] = ax[j] (horizontal), yy[i, j] = ax[i]
    return xx, yy


def np_q(k, sx, sy, theta):
    """x^T Sigma^-1 x with Sigma = R diag(sx^2, sy^2) R^T, explicit matrix inverse."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sigma = rot @ np.diag([sx**2, sy**2]) @ rot.T
    inv = np.linalg.inv(sigma)
    xx, yy = np_grid(k)
    xy = np.stack([xx, yy], axis=-1)
    return np.einsum("ijk,kl,ijl->ij", xy, inv, xy)


def np_norm(a):
    return a / a.sum()


def np_gaussian(k, sx, sy, th):
    return np_norm(np.exp(-0.5 * np_q(k, sx, sy, th)))


def np_generalized(k, sx, sy, th, beta):
    return np_norm(np.exp(-0.5 * np_q(k, sx, sy, th) ** beta))


def np_plateau(k, sx, sy, th, beta):
    return np_norm(1.0 / (np_q(k, sx, sy, th) ** beta + 1.0))


def np_sinc(k, omega):
    xx, yy = np_grid(k)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        ker = omega * special.j1(omega * r) / (2 * np.pi * r)
    ker[k // 2, k // 2] = omega**2 / (4 * np.pi)
    return np_norm(ker)


def np_pad21(ker):
    p = (21 - ker.shape[0]) // 2
    return np.pad(ker, ((p, p), (p, p)))


def close(t, a, atol=2e-6, rtol=2e-4):
    np.testing.assert_allclose(t.detach().cpu().double().numpy(), a, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- closed-form single kernels
@pytest.mark.parametrize("k,sx,sy,th", [(7, 0.5, 0.5, 0.0), (15, 2.0, 0.7, 0.5), (21, 3.0, 1.2, -2.4), (9, 1.0, 2.5, 1.3)])
def test_gaussian_kernel_closed_form(k, sx, sy, th):
    ker = K.gaussian_kernel(k, sx, sy, th)
    assert ker.shape == (k, k)
    close(ker, np_gaussian(k, sx, sy, th))
    # isotropic shortcut
    close(K.gaussian_kernel(k, sx), np_gaussian(k, sx, sx, 0.0))


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.7])
def test_generalized_and_plateau_closed_form(beta):
    close(K.generalized_gaussian_kernel(13, 1.7, 0.6, 0.9, beta), np_generalized(13, 1.7, 0.6, 0.9, beta))
    close(K.plateau_kernel(13, 1.7, 0.6, 0.9, beta), np_plateau(13, 1.7, 0.6, 0.9, beta))
    close(K.generalized_gaussian_kernel(11, 1.1, beta=beta), np_generalized(11, 1.1, 1.1, 0.0, beta))


@pytest.mark.parametrize("k,omega", [(7, math.pi / 3), (13, math.pi / 5), (21, 2.9), (11, math.pi)])
def test_sinc_kernel_closed_form(k, omega):
    ker = K.sinc_kernel(k, omega)
    close(ker, np_sinc(k, omega))
    assert abs(float(ker.sum()) - 1) < 1e-5


def test_closed_form_batched_over_parameters():
    sx = torch.tensor([0.5, 1.0, 2.0])
    ker = K.gaussian_kernel(9, sx, sx * 0.5, torch.tensor([0.0, 0.3, -1.0]))
    assert ker.shape == (3, 9, 9)
    close(ker[2], np_gaussian(9, 2.0, 1.0, -1.0))


def test_pulse_kernel():
    p = K.pulse_kernel(21)
    assert p.sum() == 1 and p[10, 10] == 1


# ---------------------------------------------------------------- batched random kernels
def _draw(batch=256, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    defaults = dict(kernel_prob=[1 / 6] * 6, sinc_prob=0.3)
    defaults.update(kw)
    params = K.sample_mixed_kernel_params(batch, g, **defaults)
    return params, K.build_mixed_kernels(params)


def _reference(params, i):
    size = int(params["size"][i])
    if bool(params["is_sinc"][i]):
        return np_pad21(np_sinc(size, float(params["omega"][i])))
    kind = K.KERNEL_TYPES[int(params["kind"][i])]
    sx, sy, th, beta = (float(params[n][i]) for n in ("sigma_x", "sigma_y", "theta", "beta"))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        assert sx == sy and th == 0.0
    if kind in ("iso", "aniso"):
        ref = np_gaussian(size, sx, sy, th)
    elif kind.startswith("generalized"):
        ref = np_generalized(size, sx, sy, th, beta)
    else:
        ref = np_plateau(size, sx, sy, th, beta)
    return np_pad21(ref)


def test_batched_mixed_kernels_match_closed_forms():
    params, kernels = _draw()
    assert kernels.shape == (256, 21, 21)
    for i in range(kernels.shape[0]):
        close(kernels[i], _reference(params, i))
    # every type, sinc and every size occurs
    kinds = set(params["kind"][~params["is_sinc"]].tolist())
    assert kinds == set(range(6))
    assert params["is_sinc"].any() and (~params["is_sinc"]).any()
    assert set(params["size"].tolist()) == set(K.KERNEL_SIZES)


def test_batched_kernels_support_and_normalisation():
    params, kernels = _draw(seed=1)
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(256), atol=1e-5)
    mask = K.support_mask(params["size"])
    assert (kernels[~mask] == 0).all()
    assert (kernels.abs() > 0).sum() > 0


def test_parameter_draw_rules():
    params, _ = _draw(batch=2000, seed=2, blur_sigma=(0.2, 3.0), betag_range=(0.5, 4.0), betap_range=(1.0, 2.0))
    sx, sy = params["sigma_x"], params["sigma_y"]
    assert sx.min() >= 0.2 and sx.max() <= 3.0 and sy.min() >= 0.2 and sy.max() <= 3.0
    assert params["theta"].abs().max() <= math.pi
    kind, beta = params["kind"], params["beta"]
    gen = (kind == 2) | (kind == 3)
    plat = (kind == 4) | (kind == 5)
    bg, bp = beta[gen], beta[plat]
    assert bg.min() >= 0.5 and bg.max() <= 4.0
    assert 0.35 < (bg < 1).float().mean() < 0.65  # 50/50 rule around 1
    assert bp.min() >= 1.0 and bp.max() <= 2.0
    assert 0.35 < (bp == 1.0).float().mean() < 0.65  # U(1, 1) half of the time
    assert (beta[~(gen | plat)] == 1).all()
    sinc = params["is_sinc"]
    small, om = params["size"] < 13, params["omega"]
    assert om[sinc & small].min() >= math.pi / 3 - 1e-6
    assert om[sinc & ~small].min() < math.pi / 3  # larger kernels may go down to pi/5
    assert om.min() >= math.pi / 5 - 1e-6 and om.max() <= math.pi + 1e-6
    assert 0.25 < sinc.float().mean() < 0.35


def test_kernel_prob_is_respected():
    g = torch.Generator().manual_seed(3)
    params = K.sample_mixed_kernel_params(4000, g, kernel_list=["aniso", "plateau_iso"], kernel_prob=[0.8, 0.2], sinc_prob=0.0)
    assert set(params["kind"].tolist()) == {1, 4}
    frac = (params["kind"] == 1).float().mean()
    assert 0.77 < frac < 0.83


def test_final_sinc_kernels():
    g = torch.Generator().manual_seed(4)
    params = K.sample_final_sinc_params(300, g, final_sinc_prob=0.8)
    kernels = K.build_final_sinc_kernels(params)
    assert 0.72 < params["is_sinc"].float().mean() < 0.88
    assert params["omega"].min() >= math.pi / 3 - 1e-6
    pulse = np.zeros((21, 21))
    pulse[10, 10] = 1
    for i in range(300):
        if bool(params["is_sinc"][i]):
            close(kernels[i], np_pad21(np_sinc(int(params["size"][i]), float(params["omega"][i]))))
        else:
            close(kernels[i], pulse)
    # same seed -> same kernels; random_* wrappers agree with sample+build
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(K.random_final_sinc_kernels(8, g1), K.build_final_sinc_kernels(K.sample_final_sinc_params(8, g2)))
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    assert torch.equal(K.random_mixed_kernels(8, g1), K.build_mixed_kernels(K.sample_mixed_kernel_params(8, g2)))

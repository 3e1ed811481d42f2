"""BSRGAN degradation (spec degradation_and_metrics.md §2): each block against an independent
computation (numpy / scipy / OpenCV), the op-order rules, determinism, shapes and ranges."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.stats import multivariate_normal

from sr_lab.degradation.bsrgan import (BSRGANDegradation, BSRGANRandom, _noise_map, add_gaussian_noise,
                                       add_poisson_noise, add_sharpening, anisotropic_gaussian, bsrgan_order,
                                       bsrgan_plus_order, convolve_mirror, degradation_bsrgan, fspecial_gaussian,
                                       jpeg_roundtrip, shift_kernel)
from sr_lab.degradation.resize import area_weights, imresize_matlab, resize_cv2

cv2 = pytest.importorskip("cv2")


def rng(seed=0):
    return BSRGANRandom(torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return torch.from_numpy(data.astronaut()[100:164, 180:244].copy()).permute(2, 0, 1)[None].float() / 255.0


def to_np(x):
    return x[0].permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("size,sigma", [(7, 1.0), (13, 2.3), (25, 0.4)])
def test_fspecial_gaussian_matches_opencv_separable_gaussian(size, sigma):
    g = cv2.getGaussianKernel(size, sigma).astype(np.float64)
    want = g @ g.T
    want[want < np.finfo(np.float64).eps * want.max()] = 0
    want /= want.sum()
    assert np.allclose(fspecial_gaussian(size, sigma).numpy(), want, atol=1e-12)


@pytest.mark.parametrize("size,theta,l1,l2", [(9, 0.3, 2.0, 5.0), (15, 2.5, 7.9, 0.6), (25, 1.1, 4.0, 4.0)])
def test_anisotropic_gaussian_matches_scipy_pdf(size, theta, l1, l2):
    # BSRGAN anisotropic_Gaussian + gm_blur_kernel: Sigma = V diag(l1, l2) V^-1, pdf on a centred grid
    v = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array([1.0, 0.0])
    V = np.array([[v[0], v[1]], [v[1], -v[0]]])
    sigma = V @ np.diag([l1, l2]) @ np.linalg.inv(V)
    c = size / 2.0 + 0.5
    want = np.array([[multivariate_normal.pdf([x - c + 1, y - c + 1], mean=[0, 0], cov=sigma)
                      for x in range(size)] for y in range(size)])
    want /= want.sum()
    assert np.allclose(anisotropic_gaussian(size, theta, l1, l2).numpy(), want, atol=1e-12)


@pytest.mark.parametrize("sf", [2, 3, 4])
def test_shift_kernel_is_bilinear_resampling_at_i_plus_half_sf_minus_one(sf):
    k = np.random.default_rng(sf).random((25, 25))
    s = (sf - 1) * 0.5
    ax = np.arange(25.0)
    pts = np.clip(ax + s, 0, 24)
    yy, xx = np.meshgrid(pts, pts, indexing="ij")
    want = RegularGridInterpolator((ax, ax), k, method="linear")(np.stack([yy, xx], -1))
    assert np.allclose(shift_kernel(torch.from_numpy(k), sf).numpy(), want, atol=1e-12)


def test_convolve_mirror_matches_scipy_ndimage(photo):
    k = np.random.default_rng(1).random((7, 7))  # not symmetric: convolution != correlation
    k /= k.sum()
    out = convolve_mirror(photo.double(), torch.from_numpy(k))
    want = scipy.ndimage.convolve(to_np(photo), k[..., None], mode="mirror")
    assert np.abs(to_np(out) - want).max() < 1e-6


# ------------------------------------------------------------------------------------------------ resizing
@pytest.mark.parametrize("interp,cv", [("linear", cv2.INTER_LINEAR), ("cubic", cv2.INTER_CUBIC), ("area", cv2.INTER_AREA)])
@pytest.mark.parametrize("size", [(23, 37), (16, 16), (101, 77)])
def test_resize_matches_opencv(photo, interp, cv, size):
    img = np.ascontiguousarray(to_np(photo).astype(np.float32))
    want = cv2.resize(img, (size[1], size[0]), interpolation=cv)
    got = to_np(resize_cv2(photo, size, interp))
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-5


def test_area_weights_rows_sum_to_one_and_integer_factor_is_box_average():
    w = area_weights(8, 4)
    assert torch.allclose(w.sum(1), torch.ones(4, dtype=w.dtype))
    assert torch.equal(w[1], torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0], dtype=w.dtype))


def _imresize_matlab_reference(x: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize bicubic with antialiasing, written out per output pixel (1-D, applied twice)."""
    def cubic(t):
        a = abs(t)
        if a <= 1:
            return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
        if a <= 2:
            return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
        return 0.0

    def along(v):  # v: (n, ...) resized along axis 0
        n = v.shape[0]
        out = []
        width = 4 / scale
        for i in range(1, math.ceil(n * scale) + 1):
            u = i / scale + 0.5 * (1 - 1 / scale)
            js = range(math.floor(u - width / 2), math.floor(u - width / 2) + math.ceil(width) + 2)
            wts = np.array([scale * cubic(scale * (u - j)) for j in js])
            # 1-based j -> 0-based index with symmetric (edge-repeating) reflection
            idx = [(-i_ - 1 if i_ < 0 else (2 * n - 1 - i_ if i_ >= n else i_)) for i_ in [j - 1 for j in js]]
            out.append(np.tensordot(wts / wts.sum(), v[idx], axes=1))
        return np.stack(out)

    return np.moveaxis(along(np.moveaxis(along(x), 1, 0)), 0, 1)


def test_imresize_matlab_matches_per_pixel_reference(photo):
    x = to_np(photo)[:30, :22]
    want = _imresize_matlab_reference(x, 0.5)
    got = to_np(imresize_matlab(photo.double()[..., :30, :22], 0.5))
    assert got.shape == (15, 11, 3)
    assert np.abs(got - want).max() < 1e-10
    const = torch.full((1, 3, 20, 20), 0.3, dtype=torch.float64)
    assert torch.allclose(imresize_matlab(const, 0.5), torch.full((1, 3, 10, 10), 0.3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ JPEG, USM, noise
def test_jpeg_roundtrip_is_bit_identical_to_opencv(photo):
    q8 = np.round(to_np(photo) * 255).astype(np.uint8)
    _, enc = cv2.imencode(".jpg", q8[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), 47])
    want = cv2.imdecode(enc, 1)[..., ::-1].astype(np.float64) / 255.0
    got = to_np(jpeg_roundtrip(photo, 47))
    assert np.array_equal(np.round(got * 255), np.round(want * 255))


def test_add_sharpening_matches_opencv_usm(photo):
    img = np.ascontiguousarray(to_np(photo).astype(np.float32))
    blur = cv2.GaussianBlur(img, (51, 51), 0)
    residual = img - blur
    mask = (np.abs(residual) * 255 > 10).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (51, 51), 0)
    want = soft * np.clip(img + 0.5 * residual, 0, 1) + (1 - soft) * img
    assert np.abs(to_np(add_sharpening(photo)) - want).max() < 1e-5


def test_gaussian_noise_branches():
    img = torch.full((1, 3, 96, 96), 0.5)
    color, info = _noise_map(img, 25, rng(1), r=0.7, level=20)
    assert info["kind"] == "color" and color.shape == (1, 3, 96, 96)
    assert float(color.std()) == pytest.approx(20 / 255, rel=0.05)
    gray, info = _noise_map(img, 25, rng(2), r=0.3, level=20)
    assert info["kind"] == "gray" and gray.shape == (1, 1, 96, 96)  # one map, broadcast on RGB
    corr, info = _noise_map(img, 25, rng(3), r=0.5, level=20)
    assert info["kind"] == "correlated"
    cov = np.array(info["cov"])
    u, s, vh = np.linalg.svd(cov)  # numpy multivariate_normal draws with this square root
    want = vh.T @ np.diag(s) @ vh
    got = np.cov(corr[0].reshape(3, -1).double().numpy())
    assert np.allclose(got, want, atol=0.1 * np.abs(want).max())
    out, info = add_gaussian_noise(img, rng(4))
    assert 2 <= info["level"] <= 25 and out.min() >= 0 and out.max() <= 1


def test_poisson_noise_is_unbiased_and_clipped():
    img = torch.full((1, 3, 128, 128), 0.4)
    for seed in range(3):
        out, info = add_poisson_noise(img, rng(seed))
        assert 100 <= info["vals"] <= 10000
        assert out.min() >= 0 and out.max() <= 1
        assert float(out.mean()) == pytest.approx(float(torch.round(img * 255).mean() / 255), abs=3e-3)
        if info["kind"] == "gray":  # the same gray noise on all channels
            assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


# ------------------------------------------------------------------------------------------------ order rules
def test_bsrgan_order_keeps_downsample2_before_downsample3():
    orders = [bsrgan_order(rng(s)) for s in range(200)]
    assert all(sorted(o) == list(range(7)) for o in orders)
    assert all(o.index(2) < o.index(3) for o in orders)
    assert len({tuple(o) for o in orders}) > 50  # really shuffled


def test_bsrgan_plus_order_local_and_full_shuffle():
    for s in range(50):
        o = bsrgan_plus_order(rng(s), shuffle_prob=0.0)
        assert o[:2] == [0, 1] and o[6:9] == [6, 7, 8]
        assert sorted(o[2:6]) == [2, 3, 4, 5] and sorted(o[9:13]) == [9, 10, 11, 12]
    full = [bsrgan_plus_order(rng(s), shuffle_prob=1.0) for s in range(50)]
    assert all(sorted(o) == list(range(13)) for o in full)
    assert any(o[6:9] != [6, 7, 8] for o in full)


# ------------------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("variant", ["bsrgan", "bsrgan_plus"])
def test_pipeline_determinism_shapes_and_ranges(photo, variant):
    deg = BSRGANDegradation(scale=4, variant=variant)
    hr = torch.cat([photo, photo.flip(-1)])
    a = deg(hr, torch.Generator().manual_seed(3))
    traces_a = deg.last_traces
    b = deg(hr, torch.Generator().manual_seed(3))
    assert deg.last_traces == traces_a
    c = deg(hr, torch.Generator().manual_seed(4))
    assert torch.equal(a["lr"], b["lr"]) and not torch.equal(a["lr"], c["lr"])
    assert a["lr"].shape == (2, 3, 16, 16) and a["hr"].shape == (2, 3, 64, 64)
    assert a["lr"].min() >= 0 and a["lr"].max() <= 1
    assert torch.equal(a["lr"], torch.round(a["lr"] * 255) / 255)  # final JPEG: 8-bit values
    assert traces_a[0][-1]["op"] == "jpeg" and traces_a[0][-1]["final"]
    if variant == "bsrgan":
        assert torch.equal(a["hr"], hr)
    else:  # USM-sharpened HR
        assert torch.allclose(a["hr"], add_sharpening(hr))


def test_bsrgan_scale2_branch_and_random_crop(photo):
    seen_scale2 = False
    for s in range(12):
        lq, hq, trace = degradation_bsrgan(photo, 4, rng(s), lq_patchsize=8)
        assert lq.shape == (1, 3, 8, 8) and hq.shape == (1, 3, 32, 32)
        seen_scale2 |= trace[0]["op"] == "downsample1"
        ops = [t["op"] for t in trace]
        assert ops.index("downsample2") < ops.index("downsample3")
    assert seen_scale2  # prob 0.25 per image
    with pytest.raises(ValueError, match="too small"):
        degradation_bsrgan(photo, 4, rng(0), lq_patchsize=32)


def test_module_validates_arguments_and_config_instantiates(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        BSRGANDegradation(variant="bsrgan2")
    with pytest.raises(ValueError, match="jpeg_prob"):
        BSRGANDegradation(jpeg_prob=1.5)
    from hydra.utils import instantiate

    from helpers import compose_train

    cfg = compose_train(["degradation=bsrgan", "degradation.variant=bsrgan_plus"], tmp_path)
    deg = instantiate(cfg.degradation)
    assert isinstance(deg, BSRGANDegradation) and deg.variant == "bsrgan_plus" and deg.scale == cfg.upscale
    out = deg(torch.rand(1, 3, 32, 32), torch.Generator().manual_seed(0))
    assert out["lr"].shape == (1, 3, 8, 8)

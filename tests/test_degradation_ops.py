"""filter2d / USM (spec §1.5), DiffJPEG (spec §1.6) and noise (spec §1.3 step 3) against hand computations."""
import math

import numpy as np
import pytest
import torch
from scipy import fft as sfft
from scipy import signal

from sr_lab.degradation import filters, jpeg, noise


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ================================================================ filter2d
def np_correlate_reflect(img, ker):
    """Hand-computed cross-correlation with numpy reflect padding of k//2."""
    p = ker.shape[0] // 2
    padded = np.pad(img, ((p, p), (p, p)), mode="reflect")
    h, w = img.shape
    out = np.zeros_like(img)
    for a in range(ker.shape[0]):
        for b in range(ker.shape[1]):
            out += ker[a, b] * padded[a : a + h, b : b + w]
    return out


def test_filter2d_per_sample_kernels_match_numpy():
    x = torch.rand(2, 3, 12, 13, generator=gen(0), dtype=torch.float64)
    k = torch.rand(2, 5, 5, generator=gen(1), dtype=torch.float64)  # asymmetric: corr != conv
    out = filters.filter2d(x, k)
    assert out.shape == x.shape
    for i in range(2):
        for c in range(3):
            ref = np_correlate_reflect(x[i, c].numpy(), k[i].numpy())
            np.testing.assert_allclose(out[i, c].numpy(), ref, rtol=1e-10, atol=1e-10)


def test_filter2d_shared_kernel_and_large_padding():
    x = torch.rand(3, 3, 6, 9, generator=gen(2))
    k = torch.rand(1, 21, 21, generator=gen(3))  # pad 10 > image size: periodic reflection
    out = filters.filter2d(x, k)
    for i in range(3):
        ref = np_correlate_reflect(x[i, 1].double().numpy(), k[0].double().numpy())
        np.testing.assert_allclose(out[i, 1].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_reflect_pad_matches_numpy_everywhere():
    for h, w, p in [(5, 7, 2), (4, 3, 10), (1, 6, 3), (2, 2, 5)]:
        x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
        ref = np.pad(x[0, 0].numpy(), ((p, p), (p, p)), mode="reflect") if min(h, w) > 1 else None
        out = filters.reflect_pad(x, p)[0, 0].numpy()
        if ref is not None:
            np.testing.assert_array_equal(out, ref)
        else:
            assert out.shape == (h + 2 * p, w + 2 * p)


def test_filter2d_matches_kornia():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(4, 3, 20, 24, generator=gen(4))
    k = torch.rand(4, 7, 7, generator=gen(5))
    ref = kornia.filters.filter2d(x, k, border_type="reflect")
    assert torch.allclose(filters.filter2d(x, k), ref, atol=1e-5)


def test_separable_equals_full_filter():
    x = torch.rand(2, 3, 30, 31, generator=gen(6), dtype=torch.float64)
    g = torch.rand(9, generator=gen(7), dtype=torch.float64)
    full = filters.filter2d(x, torch.outer(g, g)[None])
    assert torch.allclose(filters.separable_filter2d(x, g), full, atol=1e-12)


# ================================================================ USM
def np_usm(img, radius=50, weight=0.5, threshold=10):
    """Spec §1.5 steps, by hand (float64)."""
    ksize = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    ax = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    g /= g.sum()
    k2 = np.outer(g, g)
    p = ksize // 2

    def blur(a):
        return signal.correlate2d(np.pad(a, ((p, p), (p, p)), mode="reflect"), k2, mode="valid")

    out = np.empty_like(img)
    for c in range(img.shape[0]):
        ch = img[c]
        residual = ch - blur(ch)
        mask = (np.abs(residual) * 255 > threshold).astype(np.float64)
        soft = blur(mask)
        sharp = np.clip(ch + weight * residual, 0, 1)
        out[c] = soft * sharp + (1 - soft) * ch
    return out


def test_opencv_sigma_rule():
    g = filters.opencv_gaussian_kernel1d(51).double().numpy()
    ax = np.arange(51) - 25
    ref = np.exp(-(ax**2) / (2 * 8.0**2))
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=1e-6)


def test_usm_matches_hand_computation():
    torch.manual_seed(0)
    base = torch.rand(2, 3, 8, 10, generator=gen(8))
    img = torch.nn.functional.interpolate(base, size=(40, 48), mode="bilinear")  # edges + flat parts
    out = filters.usm_sharp(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    for i in range(2):
        np.testing.assert_allclose(out[i].double().numpy(), np_usm(img[i].double().numpy()), atol=2e-5)
    assert torch.allclose(filters.USMSharp()(img), out)
    assert not torch.allclose(out, img)  # it does sharpen


# ================================================================ JPEG
def test_dct_matches_scipy_and_round_trips():
    x = torch.rand(3, 2, 8, 8, generator=gen(9), dtype=torch.float64) * 255
    coeffs = jpeg.block_dct(x)
    ref = sfft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(coeffs.numpy(), ref, atol=1e-9)
    assert torch.allclose(jpeg.block_idct(coeffs), x, atol=1e-9)


def test_quality_to_factor():
    q = torch.tensor([10.0, 25.0, 50.0, 75.0, 90.0, 100.0])
    expected = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.0])
    assert torch.allclose(jpeg.quality_to_factor(q), expected)


def blocky(b, h, w, seed):
    """Image constant on 2x2 blocks: chroma 4:2:0 subsampling is lossless on it."""
    small = torch.rand(b, 3, h // 2, w // 2, generator=gen(seed))
    return small.repeat_interleave(2, -2).repeat_interleave(2, -1)


def smooth(b, h, w, seed):
    small = torch.rand(b, 3, h // 8, w // 8, generator=gen(seed))
    img = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return torch.clamp(img + 0.03 * torch.randn(b, 3, h, w, generator=gen(seed + 1)), 0, 1)


def test_jpeg_quality_100_is_near_identity():
    x = blocky(2, 32, 48, 10)
    out = jpeg.diff_jpeg(x, 100.0)
    assert (out - x).abs().max() < 1e-4
    assert (jpeg.diff_jpeg(x, 99.5) - x).abs().max() < 2 / 255


def test_jpeg_error_grows_as_quality_drops():
    x = smooth(2, 64, 64, 11)
    errs = [float((jpeg.diff_jpeg(x, q) - x).pow(2).mean()) for q in (95.0, 70.0, 40.0, 10.0)]
    assert errs == sorted(errs) and errs[0] > 0 and errs[-1] > 4 * errs[0]


def test_jpeg_per_sample_quality_and_range():
    x = smooth(3, 40, 56, 12)  # not a multiple of 16: zero padding + crop
    q = torch.tensor([10.0, 50.0, 95.0])
    out = jpeg.diff_jpeg(x, q)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    for i in range(3):
        single = jpeg.diff_jpeg(x[i : i + 1], float(q[i]))
        assert (out[i : i + 1] - single).abs().mean() < 1e-6
    # the three samples really used different qualities
    e = [(out[i] - x[i]).pow(2).mean() for i in range(3)]
    assert e[0] > e[1] > e[2]
    extreme = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    out = jpeg.diff_jpeg(extreme, torch.tensor([20.0, 20.0]))
    assert out.min() >= 0 and out.max() <= 1


def test_jpeg_luma_path_matches_hand_computation():
    """Gray 16x16 image: chroma is constant 128, so only the luma path acts. BasicSR layout = Annex-K table transposed."""
    y = torch.rand(1, 1, 16, 16, generator=gen(13), dtype=torch.float64)
    x = y.expand(1, 3, 16, 16).float()
    quality = 30.0
    out = jpeg.diff_jpeg(x, quality)[0, 0].double().numpy() * 255
    factor = (5000 / quality) / 100
    table = np.array(jpeg.JPEG_LUMA_TABLE, dtype=np.float64).T * factor
    plane = x[0, 0].double().numpy() * 255 - 128
    rec = np.empty_like(plane)
    for bi in range(2):
        for bj in range(2):
            blk = plane[8 * bi : 8 * bi + 8, 8 * bj : 8 * bj + 8]
            c = sfft.dctn(blk, norm="ortho")
            c = np.round(c / table) * table
            rec[8 * bi : 8 * bi + 8, 8 * bj : 8 * bj + 8] = sfft.idctn(c, norm="ortho")
    ref = np.clip(rec + 128, 0, 255)
    assert np.abs(out - ref).max() < 0.02
    std = jpeg.diff_jpeg(x, quality, transpose_luma_table=False)
    assert not torch.allclose(std, jpeg.diff_jpeg(x, quality))


# ================================================================ noise
def test_count_unique_matches_torch_unique_loop():
    q = torch.randint(0, 256, (5, 3, 9, 7), generator=gen(14))
    q[1] = torch.randint(0, 4, (3, 9, 7), generator=gen(15))
    q[2] = 17
    q[3, :, :, :] = torch.randint(100, 103, (3, 9, 7), generator=gen(16))
    counts = noise.count_unique_8bit(q)
    ref = torch.tensor([len(torch.unique(q[i])) for i in range(5)])
    assert torch.equal(counts.cpu(), ref)


def test_poisson_vals_exact_powers_of_two():
    n = torch.tensor([1, 2, 3, 4, 5, 127, 128, 129, 255, 256])
    expected = torch.tensor([1, 2, 4, 4, 8, 128, 128, 256, 256, 256], dtype=torch.float32)
    assert torch.equal(noise.poisson_vals(n), expected)
    ref = torch.tensor([2.0 ** math.ceil(math.log2(v)) for v in n.tolist()])
    assert torch.equal(noise.poisson_vals(n), ref)


def test_gaussian_noise_sigma_gray_and_shared_quirk():
    img = torch.full((3, 3, 96, 96), 0.5)
    sigma = torch.tensor([5.0, 10.0, 20.0])
    n = noise.gaussian_noise(img, sigma, torch.zeros(3), gen(17))
    std = n.std(dim=(1, 2, 3)) * 255
    assert torch.allclose(std, sigma, rtol=0.05)
    assert not torch.allclose(n[:, 0], n[:, 1])
    gray = noise.gaussian_noise(img, sigma, torch.ones(3), gen(18), gray_shared_across_batch=True)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    normalised = gray / (sigma.view(3, 1, 1, 1) / 255)
    assert torch.allclose(normalised[0], normalised[1], atol=1e-5)  # the reference quirk
    own = noise.gaussian_noise(img, sigma, torch.ones(3), gen(18), gray_shared_across_batch=False)
    normalised = own / (sigma.view(3, 1, 1, 1) / 255)
    assert not torch.allclose(normalised[0], normalised[1], atol=1e-2)
    mixed = noise.gaussian_noise(img, sigma, torch.tensor([1.0, 0.0, 1.0]), gen(19))
    assert torch.equal(mixed[0, 0], mixed[0, 2]) and not torch.equal(mixed[1, 0], mixed[1, 2])
    out = noise.add_gaussian_noise(torch.rand(3, 3, 16, 16, generator=gen(1)), sigma * 10, torch.zeros(3), gen(20))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(noise.gaussian_noise(img, sigma, torch.zeros(3), gen(21)),
                       noise.gaussian_noise(img, sigma, torch.zeros(3), gen(21)))


def test_poisson_noise_statistics_and_gray():
    img = torch.full((2, 3, 128, 128), 0.5)  # one unique value -> vals = 1
    scale = torch.tensor([0.1, 0.2])
    n = noise.poisson_noise(img, scale, torch.zeros(2), gen(22))
    q = round(0.5 * 255) / 255
    var = n.var(dim=(1, 2, 3))
    assert torch.allclose(var, q * scale**2, rtol=0.06)
    assert abs(float(n.mean())) < 0.01
    g = noise.poisson_noise(img, scale, torch.ones(2), gen(23))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 0], g[:, 2])
    assert torch.equal(noise.poisson_noise(img, torch.zeros(2), torch.zeros(2), gen(24)), torch.zeros_like(img))
    # many unique values -> vals 256 -> small noise relative to scale
    rich = torch.rand(1, 3, 64, 64, generator=gen(25))
    n_rich = noise.poisson_noise(rich, torch.ones(1), torch.zeros(1), gen(26))
    assert float(n_rich.std()) < 0.06
    out = noise.add_poisson_noise(rich, torch.tensor([3.0]), torch.zeros(1), gen(27))
    assert out.min() >= 0 and out.max() <= 1

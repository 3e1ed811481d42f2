"""sr_lab.degradation.kornia_ops: each op against a hand computation or kornia's own reference (CPU, small)."""
import math

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_lab.degradation import kornia_ops as ko
from sr_lab.degradation.filters import filter2d as sr_filter2d
from sr_lab.degradation.jpeg import diff_jpeg
from sr_lab.degradation.kernels import gaussian_kernel


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def photos():
    """Four 64x64 crops of scikit-image's astronaut, (4, 3, 64, 64) float32 in [0, 1]."""
    from skimage import data

    img = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255.0
    return torch.cat([img[..., 100:164, 180:244], img[..., 200:264, 300:364],
                      img[..., 0:64, 0:64], img[..., 400:464, 100:164]])


def _np_reflect_filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Independent reference: numpy reflect padding (periodic for wide pads) + explicit correlation sum."""
    xb = x.double().numpy()
    kb = kernels.double().numpy()
    b, c, h, w = xb.shape
    out = np.zeros_like(xb)
    for i in range(b):
        k = kb[i if kb.shape[0] > 1 else 0]
        p = k.shape[0] // 2
        xp = np.pad(xb[i], ((0, 0), (p, p), (p, p)), mode="reflect")
        for u in range(k.shape[0]):
            for v in range(k.shape[1]):
                out[i] += k[u, v] * xp[:, u:u + h, v:v + w]
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------- motion blur


@pytest.mark.parametrize("length,mode", [(3, "nearest"), (5, "nearest"), (7, "nearest"), (7, "bilinear")])
def test_motion_blur_equal_lengths_is_exactly_kornia(length, mode):
    x = _rand(4, 3, 16, 18)
    angle = torch.tensor([0.0, 35.0, 90.0, 215.0])
    direction = torch.tensor([0.0, 0.5, -1.0, 1.0])
    got = ko.motion_blur(x, torch.full((4,), float(length)), angle, direction, mode=mode)
    want = kornia.filters.motion_blur(x, length, angle, direction, border_type="reflect", mode=mode)
    assert torch.equal(got, want)  # tolerance 0: same kernel, same filter2d call


def test_motion_blur_mixed_lengths_match_per_sample_kornia():
    x = _rand(4, 3, 16, 16, seed=1)
    lengths = torch.tensor([1, 3, 7, 5])  # long
    angle = torch.tensor([10.0, 45.0, 120.0, 300.0])
    direction = torch.tensor([0.3, -0.2, 1.0, 0.0])
    got = ko.motion_blur(x, lengths, angle, direction)
    kernel = ko.motion_kernel(lengths, angle, direction, like=x)
    assert kernel.shape == (4, 7, 7)
    assert torch.allclose(kernel.sum((-2, -1)), torch.ones(4), atol=1e-6)
    assert torch.allclose(got[0], x[0], atol=1e-6, rtol=0)  # length 1 is the identity
    for i in range(1, 4):
        want = kornia.filters.motion_blur(x[i:i + 1], int(lengths[i]), angle[i:i + 1], direction[i:i + 1])
        assert torch.allclose(got[i:i + 1], want, atol=1e-6, rtol=0)
    # the same image with different params gives different outputs
    xs = x[:1].expand(4, -1, -1, -1)
    out = ko.motion_blur(xs, lengths, angle, direction)
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i + 1, 4))


def test_motion_kernel_is_centred_zero_padded_kornia_kernel():
    like = torch.zeros(2, 1, 8, 8)
    k = ko.motion_kernel(torch.tensor([3.0, 7.0]), torch.tensor([30.0, 60.0]), torch.tensor([0.5, -0.5]), like=like)
    k3 = kornia.filters.get_motion_kernel2d(3, torch.tensor([30.0]), torch.tensor([0.5]))
    assert torch.equal(k[0, 2:5, 2:5], k3[0])
    assert float(k[0].abs().sum() - k[0, 2:5, 2:5].abs().sum()) == 0.0


def test_motion_blur_rejects_bad_lengths_and_handles_small_images():
    x = _rand(2, 3, 4, 5)
    for bad in ([2.0, 3.0], [0.0, 3.0], [2.5, 3.0]):
        with pytest.raises(ValueError):
            ko.motion_blur(x, torch.tensor(bad), torch.zeros(2), torch.zeros(2))
    # pad 4 >= H: kornia's reflect pad would raise; the sr_lab (periodic reflection) fallback is used
    length, angle, direction = torch.tensor([9.0, 3.0]), torch.tensor([20.0, 80.0]), torch.tensor([0.0, 0.4])
    got = ko.motion_blur(x, length, angle, direction)
    want = _np_reflect_filter(x, ko.motion_kernel(length, angle, direction, like=x))
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_motion_blur_gradients():
    x = _rand(2, 3, 12, 12).requires_grad_()
    direction = torch.tensor([0.5, -0.3], requires_grad=True)
    ko.motion_blur(x, torch.tensor([5.0, 3.0]), torch.tensor([30.0, 0.0]), direction).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert direction.grad is not None


# ------------------------------------------------------------------------------------------- disk blur


def test_disk_kernel_hand_computed_2x2_subsampling():
    # radius 1, 2x2 sub-pixel centres at +-1/4: centre pixel 4/4 inside; edge pixel (1, 0): (0.75, +-0.25) in
    # (0.625 <= 1), (1.25, .) out -> 2/4; corner (1, 1): (0.75, 0.75) has 1.125 > 1 -> 0. Sum 3.
    k = ko.disk_kernel(torch.tensor([1.0]), like=torch.zeros(1, 1, 4, 4), subsamples=2)[0]
    want = torch.tensor([[0.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 0.0]]) / 3
    assert torch.allclose(k, want, atol=1e-7, rtol=0)


def test_disk_kernel_default_approximates_exact_pixel_coverage():
    # exact coverage of the unit disk: centre 1, edge pixel e = int_{-1/2}^{1/2} sqrt(1-y^2) dy - 1/2,
    # corner c = (pi - 1 - 4e)/4; normalised by the disk area pi.
    e = 0.5 * math.sqrt(0.75) + math.asin(0.5) - 0.5
    c = (math.pi - 1 - 4 * e) / 4
    exact = torch.tensor([[c, e, c], [e, 1.0, e], [c, e, c]]) / math.pi
    k = ko.disk_kernel(torch.tensor([1.0]), like=torch.zeros(1, 1, 4, 4))[0]
    assert torch.allclose(k, exact, atol=4e-3, rtol=0)  # 16x16 supersampling: measured max error 3.0e-3


def test_disk_kernel_properties():
    like = torch.zeros(3, 1, 8, 8)
    k = ko.disk_kernel(torch.tensor([0.0, 1.5, 2.3]), like=like)
    assert k.shape == (3, 7, 7)  # 2 * ceil(2.3) + 1
    assert torch.allclose(k.sum((-2, -1)), torch.ones(3), atol=1e-6)
    assert torch.equal(k, k.flip(-1)) and torch.equal(k, k.flip(-2)) and torch.equal(k, k.transpose(-1, -2))
    delta = torch.zeros(7, 7)
    delta[3, 3] = 1
    assert torch.equal(k[0], delta)
    assert torch.equal(k[1, 0], torch.zeros(7)) and float(k[2, 0].sum()) == 0.0  # 2.3 < 2.5: row 0 is empty
    assert float(k[2, 1].sum()) > 0
    with pytest.raises(ValueError):
        ko.disk_kernel(torch.tensor([-1.0]), like=like[:1])


def test_disk_blur_identity_at_zero_per_sample_and_gradients():
    x = _rand(2, 3, 10, 12, seed=2)
    assert torch.equal(ko.disk_blur(x, torch.zeros(2)), x)
    y = ko.disk_blur(x, torch.tensor([0.0, 2.5]))
    assert torch.allclose(y[0], x[0], atol=1e-6, rtol=0)
    assert (y[1] - x[1]).abs().max() > 0.05
    want = _np_reflect_filter(x[1:], ko.disk_kernel(torch.tensor([2.5]), like=x[1:]))
    assert torch.allclose(y[1:].double(), want, atol=1e-6)
    xg = x.clone().requires_grad_()
    ko.disk_blur(xg, torch.tensor([1.0, 3.0])).square().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- Gaussian blur


def _hand_gaussian(x, sigma, k):
    n = torch.arange(k, dtype=torch.float64) - k // 2
    out = []
    for i, s in enumerate(sigma.tolist()):
        g = torch.exp(-n**2 / (2 * s * s))
        g = g / g.sum()
        w = (g[:, None] * g[None, :]).to(x.dtype)
        xp = F.pad(x[i:i + 1], (k // 2,) * 4, mode="reflect")
        out.append(F.conv2d(xp, w.expand(x.shape[1], 1, k, k), groups=x.shape[1]))
    return torch.cat(out)


def test_gaussian_blur_matches_hand_kernel_and_sr_lab():
    x = _rand(3, 3, 20, 22, seed=3)
    sigma = torch.tensor([0.4, 1.3, 2.0])
    got = ko.gaussian_blur(x, sigma)  # default k = 2 * ceil(3 * 2.0) + 1 = 13
    assert torch.equal(got, ko.gaussian_blur(x, sigma, kernel_size=13))
    assert torch.allclose(got, _hand_gaussian(x, sigma, 13), atol=1e-6, rtol=0)
    assert torch.allclose(got, sr_filter2d(x, gaussian_kernel(13, sigma)), atol=1e-6, rtol=0)  # measured 5e-7
    got5 = ko.gaussian_blur(x, sigma, kernel_size=5)
    assert torch.allclose(got5, _hand_gaussian(x, sigma, 5), atol=1e-6, rtol=0)
    for i in range(3):
        assert torch.allclose(got[i:i + 1], ko.gaussian_blur(x[i:i + 1], sigma[i:i + 1], kernel_size=13), atol=1e-6)


def test_gaussian_blur_small_image_fallback_and_gradients():
    x = _rand(2, 3, 5, 6, seed=4)
    sigma = torch.tensor([2.0, 0.7])  # k = 13, pad 6 >= 5: kornia cannot reflect-pad
    got = ko.gaussian_blur(x, sigma)
    n = torch.arange(13, dtype=torch.float64) - 6
    g = torch.exp(-n[None] ** 2 / (2 * sigma.double()[:, None] ** 2))
    g = g / g.sum(-1, keepdim=True)
    assert torch.allclose(got.double(), _np_reflect_filter(x, g[:, :, None] * g[:, None, :]), atol=1e-6)
    xg = _rand(2, 3, 12, 12).requires_grad_()
    s = torch.tensor([1.0, 1.5], requires_grad=True)
    ko.gaussian_blur(xg, s).square().sum().backward()
    assert xg.grad is not None and s.grad is not None


# ------------------------------------------------------------------------------------------- colour


def test_brightness_contrast_gamma_hand_formulas():
    x = torch.tensor([0.0, 0.2, 0.5, 0.9]).view(1, 1, 1, 4).expand(3, 3, 2, 4).contiguous()
    d = torch.tensor([0.1, -0.3, 0.5])
    assert torch.allclose(ko.adjust_brightness(x, d), (x + d.view(3, 1, 1, 1)).clamp(0, 1))
    assert ko.adjust_brightness(x, d)[2].max() == 1.0 and ko.adjust_brightness(x, d)[1].min() == 0.0
    f = torch.tensor([0.5, 1.0, 2.0])  # kornia's contrast is multiplicative: x * f
    assert torch.allclose(ko.adjust_contrast(x, f), (x * f.view(3, 1, 1, 1)).clamp(0, 1))
    assert torch.allclose(ko.adjust_contrast(x, f)[2, 0, 0], torch.tensor([0.0, 0.4, 1.0, 1.0]))
    gam = torch.tensor([0.5, 1.0, 2.2])
    assert torch.allclose(ko.adjust_gamma(x, gam), x ** gam.view(3, 1, 1, 1))
    assert torch.allclose(ko.adjust_gamma(x, gam, 1.5), (1.5 * x ** gam.view(3, 1, 1, 1)).clamp(0, 1))
    gain = torch.tensor([1.0, 0.5, 2.0])
    want = (gain.view(3, 1, 1, 1) * x ** gam.view(3, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(ko.adjust_gamma(x, gam, gain), want)
    assert torch.allclose(ko.adjust_gamma(x, torch.full((3,), 2.0))[0, 0, 0], torch.tensor([0.0, 0.04, 0.25, 0.81]))


def test_saturation_hand_formula():
    # pixel (0.8, 0.4, 0.2): v = 0.8, s = 0.75. factor 0.5 -> s' = 0.375, min' = v(1-s') = 0.5, hue kept:
    # (0.8, 0.6, 0.5). factor 2 -> s' = 1 -> (0.8, 0.2667, 0). factor 0 -> max(R, G, B) everywhere.
    x = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(3, 3, 2, 2).contiguous()
    out = ko.adjust_saturation(x, torch.tensor([0.5, 2.0, 0.0]))[:, :, 0, 0]
    want = torch.tensor([[0.8, 0.6, 0.5], [0.8, 0.2 * 0.8 / 0.6, 0.0], [0.8, 0.8, 0.8]])
    assert torch.allclose(out, want, atol=1e-6)
    y = _rand(2, 3, 4, 4)
    assert torch.allclose(ko.adjust_saturation(y, torch.ones(2)), y, atol=1e-6)


def test_colour_ops_clamped_and_per_sample():
    x = _rand(1, 3, 6, 6).expand(3, -1, -1, -1)
    for fn, p in [(ko.adjust_brightness, torch.tensor([-0.2, 0.0, 0.3])),
                  (ko.adjust_contrast, torch.tensor([0.5, 1.0, 1.8])),
                  (ko.adjust_gamma, torch.tensor([0.4, 1.0, 2.5])),
                  (ko.adjust_saturation, torch.tensor([0.0, 1.0, 3.0]))]:
        y = fn(x, p)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2]) and not torch.allclose(y[0], y[2])
        for i in range(3):
            assert torch.allclose(y[i:i + 1], fn(x[i:i + 1], p[i:i + 1]))


# ------------------------------------------------------------------------------------------- chromatic aberration


def test_chromatic_aberration_zero_shift_is_exact_identity():
    x = _rand(2, 3, 9, 11)
    for pm in ("border", "reflection"):
        assert torch.equal(ko.chromatic_aberration(x, torch.zeros(2, 2), torch.zeros(2, 2), padding_mode=pm), x)


def test_chromatic_aberration_integer_shift_is_roll_in_interior():
    x = _rand(2, 3, 12, 14, seed=5)
    sr = torch.tensor([[2.0, -1.0], [-3.0, 0.0]])
    sb = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    y = ko.chromatic_aberration(x, sr, sb)
    assert torch.equal(y[:, 1], x[:, 1])
    for i in range(2):
        for ch, s in ((0, sr[i]), (2, sb[i])):
            dx, dy = int(s[0]), int(s[1])
            rolled = torch.roll(x[i, ch], shifts=(dy, dx), dims=(-2, -1))
            ys, xs = slice(max(dy, 0), 12 + min(dy, 0)), slice(max(dx, 0), 14 + min(dx, 0))
            assert torch.equal(y[i, ch][ys, xs], rolled[ys, xs])


def test_chromatic_aberration_half_pixel_ramp_is_midpoint():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 5, 8) / 8
    y = ko.chromatic_aberration(ramp, torch.tensor([[0.5, 0.0]]), torch.tensor([[-0.5, 0.0]]))
    mid = (ramp[..., 1:] + ramp[..., :-1]) / 2
    assert torch.equal(y[0, 0, :, 1:], mid[0, 0])  # red moved right by 1/2: out[j] = (in[j-1] + in[j]) / 2
    assert torch.equal(y[0, 2, :, :-1], mid[0, 2])  # blue moved left by 1/2
    vramp = ramp.transpose(-1, -2)
    y = ko.chromatic_aberration(vramp, torch.tensor([[0.0, 0.5]]), torch.zeros(1, 2))
    assert torch.equal(y[0, 0, 1:], ((vramp[..., 1:, :] + vramp[..., :-1, :]) / 2)[0, 0])


@pytest.mark.parametrize("pm", ["border", "reflection"])
def test_chromatic_aberration_matches_kornia_translate(pm):
    x = _rand(3, 3, 14, 17, seed=6)
    sr = torch.tensor([[0.3, -1.7], [2.5, 0.25], [-0.6, 0.0]])
    sb = torch.tensor([[-1.2, 0.4], [0.0, 0.0], [3.3, -2.1]])
    y = ko.chromatic_aberration(x, sr, sb, padding_mode=pm)
    r = kornia.geometry.transform.translate(x[:, :1], sr, padding_mode=pm, align_corners=True)
    b = kornia.geometry.transform.translate(x[:, 2:], sb, padding_mode=pm, align_corners=True)
    assert torch.allclose(y[:, :1], r, atol=1e-5, rtol=0)  # measured 1.7e-6 / 2.7e-6 (kornia's grid round trip)
    assert torch.allclose(y[:, 2:], b, atol=1e-5, rtol=0)
    for i in range(3):  # per-sample
        assert torch.equal(y[i:i + 1], ko.chromatic_aberration(x[i:i + 1], sr[i:i + 1], sb[i:i + 1], padding_mode=pm))


def test_chromatic_aberration_gradients():
    x = _rand(2, 3, 8, 8).requires_grad_()
    sr = torch.tensor([[0.3, -0.7], [1.5, 0.25]], requires_grad=True)
    sb = torch.tensor([[-0.2, 0.4], [0.6, 0.1]], requires_grad=True)
    (ko.chromatic_aberration(x, sr, sb) * torch.linspace(0, 1, 8)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert sr.grad is not None and sr.grad.abs().sum() > 0 and sb.grad is not None


# ------------------------------------------------------------------------------------------- JPEG


def test_jpeg_kornia_shape_range_determinism_and_padding():
    x = _rand(2, 3, 20, 27, seed=7)
    q = torch.tensor([30.0, 80.0])
    y = ko.jpeg_kornia(x, q)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, ko.jpeg_kornia(x, q))
    assert torch.equal(y, kornia.enhance.jpeg_codec_differentiable(x, q))  # explicit replicate pad == kornia's own
    xs = x[:1].expand(2, -1, -1, -1)
    ys = ko.jpeg_kornia(xs, q)
    assert not torch.allclose(ys[0], ys[1])
    assert torch.allclose(ys[1:], ko.jpeg_kornia(xs[1:], q[1:]), atol=1e-6)


def test_jpeg_kornia_higher_quality_is_closer(photos):
    errs = [float((ko.jpeg_kornia(photos, torch.full((4,), q)) - photos).abs().mean()) for q in (10, 30, 50, 70, 90)]
    assert errs == sorted(errs, reverse=True)


def test_jpeg_kornia_gradients():
    x = _rand(2, 3, 16, 16).requires_grad_()
    ko.jpeg_kornia(x, torch.tensor([50.0, 90.0])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # cubic rounding: non-zero, unlike hard-round DiffJPEG


@pytest.mark.parametrize("quality,measured", [(10.0, 3.900), (50.0, 2.495), (90.0, 1.835), (100.0, 1.095)])
def test_jpeg_kornia_vs_sr_lab_diffjpeg(photos, quality, measured):
    """Mean |kornia - sr_lab DiffJPEG| in 8-bit levels on the astronaut crops (float32, CPU). Measured values in
    the parametrisation; the bounds allow +-15 %. They are different codecs (see jpeg_kornia's docstring)."""
    q = torch.full((4,), quality)
    diff = float((ko.jpeg_kornia(photos, q) - diff_jpeg(photos, q)).abs().mean()) * 255
    assert 0.85 * measured < diff < 1.15 * measured


# ------------------------------------------------------------------------------------------- filter2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,c,h,w,k,shared", [(2, 3, 16, 16, 3, False), (2, 3, 16, 16, 3, True),
                                              (4, 3, 32, 24, 21, False), (3, 1, 9, 13, 7, False),
                                              (2, 3, 23, 31, 11, True), (1, 3, 11, 11, 21, False)])
def test_filter2d_kornia_is_bit_identical_to_sr_lab(dtype, b, c, h, w, k, shared):
    x = _rand(b, c, h, w, seed=k, dtype=dtype)
    kern = _rand(1 if shared else b, k, k, seed=k + 1, dtype=dtype)
    kern = kern / kern.sum((-2, -1), keepdim=True)
    assert torch.equal(ko.filter2d_kornia(x, kern), sr_filter2d(x, kern))  # pad k//2 < H, W (k=21 on 11: pad 10)


def test_filter2d_kornia_raises_when_pad_reaches_image_size():
    x = _rand(2, 3, 5, 8)
    kern = torch.full((1, 11, 11), 1 / 121)
    with pytest.raises(ValueError):
        ko.filter2d_kornia(x, kern)
    with pytest.raises(RuntimeError):  # kornia itself: F.pad reflect
        kornia.filters.filter2d(x, kern, border_type="reflect")
    y = sr_filter2d(x, kern)  # sr_lab handles it (periodic reflection)
    assert torch.allclose(y.double(), _np_reflect_filter(x, kern), atol=1e-6)

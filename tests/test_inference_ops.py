"""Pure inference parts against hand computation: colour fix (StableSR Eq. 2-5), aggregation tiling
(Eq. 7), tiled VAE, classifier-free guidance (Eq. 8), DDIM, per-row generators."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_lab.diffusion.guidance import classifier_free_guidance
from sr_lab.diffusion.samplers import ddim
from sr_lab.diffusion.schedule import eps_from_x0, randn_like
from sr_lab.inference.color_fix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decompose
from sr_lab.inference.tiling import (
    TiledModel,
    aggregation_weights,
    gaussian_weights,
    tile_boxes,
    tile_starts,
    tiled_decode,
    tiled_encode,
)


def sd_alphas_cumprod(T=1000):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2
    return torch.tensor(np.cumprod(1 - betas))


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- colour fix
def test_adain_matches_hand_computation():
    sr, lr = rand(2, 3, 9, 7, seed=1) * 0.5, rand(2, 3, 9, 7, seed=2)
    out = adain_color_fix(sr, lr)
    s, x = sr.double().numpy(), lr.double().numpy()
    for b in range(2):
        for c in range(3):
            ys, xs = s[b, c].ravel(), x[b, c].ravel()
            n = ys.size
            mu_y, mu_x = sum(ys) / n, sum(xs) / n
            sd_y = math.sqrt(sum((v - mu_y) ** 2 for v in ys) / (n - 1) + 1e-5)
            sd_x = math.sqrt(sum((v - mu_x) ** 2 for v in xs) / (n - 1) + 1e-5)
            want = (s[b, c] - mu_y) / sd_y * sd_x + mu_x
            np.testing.assert_allclose(out[b, c].double().numpy(), want, atol=1e-5)
    # the output has the LR's per-channel statistics
    assert torch.allclose(out.mean((2, 3)), lr.mean((2, 3)), atol=1e-5)
    # a smaller LR is bicubic-resized to the output size first
    small = rand(2, 3, 3, 3, seed=3)
    up = F.interpolate(small, size=(9, 7), mode="bicubic", align_corners=False)
    assert torch.allclose(adain_color_fix(sr, small), adain_color_fix(sr, up), atol=1e-6)


def _hand_blur(img: np.ndarray, d: int) -> np.ndarray:
    """Eq. 4 kernel with dilation d and replicate borders, by explicit loops."""
    k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
    h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for a in range(3):
                for b in range(3):
                    y = min(max(i + (a - 1) * d, 0), h - 1)
                    x = min(max(j + (b - 1) * d, 0), w - 1)
                    acc += k[a, b] * img[y, x]
            out[i, j] = acc
    return out


def test_wavelet_matches_hand_computation_and_takes_low_frequencies_from_lr():
    levels = 3
    sr, lr = rand(1, 3, 12, 10, seed=4), rand(1, 3, 12, 10, seed=5)
    out = wavelet_color_fix(sr, lr, levels=levels)
    for c in range(3):
        low_y, low_x = sr[0, c].double().numpy(), lr[0, c].double().numpy()
        high_y = np.zeros_like(low_y)
        for i in range(levels):  # Eq. 3 with dilations 1, 2, 4 (authors' code)
            blurred = _hand_blur(low_y, 2 ** i)
            high_y += low_y - blurred
            low_y = blurred
            low_x = _hand_blur(low_x, 2 ** i)
        np.testing.assert_allclose(out[0, c].double().numpy(), high_y + low_x, atol=1e-5)  # Eq. 5
    high, low = wavelet_decompose(sr, levels)
    assert torch.allclose(high + low, sr, atol=1e-6)  # the decomposition is exact
    # the low-frequency part of the output is the LR's: the output minus the SR's high frequencies
    _, low_lr = wavelet_decompose(lr, levels)
    assert torch.allclose(out - high, low_lr, atol=1e-6)
    # a pure colour cast (constant per channel, all low frequency) is removed exactly
    shifted = lr + torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    assert torch.allclose(wavelet_color_fix(shifted, lr, levels=5), lr, atol=1e-5)
    # and the LR is bicubic-resized to the output size first
    assert wavelet_color_fix(sr, rand(1, 3, 6, 5, seed=6)).shape == sr.shape


def test_color_fix_dispatch():
    sr, lr = rand(1, 3, 8, 8, seed=7), rand(1, 3, 8, 8, seed=8)
    assert torch.equal(color_fix(sr, lr, "none"), sr)
    assert torch.allclose(color_fix(sr, lr, "adain"), adain_color_fix(sr, lr))
    with pytest.raises(ValueError, match="color_fix"):
        color_fix(sr, lr, "histogram")


# ---------------------------------------------------------------- aggregation sampling
def test_tile_layout_shifts_the_last_tile_inward():
    assert tile_starts(64, 64, 32) == [0]
    assert tile_starts(40, 64, 32) == [0]
    assert tile_starts(100, 64, 32) == [0, 32, 36]
    assert tile_starts(65, 64, 32) == [0, 1]
    for length, tile, ov in [(100, 64, 32), (375, 64, 32), (27, 8, 4), (500, 64, 0)]:
        s = tile_starts(length, tile, ov)
        assert s[-1] + tile == length and s[0] == 0
        assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))  # overlap at least `ov`
    with pytest.raises(ValueError):
        tile_starts(10, 4, 4)


def test_aggregation_weights_sum_to_one_over_the_image():
    for h, w, tile, ov in [(100, 75, 64, 32), (19, 27, 8, 4), (64, 64, 64, 32), (130, 70, 32, 8)]:
        boxes, maps = aggregation_weights(h, w, tile, ov)
        total = torch.stack(maps).sum(0)
        assert torch.allclose(total, torch.ones(h, w, dtype=torch.float64), atol=1e-12)
        assert all(m[(m > 0)].numel() == min(tile, h) * min(tile, w) for m in maps)  # Gaussian inside Ω_n only
    g = gaussian_weights(64, 64)
    assert g.argmax() in (31 * 64 + 31, 31 * 64 + 32, 32 * 64 + 31, 32 * 64 + 32) and float(g.min()) > 0
    assert float(g[0, 32] / g[32, 32]) == pytest.approx(math.exp(-(31.5 ** 2 - 0.5 ** 2) / 64 ** 2 / 0.02), rel=1e-6)


class PointwiseModel:
    """ε depends on each latent position only, via x, a latent-size condition and a pixel-space (8x)
    condition; so tiled aggregation must reproduce the untiled output for any tile layout."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        img = F.avg_pool2d(cond["image"], 8).mean(1, keepdim=True)
        return torch.tanh(x * 1.7 + cond["lr_latent"] ** 2 - img + cond["context"].mean((1, 2)).view(-1, 1, 1, 1)
                          + t.float().view(-1, 1, 1, 1) / 1000)


def _cond(b, h, w, seed=0):
    return {"lr_latent": rand(b, 4, h, w, seed=seed), "image": rand(b, 3, h * 8, w * 8, seed=seed + 1),
            "context": rand(b, 5, 6, seed=seed + 2)}


def test_tiled_model_equals_untiled_for_a_pointwise_model_with_many_tiles():
    x, t = rand(2, 4, 19, 27, seed=10), torch.tensor([500, 20])
    cond = _cond(2, 19, 27)
    model = PointwiseModel()
    full = model(x, t, cond)
    tiled = TiledModel(model, tile_size=8, overlap=4, tile_batch=3)
    got = tiled(x, t, cond)
    assert torch.allclose(got, full, atol=1e-6)
    n_tiles = len(tile_boxes(19, 27, 8, 4))
    assert n_tiles > 10 and model.calls[1:] == [2 * min(3, n_tiles - i) for i in range(0, n_tiles, 3)]


def test_tiled_equals_untiled_when_one_tile_covers_the_latent():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))

    def model(x, t, cond):  # not pointwise: tiling would change it unless one tile covers all
        return conv(x + cond["lr_latent"])

    x, cond = rand(2, 4, 16, 12, seed=11), _cond(2, 16, 12, seed=3)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        full = model(x, t, cond)
        assert torch.allclose(TiledModel(model, 64, 32)(x, t, cond), full, atol=1e-6)
        assert torch.allclose(TiledModel(model, 16, 8)(x, t, cond), full, atol=1e-6)
        assert not torch.allclose(TiledModel(model, 8, 4)(x, t, cond), full, atol=1e-4)  # the test can fail


def test_tiled_vae_one_tile_is_exact_and_blending_preserves_a_pointwise_codec():
    def enc(img):  # 8x average pool: a "VAE" whose tiles are exact crops
        return F.avg_pool2d(img, 8).repeat(1, 2, 1, 1)[:, :4] * 2

    def dec(z, image):
        return F.interpolate(z[:, :3], scale_factor=8, mode="nearest") + 0 * image.mean()

    img = rand(1, 3, 96, 160, seed=12)
    assert torch.equal(tiled_encode(enc, img, 160, 32, 8), enc(img))
    assert torch.allclose(tiled_encode(enc, img, 64, 16, 8), enc(img), atol=1e-6)
    z = enc(img)
    assert torch.allclose(tiled_decode(dec, z, img, 48, 16, 8), dec(z, img), atol=1e-6)
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        tiled_encode(enc, img, 60, 16, 8)


# ---------------------------------------------------------------- classifier-free guidance
def test_cfg_scale_one_is_the_plain_model_and_other_scales_follow_eq8():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["context"].mean((1, 2)).view(-1, 1, 1, 1) + cond["lr_latent"]

    x, t = rand(2, 4, 6, 6, seed=13), torch.tensor([3, 3])
    cond = {"lr_latent": rand(2, 4, 6, 6, seed=14), "context": rand(2, 5, 6, seed=15),
            "uncond_context": -rand(2, 5, 6, seed=16)}
    assert classifier_free_guidance(model, 1.0) is model
    plain = model(x, t, cond)
    uncond = model(x, t, {**cond, "context": cond["uncond_context"]})
    calls.clear()
    for s in (0.0, 3.0, 7.5):
        got = classifier_free_guidance(model, s)(x, t, cond)
        assert torch.allclose(got, uncond + s * (plain - uncond), atol=1e-6)
    assert calls == [4, 4, 4]  # one batched call of 2B per evaluation
    assert torch.allclose(classifier_free_guidance(model, 0.0)(x, t, cond), uncond, atol=1e-6)  # s=0: negative only


# ---------------------------------------------------------------- DDIM and generators
def test_ddim_eta0_is_deterministic_and_the_oracle_returns_x0():
    abar = sd_alphas_cumprod()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, t, cond):
        return eps_from_x0(abar, x, t, target)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for eta in (0.0, 1.0):
        out = ddim.sample(oracle, noise, {}, abar, generator=torch.Generator().manual_seed(3), steps=10, eta=eta)
        assert torch.allclose(out, target, atol=1e-4), eta

    def model(x, t, cond):
        return 0.3 * x + 0.01

    a = ddim.sample(model, noise, {}, abar, generator=torch.Generator().manual_seed(0), steps=7, eta=0.0)
    b = ddim.sample(model, noise, {}, abar, generator=torch.Generator().manual_seed(99), steps=7, eta=0.0)
    assert torch.equal(a, b)  # eta = 0 draws nothing
    c = ddim.sample(model, noise, {}, abar, generator=torch.Generator().manual_seed(0), steps=7, eta=1.0)
    d = ddim.sample(model, noise, {}, abar, generator=torch.Generator().manual_seed(0), steps=7, eta=1.0)
    e = ddim.sample(model, noise, {}, abar, generator=torch.Generator().manual_seed(1), steps=7, eta=1.0)
    assert torch.equal(c, d) and not torch.allclose(c, e)
    seen = []
    ddim.sample(model, noise, {}, abar, steps=4, callback=lambda t, x0: seen.append(t))
    assert seen == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="eta"):
        ddim.sample(model, noise, {}, abar, steps=4, eta=-1)


def test_ddim_step_matches_the_formula():
    at, as_, eta = 0.3, 0.6, 0.5
    x, eps, x0, z = (torch.tensor(v) for v in (1.2, -0.4, 0.7, 0.9))
    sigma = eta * math.sqrt((1 - as_) / (1 - at)) * math.sqrt(1 - at / as_)
    want = math.sqrt(as_) * 0.7 + math.sqrt(1 - as_ - sigma ** 2) * -0.4 + sigma * 0.9
    assert float(ddim.ddim_step(x, eps, x0, at, as_, eta, z)) == pytest.approx(want, rel=1e-6)


def test_randn_like_with_one_generator_per_row_block():
    x = torch.empty(6, 2, 3)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    got = randn_like(x, gens)
    want = torch.cat([torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    assert torch.equal(got, want)
    with pytest.raises(ValueError):
        randn_like(torch.empty(5, 2), gens)

"""Aggregation Gaussian weight map centring (StableSR Eq. 7): sr_lab's symmetric default against the
authors' ``_gaussian_weights`` (IceClear/StableSR ldm/models/diffusion/ddpm.py, ddim.py,
scripts/util_image.py), which centres columns at (W - 1)/2 but rows at H/2."""
import math

import numpy as np
import pytest
import torch

from sr_lab.inference.tiling import TiledModel, aggregation_weights, gaussian_weights

VAR = 0.01
NORM = 1 / math.sqrt(2 * math.pi * VAR)


def authors_gaussian_weights(tile_width, tile_height):
    """The authors' ``_gaussian_weights`` maths (numpy, float64), transcribed without the batch tiling."""
    var = 0.01
    midpoint = (tile_width - 1) / 2
    x_probs = [math.exp(-(x - midpoint) * (x - midpoint) / (tile_width * tile_width) / (2 * var))
               / math.sqrt(2 * math.pi * var) for x in range(tile_width)]
    midpoint = tile_height / 2
    y_probs = [math.exp(-(y - midpoint) * (y - midpoint) / (tile_height * tile_height) / (2 * var))
               / math.sqrt(2 * math.pi * var) for y in range(tile_height)]
    return np.outer(y_probs, x_probs)


def test_authors_map_small_even_height_odd_width_by_hand():
    # H = 2: rows centred at 1 -> exponents -(0-1)^2/4/0.02 = -12.5 and 0.
    # W = 3: columns centred at 1 -> exponents -(1)^2/9/0.02 = -50/9, 0, -50/9.
    rows = [math.exp(-12.5), 1.0]
    cols = [math.exp(-50 / 9), 1.0, math.exp(-50 / 9)]
    want = torch.tensor([[r * c * NORM * NORM for c in cols] for r in rows], dtype=torch.float64)
    got = gaussian_weights(2, 3, dtype=torch.float64, centre="authors")
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # the symmetric map centres the rows at 0.5 instead: both rows equal exp(-0.25/4/0.02)
    sym = gaussian_weights(2, 3, dtype=torch.float64)
    assert torch.allclose(sym[0], sym[1]) and sym[0, 1] == pytest.approx(math.exp(-0.25 / 4 / 0.02) * NORM ** 2)


def test_authors_map_small_odd_height_even_width_by_hand():
    # H = 3: rows centred at 1.5 (not 1): exponents -(i - 1.5)^2 / 9 / 0.02 for i = 0, 1, 2.
    # W = 4: columns centred at 1.5: exponents -(j - 1.5)^2 / 16 / 0.02 for j = 0..3.
    rows = [math.exp(-(i - 1.5) ** 2 / 9 / 0.02) for i in range(3)]
    cols = [math.exp(-(j - 1.5) ** 2 / 16 / 0.02) for j in range(4)]
    want = torch.tensor([[r * c * NORM * NORM for c in cols] for r in rows], dtype=torch.float64)
    got = gaussian_weights(3, 4, dtype=torch.float64, centre="authors")
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert int(got.argmax()) // 4 in (1, 2) and got[2, 0] > got[0, 0]  # heavier at the bottom


@pytest.mark.parametrize("h,w", [(3, 4), (4, 3), (5, 8), (64, 64), (7, 12)])
def test_authors_map_matches_the_transcribed_reference(h, w):
    got = gaussian_weights(h, w, dtype=torch.float64, centre="authors").numpy()
    np.testing.assert_allclose(got, authors_gaussian_weights(w, h), rtol=1e-13, atol=0)


@pytest.mark.parametrize("h,w", [(5, 8), (8, 8), (7, 7), (64, 64), (6, 11)])
def test_default_is_symmetric_under_flips(h, w):
    g = gaussian_weights(h, w, dtype=torch.float64)
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))
    assert torch.equal(g, gaussian_weights(h, w, dtype=torch.float64, centre="symmetric"))
    a = gaussian_weights(h, w, dtype=torch.float64, centre="authors")
    assert torch.equal(a, a.flip(1)) and not torch.allclose(a, a.flip(0))  # authors: rows off by half
    assert torch.allclose(a[0] / a[0, 0], g[0] / g[0, 0], rtol=1e-12, atol=0)  # columns identical


def test_authors_to_symmetric_row_ratio():
    # row i of the authors' map = symmetric row * exp((a - 1/4) / (2 var H^2)), a = i - (H - 1)/2
    h = 64
    ratio = (gaussian_weights(h, 5, dtype=torch.float64, centre="authors")
             / gaussian_weights(h, 5, dtype=torch.float64))[:, 2]
    a = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    assert torch.allclose(ratio, torch.exp((a - 0.25) / (2 * VAR * h * h)), rtol=1e-12)
    assert float(ratio[0]) == pytest.approx(0.6787, abs=1e-4) and float(ratio[-1]) == pytest.approx(1.4644, abs=1e-4)


def test_aggregation_weights_and_tiled_model_take_the_centre():
    for centre in ("symmetric", "authors"):
        _, maps = aggregation_weights(19, 27, 8, 4, centre=centre)
        assert torch.allclose(torch.stack(maps).sum(0), torch.ones(19, 27, dtype=torch.float64), atol=1e-12)
        _, w, _ = TiledModel(lambda x, t, c: x, 8, 4, centre=centre).layout(19, 27, "cpu", torch.float64)
        assert torch.equal(w, gaussian_weights(8, 8, dtype=torch.float64, centre=centre))
    with pytest.raises(ValueError):
        gaussian_weights(4, 4, centre="middle")
    with pytest.raises(ValueError):
        TiledModel(lambda x, t, c: x, 8, 4, centre="middle")


def test_tiled_output_differs_only_with_vertical_overlap():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))

    def model(x, t, cond):  # not pointwise, so the weights matter where tiles overlap
        return conv(x)

    t = torch.tensor([10])
    with torch.no_grad():
        # tiles overlap in both directions: the maps differ
        x = torch.rand(1, 4, 19, 27, generator=torch.Generator().manual_seed(1))
        sym, auth = TiledModel(model, 8, 4)(x, t, {}), TiledModel(model, 8, 4, centre="authors")(x, t, {})
        assert not torch.allclose(sym, auth, atol=1e-4)
        # one row of tiles (height <= tile): the row factor cancels in w / ŵ, same output
        x = torch.rand(1, 4, 8, 27, generator=torch.Generator().manual_seed(2))
        sym, auth = TiledModel(model, 8, 4)(x, t, {}), TiledModel(model, 8, 4, centre="authors")(x, t, {})
        assert torch.allclose(sym, auth, atol=1e-6)

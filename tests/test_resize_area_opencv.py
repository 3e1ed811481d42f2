"""OpenCV INTER_AREA in torch (sr_lab.degradation.resize.resize_area): true area averaging when no axis
grows, OpenCV's bilinear "area emulation" (cv::hal::resize, area_mode) on both axes otherwise."""
import math

import numpy as np
import pytest
import torch

from sr_lab.degradation.resize import (
    area_linear_weights,
    area_weights,
    resize_area,
    resize_cv2,
)


def _img(h, w, seed=0, c=3):
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed, no cv2 needed
def test_area_linear_weights_simple_upscale_by_hand():
    # 2 -> 3: inv_scale 1.5, scale 2/3. d=0: sx 0, f = 1 - 1.5 < 0 -> 0; d=1: sx 0, f = 2 - 1.5 = 0.5;
    # d=2: sx = floor(4/3) = 1 = last -> f = 0. Equal to the area-overlap matrix here.
    want = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(area_linear_weights(2, 3), want)
    assert torch.allclose(area_weights(2, 3), want)


def test_area_linear_weights_exact_boundary_quirk_by_hand():
    # 6 -> 34: output 17 covers source [3, 3.176] exactly from a pixel boundary. In float64
    # 17 * (1 / (34 / 6)) = 2.9999999999999996, so sx = 2 and f = float32(18 - 3 * 34/6) = 1.0, which
    # OpenCV maps to f - floor(f) = 0: all the weight on source pixel 2 (area overlap: pixel 3).
    assert 17 * (1.0 / (34 / 6)) < 3
    w = area_linear_weights(6, 34)
    assert torch.equal(w[17], torch.tensor([0, 0, 1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(area_weights(6, 34)[17], torch.tensor([0, 0, 0, 1.0, 0, 0], dtype=torch.float64))
    # every other row agrees with the area-overlap matrix (to float32 coefficient rounding)
    rest = [i for i in range(34) if i != 17]
    assert torch.allclose(w[rest], area_weights(6, 34)[rest], atol=1e-7)


def test_mixed_up_and_down_uses_two_tap_emulation_on_both_axes_by_hand():
    # rows 5 -> 3 (shrunk) while cols 2 -> 3 (enlarged): OpenCV uses the bilinear emulation on the rows too.
    # inv 0.6, scale 1/0.6: d=0: sx 0, f = 1 - 0.6 = 0.4; d=1: sx 1, f = 2 - 1.2 = 0.8; d=2: sx 3, f = 3 - 2.4 = 0.6
    def f32(v):  # coefficients are float32 in OpenCV
        return float(np.float32(v))

    rows = torch.tensor([[1 - f32(0.4), f32(0.4), 0, 0, 0],
                         [0, 1 - f32(2 - 2 * 0.6), f32(2 - 2 * 0.6), 0, 0],
                         [0, 0, 0, 1 - f32(3 - 4 * 0.6), f32(3 - 4 * 0.6)]], dtype=torch.float64)
    assert torch.allclose(area_linear_weights(5, 3), rows, atol=1e-7)
    x = _img(5, 2, seed=3)
    want = torch.einsum("oh,bchw,pw->bcop", rows, x, area_linear_weights(2, 3))
    assert torch.allclose(resize_area(x, (3, 3)), want, atol=1e-7)
    # the true area average of 5 -> 3 would be different (3 taps in the middle row)
    assert not torch.allclose(area_weights(5, 3), rows, atol=1e-3)


def test_downscale_is_unchanged_area_average_and_same_size_is_a_copy():
    x = _img(12, 18, seed=4)
    for size in [(6, 9), (5, 7), (12, 9), (4, 18), (1, 1)]:
        want = torch.einsum("oh,bchw,pw->bcop", area_weights(12, size[0]), x, area_weights(18, size[1]))
        assert torch.equal(resize_area(x, size), want)
    assert torch.equal(resize_area(x, (12, 18)), x)
    assert torch.equal(resize_cv2(x, (6, 9), "area"), resize_area(x, (6, 9)))


@pytest.mark.parametrize("n_in,n_out", [(1, 5), (3, 7), (6, 34), (64, 98), (20, 20), (9, 4), (17, 11)])
def test_area_linear_weights_rows_sum_to_one(n_in, n_out):
    w = area_linear_weights(n_in, n_out)
    assert torch.allclose(w.sum(1), torch.ones(n_out, dtype=torch.float64), atol=1e-7)
    assert int((w > 0).sum(1).max()) <= 2


# ---------------------------------------------------------------- against OpenCV
SIZES = [
    ((64, 64), (32, 32)),    # integer downscale (resizeAreaFast_)
    ((64, 64), (16, 16)),
    ((30, 45), (10, 15)),
    ((64, 64), (23, 37)),    # non-integer downscale (resizeArea_)
    ((50, 41), (33, 40)),
    ((64, 64), (101, 77)),   # upscale both
    ((64, 64), (98, 64)),    # 64 -> 98 rows hits the boundary quirk at row 49; width unchanged
    ((64, 64), (98, 128)),
    ((6, 9), (34, 20)),
    ((30, 20), (85, 60)),
    ((64, 64), (15, 192)),   # shrink rows, enlarge columns: bilinear emulation on both axes
    ((30, 20), (78, 11)),    # enlarge rows, shrink columns
    ((1, 7), (4, 3)),
    ((7, 1), (3, 4)),
]


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_area_matches_opencv(src, dst):
    cv2 = pytest.importorskip("cv2", reason="opencv-python(-headless) is not installed")
    img = np.random.default_rng(src[0] * 1000 + dst[1]).random((*src, 3)).astype(np.float32)
    want = cv2.resize(img, (dst[1], dst[0]), interpolation=cv2.INTER_AREA)
    got = resize_area(torch.from_numpy(img).permute(2, 0, 1)[None], dst)[0].permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-6  # float32 rounding only (measured <= 2.4e-7 on 3000 random sizes)


def test_resize_area_matches_opencv_on_random_sizes():
    cv2 = pytest.importorskip("cv2", reason="opencv-python(-headless) is not installed")
    rng = np.random.default_rng(7)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 48, size=2))
        oh, ow = (int(v) for v in rng.integers(1, 120, size=2))
        img = rng.random((h, w, 3)).astype(np.float32)
        want = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_AREA).reshape(oh, ow, 3)
        got = resize_area(torch.from_numpy(img).permute(2, 0, 1)[None], (oh, ow))[0].permute(1, 2, 0).numpy()
        assert np.abs(got - want).max() < 1e-6, ((h, w), (oh, ow))


def test_old_area_overlap_upscale_would_miss_opencv_by_a_full_pixel_step():
    """Documents why the enlargement path is not the area-overlap matrix: 64 -> 98, output row 49."""
    cv2 = pytest.importorskip("cv2", reason="opencv-python(-headless) is not installed")
    img = np.zeros((64, 1), np.float32)
    img[32] = 1.0  # only source row 32 is bright
    want = cv2.resize(img, (1, 98), interpolation=cv2.INTER_AREA).reshape(98)
    assert want[49] == 0.0 and math.isclose(float(area_weights(64, 98)[49, 32]), 1.0)
    got = resize_area(torch.from_numpy(img)[None, None], (98, 1)).reshape(98).numpy()
    assert np.abs(got - want).max() < 1e-6

"""G-STD and L-STD (CCSR Sec. 4.2, Eq. 4; spec §5) on synthetic arrays against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from sr_lab.eval.stability import g_std, g_std_from_scores, l_std, l_std_image, per_image_std, pixel_std_map


def test_g_std_is_mean_over_images_of_population_std_over_runs():
    values = [[1.0, 3.0],   # std 1
              [2.0, 2.0],   # std 0
              [0.0, 4.0]]   # std 2
    assert per_image_std(values).tolist() == [1.0, 0.0, 2.0]
    assert g_std(values) == pytest.approx(1.0)
    # three runs: (0, 3, 6) -> population std sqrt(6) (the sample std would be 3)
    assert g_std([[0.0, 3.0, 6.0]]) == pytest.approx(math.sqrt(6.0))


def test_g_std_of_one_run_is_zero():
    assert g_std([[5.0], [7.0], [1.5]]) == 0.0
    assert l_std_image(torch.rand(1, 3, 16, 16)) == 0.0


def test_g_std_from_scores_dict():
    scores = {"b": {"seed_0": 10.0, "seed_1": 14.0}, "a": {"seed_0": 1.0, "seed_1": 1.0}}
    gs, per = g_std_from_scores(scores)
    assert per == {"a": 0.0, "b": 2.0} and gs == pytest.approx(1.0)


def test_l_std_is_mean_of_per_pixel_std_not_root_of_mean_variance():
    # 2 runs of a 3 x 12 x 12 image; inside the 4-px border: left half differs by 0.2, right half by 0.6
    runs = torch.zeros(2, 3, 12, 12, dtype=torch.float64)
    runs[1, :, :, :6] = 0.2   # std 0.1 per pixel
    runs[1, :, :, 6:] = 0.6   # std 0.3 per pixel
    assert l_std_image(runs, crop_border=4) == pytest.approx((0.1 + 0.3) / 2)  # not sqrt((0.01 + 0.09) / 2)
    assert pixel_std_map(runs, 4).shape == (3, 4, 4)


def test_l_std_crops_four_pixels_by_default():
    runs = torch.zeros(3, 3, 16, 16, dtype=torch.float64)
    runs[:, :, :4] = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64).view(3, 1, 1, 1)  # only the border varies
    assert l_std_image(runs) == 0.0
    assert l_std_image(runs, crop_border=0) == pytest.approx(math.sqrt(0.06) * 4 / 16)
    with pytest.raises(ValueError, match="too small"):
        l_std_image(torch.zeros(2, 3, 8, 8))


def test_l_std_over_images_and_against_numpy():
    rng = np.random.default_rng(0)
    imgs = [rng.random((4, 3, 20, 24)), rng.random((4, 3, 10, 30))]
    want = np.mean([x[:, :, 4:-4, 4:-4].std(axis=0, ddof=0).mean() for x in imgs])
    assert l_std([torch.from_numpy(x) for x in imgs]) == pytest.approx(want, abs=1e-12)

"""Y-channel PSNR/SSIM against independent computations on the shipped sample photos."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from sr_lab.data import sample_image_dir
from sr_lab.metrics.psnr_ssim import psnr_y, rgb_to_y, ssim_y


def photo(name):
    img = np.asarray(Image.open(Path(sample_image_dir()) / name).convert("RGB"), dtype=np.float64) / 255.0
    return img[:128, :160]


def y_numpy(img):  # BT.601 studio swing, MATLAB rgb2ycbcr, 0-255 scale
    return 16.0 + img @ np.array([65.481, 128.553, 24.966])


def to_t(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None].float()


@pytest.fixture(scope="module")
def pair():
    hr = photo("astronaut.png")
    rng = np.random.default_rng(0)
    sr = np.clip(hr + rng.normal(0, 0.03, hr.shape), 0, 1)
    return to_t(sr).double().float(), to_t(hr)


def test_y_conversion_range_and_values():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    y = rgb_to_y(x).flatten().tolist()
    assert y == pytest.approx([16.0, 235.0, 16.0 + 65.481])


def test_psnr_y_matches_numpy(pair):
    sr, hr = pair
    for border in (0, 4):
        a, b = y_numpy(sr[0].permute(1, 2, 0).double().numpy()), y_numpy(hr[0].permute(1, 2, 0).double().numpy())
        if border:
            a, b = a[border:-border, border:-border], b[border:-border, border:-border]
        want = 10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))
        assert float(psnr_y(sr, hr, border)[0]) == pytest.approx(want, abs=1e-4)


def test_ssim_y_matches_skimage_gaussian_ssim(pair):
    sr, hr = pair
    a, b = y_numpy(sr[0].permute(1, 2, 0).double().numpy()), y_numpy(hr[0].permute(1, 2, 0).double().numpy())
    a, b = a[4:-4, 4:-4], b[4:-4, 4:-4]
    want = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert float(ssim_y(sr, hr, 4)[0]) == pytest.approx(want, abs=1e-4)


def test_identical_images_and_batch(pair):
    sr, hr = pair
    assert torch.isinf(psnr_y(hr, hr)).all()
    assert float(ssim_y(hr, hr)[0]) == pytest.approx(1.0, abs=1e-9)
    both = psnr_y(torch.cat([sr, hr]), torch.cat([hr, hr]))
    assert both.shape == (2,) and torch.isfinite(both[0]) and torch.isinf(both[1])
    with pytest.raises(ValueError):
        psnr_y(sr, hr[..., :-1])

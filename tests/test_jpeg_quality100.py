"""DiffJPEG at quality 100 is not the identity: quantisation is skipped, but chroma 4:2:0 and the
output clamp remain (sr_lab.degradation.jpeg module docstring)."""
import pytest
import torch
import torch.nn.functional as F

from sr_lab.degradation import jpeg


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return torch.from_numpy(data.astronaut()[100:164, 180:244].copy()).permute(2, 0, 1)[None].float() / 255.0


def test_quality_100_changes_a_colourful_image_by_a_small_nonzero_amount(photo):
    err = (jpeg.diff_jpeg(photo, 100.0) - photo).abs() * 255
    # Measured on this 64x64 astronaut crop (float32, torch 2.x CPU): mean 1.446, max 15.818 (8-bit levels);
    # bounds leave a little room for float rounding but fail if q=100 became the identity or real JPEG.
    assert 1.40 < float(err.mean()) < 1.50
    assert 15.5 < float(err.max()) < 16.1
    assert float((err > 0.5).float().mean()) > 0.5  # most pixels move by more than half a level


def test_quality_100_is_exactly_chroma_420_plus_clamp(photo):
    """With quantisation skipped, the only change is the 2x2 chroma average/repeat and the [0, 255] clamp."""
    x = photo.double()
    ycc = jpeg.rgb_to_ycbcr_jfif(x * 255)
    chroma = F.avg_pool2d(ycc[:, 1:], 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    want = jpeg.ycbcr_jfif_to_rgb(torch.cat([ycc[:, :1], chroma], 1)).clamp(0, 255) / 255
    assert torch.allclose(jpeg.diff_jpeg(x, 100.0), want, atol=1e-12)  # float64: DCT round trip is exact
    assert torch.allclose(jpeg.diff_jpeg(photo, 100.0).double(), want, atol=1e-6)  # float32: measured 4e-7

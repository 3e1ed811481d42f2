"""Evaluation metrics: PSNR/SSIM through pyiqa vs sr_lab's BasicSR formulas vs independent numpy,
the pyiqa pitfalls (spec degradation_and_metrics.md §4.2), and graceful degradation when weight
files or openai-clip's pkg_resources are missing (§4.3)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from scipy.signal import correlate2d

from sr_lab.data import sample_image_dir
from sr_lab.metrics.psnr_ssim import psnr_y, ssim_y

pyiqa = pytest.importorskip("pyiqa")

from sr_lab.eval import weights as W  # noqa: E402
from sr_lab.eval.metrics import build_metrics  # noqa: E402

CPU = torch.device("cpu")


def photo(name, h=120, w=152):
    return np.asarray(Image.open(Path(sample_image_dir()) / name).convert("RGB"), dtype=np.float64)[:h, :w] / 255.0


@pytest.fixture(scope="module")
def pairs():
    """(SR, HR) pairs: sample photos and noisy versions of them, quantised to 8 bit like PNGs."""
    rng = np.random.default_rng(0)
    out = []
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        hr = np.round(photo(name) * 255) / 255
        sr = np.round(np.clip(hr + rng.normal(0, 0.05, hr.shape), 0, 1) * 255) / 255  # Y-PSNR ~ 31 dB
        out.append((sr, hr))
    return out


def t(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None].double()


def y_np(img):  # BT.601 studio swing (MATLAB rgb2ycbcr), 0-255 scale, no rounding
    return 16.0 + img @ np.array([65.481, 128.553, 24.966])


def gauss11():
    r = np.arange(11) - 5.0
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_np(a, b, relu=False):
    """Wang et al. SSIM with BasicSR's constants on 0-255 arrays: Gaussian 11x11 σ 1.5, 'valid'."""
    w = gauss11()
    f = lambda x: correlate2d(x, w, mode="valid")  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = f(a), f(b)
    saa, sbb, sab = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    cs = (2 * sab + c2) / (saa + sbb + c2)
    if relu:
        cs = np.maximum(cs, 0)
    return float(np.mean((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs))


@pytest.fixture(scope="module")
def built():
    return build_metrics(["psnr", "ssim"], device=CPU, psnr_ssim_impl="pyiqa")


def test_y_conversion_of_pyiqa_ycbcr_equals_basicsr_formula(pairs):
    from pyiqa.utils.color_util import to_y_channel

    sr, _ = pairs[0]
    y = to_y_channel(t(sr), 1.0, "ycbcr")[0, 0].numpy() * 255  # no rounding for data range 1
    assert np.abs(y - y_np(sr)).max() < 1e-3  # pyiqa builds its matrix in float32


@pytest.mark.parametrize("border", [0, 4])
def test_pyiqa_psnr_ycbcr_agrees_with_basicsr_formula_to_1e_4_db(pairs, built, border):
    metrics, cross, _ = built
    assert metrics["psnr"].source.startswith("pyiqa") and cross["psnr"].impl == "sr_lab"
    for sr, hr in pairs:
        a, b = y_np(sr), y_np(hr)
        if border:
            a, b = a[border:-border, border:-border], b[border:-border, border:-border]
        want = 10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))  # BasicSR calculate_psnr, test_y_channel
        x, y = t(sr), t(hr)
        if border:
            x, y = x[..., border:-border, border:-border], y[..., border:-border, border:-border]
        ours = float(psnr_y(x, y)[0])
        theirs = float(metrics["psnr"].fn(x, y)[0])
        assert ours == pytest.approx(want, abs=1e-6)
        # pyiqa computes 10 log10(1 / (mse + 1e-8)) on the [0, 1] scale: the eps costs
        # 10 log10(1 + 1e-8 / mse) dB (< 1e-4 dB below ~33.6 dB); removing it gives BasicSR's value
        assert theirs == pytest.approx(want, abs=1e-4)
        mse01 = 10 ** (-theirs / 10) - 1e-8
        assert -10 * np.log10(mse01) == pytest.approx(want, abs=1e-5)


def test_pyiqa_psnr_defaults_are_not_the_papers_convention(pairs):
    """Spec §4.2 pitfall: pyiqa's plain `psnr` is RGB, and its Y default is YIQ, not YCbCr."""
    sr, hr = pairs[0]
    want = float(psnr_y(t(sr), t(hr))[0])
    rgb = float(pyiqa.create_metric("psnr", device=CPU)(t(sr), t(hr)))
    yiq = float(pyiqa.create_metric("psnry", device=CPU)(t(sr), t(hr)))
    assert abs(rgb - want) > 0.05 and abs(yiq - want) > 0.05


def test_srlab_ssim_matches_independent_numpy_to_1e_4(pairs):
    for sr, hr in pairs:
        want = ssim_np(y_np(sr)[4:-4, 4:-4], y_np(hr)[4:-4, 4:-4])
        got = float(ssim_y(t(sr)[..., 4:-4, 4:-4], t(hr)[..., 4:-4, 4:-4])[0])
        assert got == pytest.approx(want, abs=1e-4)


def test_pyiqa_ssim_is_basicsr_ssim_on_rounded_y_with_relu(pairs, built):
    """Documented difference: pyiqa rounds Y (0-255) and clamps the contrast-structure map at 0."""
    metrics, cross, _ = built
    for sr, hr in pairs:
        want = ssim_np(np.round(y_np(sr)), np.round(y_np(hr)), relu=True)
        got = float(metrics["ssim"].fn(t(sr), t(hr))[0])
        basicsr = float(cross["ssim"].fn(t(sr), t(hr))[0])
        assert got == pytest.approx(want, abs=1e-5)
        assert 0 < abs(got - basicsr) < 5e-3


def test_reported_implementation_is_selectable():
    metrics, cross, _ = build_metrics(["psnr", "ssim"], device=CPU, psnr_ssim_impl="sr_lab")
    assert metrics["psnr"].impl == "sr_lab" and cross["psnr"].impl == "pyiqa"


def test_missing_weight_gives_one_message_and_other_metrics_still_run(tmp_path, monkeypatch, caplog, pairs):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("SR_LAB_WEIGHTS", raising=False)
    empty = tmp_path / "weights"
    empty.mkdir()
    metrics, _, unavailable = build_metrics(["psnr", "ssim", "lpips", "niqe"], device=CPU, weights_dir=empty)
    assert set(metrics) == {"psnr", "ssim"} and set(unavailable) == {"lpips", "niqe"}
    msg = unavailable["lpips"]
    assert "\n" not in msg and "LPIPS_v0.1_alex-df73285e.pth" in msg and "alexnet-owt-7be5be79.pth" in msg
    assert str(empty) in msg
    assert "niqe_modelparameters.mat" in unavailable["niqe"]
    assert sum("lpips unavailable" in r.getMessage() for r in caplog.records) == 1
    sr, hr = pairs[0]
    assert float(metrics["psnr"].fn(t(sr), t(hr))[0]) > 20


def test_metric_loads_from_local_weights_folder_without_network(tmp_path, monkeypatch):
    """NIQE from a synthetic parameter file in metrics.weights_dir (values meaningless, loading real)."""
    import torch.hub
    from pyiqa.utils import download_util

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    wdir = tmp_path / "weights"
    wdir.mkdir()
    scipy.io.savemat(wdir / "niqe_modelparameters.mat", {"mu_prisparam": np.zeros((1, 36)), "cov_prisparam": np.eye(36)})
    before = (getattr(torch.hub, "_hub_dir", None), download_util.DEFAULT_CACHE_DIR)
    metrics, _, unavailable = build_metrics(["niqe"], device=CPU, weights_dir=wdir)
    assert unavailable == {} and metrics["niqe"].source.startswith("pyiqa niqe")
    assert (getattr(torch.hub, "_hub_dir", None), download_util.DEFAULT_CACHE_DIR) == before  # restored
    score = metrics["niqe"].fn(torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(0)))
    assert score.shape == (1,) and torch.isfinite(score).all()
    assert W.locate(W.required_files("niqe")[0], wdir) == wdir / "niqe_modelparameters.mat"


def test_missing_pkg_resources_only_disables_clipiqa(monkeypatch, tmp_path):
    for mod in [m for m in sys.modules if m == "clip" or m.startswith("clip.") or m == "pyiqa.archs.clip_imports"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # import pkg_resources -> ModuleNotFoundError
    metrics, _, unavailable = build_metrics(["psnr", "clipiqa"], device=CPU, weights_dir=tmp_path)
    assert "psnr" in metrics
    assert "pkg_resources" in unavailable["clipiqa"] and "setuptools<81" in unavailable["clipiqa"]


def test_every_metric_names_its_weight_files():
    from sr_lab.eval.metrics import MANIQA_CHECKPOINTS, METRICS

    for name, spec in METRICS.items():
        files = W.required_files(spec.pyiqa_name)
        assert (files == ()) == (name in ("psnr", "ssim")), name
    assert [f.name for f in W.required_files(MANIQA_CHECKPOINTS["pipal"])] == ["MANIQA_PIPAL-ae6d356b.pth"]
    assert [f.name for f in W.required_files("fid")] == ["pt_inception-2015-12-05-6726825d.pth"]


def _standin_weights(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        torch.save({}, folder / n)
    return folder


def test_reference_network_metric_path_with_standin_weights(tmp_path, monkeypatch, pairs):
    """LPIPS through real pyiqa: the files are stand-ins (empty LPIPS head, AlexNet built without
    ImageNet weights), so the values are meaningless, but lookup, staging, construction and the
    float32 per-image call are the real ones."""
    import torchvision
    from pyiqa.archs import lpips_arch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    real_alexnet = torchvision.models.alexnet
    monkeypatch.setattr(lpips_arch.models, "alexnet", lambda weights=None, **k: real_alexnet(weights=None, **k))
    wdir = _standin_weights(tmp_path / "w", ["LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"])
    metrics, _, unavailable = build_metrics(["lpips"], device=CPU, weights_dir=wdir)
    assert unavailable == {}
    sr, hr = pairs[0]
    v = metrics["lpips"].fn(t(sr), t(hr))
    assert v.shape == (1,) and torch.isfinite(v).all()
    assert float(metrics["lpips"].fn(t(hr), t(hr))[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow  # ~10-50 s on 2 CPU cores: pyiqa's sqrtm of two 2048x2048 covariances per run
def test_fid_folder_metric_path_with_standin_weights(tmp_path, monkeypatch, pairs):
    """FID (GT folder vs SR folder, only the scored pairs) through real pyiqa with a random
    Inception (weight loading stubbed): the call path and the per-run bookkeeping are real."""
    from pyiqa.archs import inception

    from sr_lab.eval.score import discover_runs, score_runs

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(inception, "load_pretrained_network", lambda *a, **k: None)
    wdir = _standin_weights(tmp_path / "w", ["pt_inception-2015-12-05-6726825d.pth"])
    for i, (sr, hr) in enumerate(pairs):
        for d, img in (("hr", hr), ("sr/seed_0", sr), ("sr/seed_1", np.flip(sr, 1))):
            (tmp_path / d).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp_path / d / f"im{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sr" / "seed_1" / "extra.png")  # not paired
    torch.manual_seed(0)
    metrics, cross, unavailable = build_metrics(["psnr", "fid"], device=CPU, weights_dir=wdir)
    assert "fid" in metrics and unavailable == {}
    res = score_runs(discover_runs(tmp_path / "sr"), tmp_path / "hr", metrics, cross, unavailable, crop_border=4,
                     fid_opts={"batch_size": 2, "num_workers": 0, "mode": "clean"})
    fid = res.set_scores["fid"]
    assert set(fid) == {"seed_0", "seed_1"} and all(np.isfinite(v) and v >= 0 for v in fid.values())
    s = res.metric_summary("fid")
    assert s["g_std"] is None and s["std_over_runs"] == pytest.approx(np.std(list(fid.values())))

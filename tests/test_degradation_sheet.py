"""``sr-degradation-sheet``: one HR crop under N seeds of a degradation as one PNG grid (layout, nearest
upsampling, determinism, one-line config errors), plus ``sr-make-testset`` with a degradation that is
neither Real-ESRGAN nor BSRGAN (the generic ``last_traces`` hook, no ``resize_lr_to_hr`` option)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from sr_lab.config.validation import ConfigError
from sr_lab.degradation.sheet import default_image, render_sheet, sheet_size
from sr_lab.train import CONF_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
CROP, GAP = 64, 4


def compose_cfg(name, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_sheet"):
        return compose(config_name=name, overrides=list(overrides))


def sheet_cfg(out, *overrides):
    return compose_cfg("degradation_sheet", [f"out={out}", "seeds=3", f"crop={CROP}", "device=cpu", *overrides])


def tiles(path, n, cols=4, crop=CROP, gap=GAP):
    a = np.asarray(Image.open(path).convert("RGB"))
    out = []
    for k in range(n):
        r, c = divmod(k, min(cols, n))
        y, x = r * (crop + gap), c * (crop + gap)
        out.append(a[y : y + crop, x : x + crop])
    return a, out


# ---------------------------------------------------------------- custom degradations (no resize_lr_to_hr)
class PlainDegradation(torch.nn.Module):
    """Average-pool + seeded noise; ``deg(hr, generator) -> {"hr", "lr"}`` like the degradation group."""

    def __init__(self, scale: int = 4, strength: float = 0.2):
        super().__init__()
        self.scale, self.strength = scale, strength

    def draw(self, hr, generator):
        level = float(torch.rand((), generator=generator, device=hr.device)) * self.strength
        lr = F.avg_pool2d(hr, self.scale)
        noise = torch.randn(lr.shape, generator=generator, device=hr.device)
        return level, {"hr": hr, "lr": (lr + level * noise).clamp(0, 1)}

    def forward(self, hr, generator):
        return self.draw(hr, generator)[1]


class TracingDegradation(PlainDegradation):
    """Keeps ``last_traces``: one JSON-able entry per image of the last call (what testset records)."""

    def __init__(self, scale: int = 4, strength: float = 0.2):
        super().__init__(scale, strength)
        self.last_traces = []

    def forward(self, hr, generator):
        level, out = self.draw(hr, generator)
        self.last_traces = [[{"op": "avg_pool", "scale": self.scale}, {"op": "noise", "level": level}]] * hr.shape[0]
        return out


class StaleTraceDegradation(PlainDegradation):
    """Has ``last_traces`` but never updates it: nothing stale may reach the manifest."""

    def __init__(self, scale: int = 4):
        super().__init__(scale)
        self.last_traces = [{"stale": True}]


def with_degradation(cfg, cls, **kw):
    cfg.degradation = OmegaConf.create({"_target_": f"{__name__}.{cls.__name__}", "scale": "${upscale}", **kw})
    return cfg


# ---------------------------------------------------------------- the sheet
def test_default_image_is_a_colourful_sample():
    assert os.path.basename(default_image()) in ("astronaut.png", "chelsea.png", "coffee.png")


@pytest.mark.parametrize("degradation", ["bicubic", "realesrgan"])
def test_sheet_grid_size_tiles_and_nearest_upsampling(degradation, tmp_path):
    out = tmp_path / "sheet.png"
    res = render_sheet(sheet_cfg(out, f"degradation={degradation}", "label=false"))
    assert res.path == out and out.is_file() and res.degradation.endswith("Degradation")
    # 1 HR + 3 seeds = 4 tiles, cols=4: one row of 4 tiles, 3 gaps
    assert (res.width, res.height) == (4 * CROP + 3 * GAP, CROP) == sheet_size(4, 4, CROP, GAP)
    a, (hr, *lrs) = tiles(out, 4)
    assert a.shape == (CROP, 4 * CROP + 3 * GAP, 3)
    assert (a[:, CROP : CROP + GAP] == 255).all()  # the gap is background
    src = np.asarray(Image.open(default_image()).convert("RGB"))
    top, left = (src.shape[0] - CROP) // 2, (src.shape[1] - CROP) // 2
    assert np.array_equal(hr, src[top : top + CROP, left : left + CROP])  # the original centre crop
    for t in lrs:  # a 16x16 LR (resize_lr_to_hr forced off) blown up 4x by nearest neighbour
        assert np.array_equal(np.repeat(np.repeat(t[::4, ::4], 4, 0), 4, 1), t)
    if degradation == "bicubic":  # no randomness: every seed gives the same LR
        assert all(np.array_equal(lrs[0], t) for t in lrs[1:])
    else:
        assert not np.array_equal(lrs[0], lrs[1]) and not np.array_equal(lrs[1], lrs[2])
        assert not np.array_equal(lrs[0], lrs[2])


def test_sheet_is_deterministic_and_follows_seed(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    render_sheet(sheet_cfg(a))
    render_sheet(sheet_cfg(b))
    render_sheet(sheet_cfg(c, "seed=1"))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_sheet_rows_labels_and_crop_box(tmp_path):
    out, plain = tmp_path / "rows.png", tmp_path / "plain.png"
    res = render_sheet(sheet_cfg(out, "degradation=bicubic", "seeds=5", "cols=3", "crop_box=[0,8]"))
    assert (res.width, res.height) == (3 * CROP + 2 * GAP, 2 * CROP + GAP) == sheet_size(6, 3, CROP, GAP)
    render_sheet(sheet_cfg(plain, "degradation=bicubic", "seeds=5", "cols=3", "crop_box=[0,8]", "label=false"))
    _, labelled = tiles(out, 6, cols=3)
    _, bare = tiles(plain, 6, cols=3)
    src = np.asarray(Image.open(default_image()).convert("RGB"))
    assert np.array_equal(bare[0], src[:CROP, 8 : 8 + CROP])
    for t, u in zip(labelled, bare):  # the label sits in the top-left corner, the rest is the tile
        assert not np.array_equal(t[:12, :24], u[:12, :24]) and np.array_equal(t[32:], u[32:])


def test_sheet_with_a_degradation_without_resize_lr_to_hr(tmp_path):
    out = tmp_path / "custom.png"
    res = render_sheet(with_degradation(sheet_cfg(out, "label=false"), TracingDegradation), name="custom")
    assert res.degradation == "custom" and (res.width, res.height) == sheet_size(4, 4, CROP, GAP)
    _, (_, *lrs) = tiles(out, 4)
    assert not np.array_equal(lrs[0], lrs[1])


@pytest.mark.parametrize("override, key", [
    ("seeds=0", "seeds="), ("crop=66", "crop=66"), ("crop=1024", "crop=1024"), ("cols=0", "cols="),
    ("crop_box=[480,0]", "crop_box="), ("out=sheet.jpg", "out="), ("device=tpu", "device="),
])
def test_sheet_bad_values_name_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        render_sheet(sheet_cfg(tmp_path / "x.png", override))
    assert not (tmp_path / "x.png").exists()


def test_sheet_unreadable_or_missing_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match="image=.*cannot be read"):
        render_sheet(sheet_cfg(tmp_path / "x.png", f"image={bad}"))
    with pytest.raises(ConfigError, match="image=.*does not exist"):
        render_sheet(sheet_cfg(tmp_path / "x.png", f"image={tmp_path / 'missing.png'}"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sr_lab.degradation.sheet", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_one_line_and_bad_value_exits_2(tmp_path):
    out = tmp_path / "cli.png"
    proc = _cli("degradation=bicubic", "seeds=2", f"crop={CROP}", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    w, h = sheet_size(3, 4, CROP, GAP)
    assert lines == [f"{out}: degradation=bicubic, 2 seeds, {w}x{h} px"]
    assert Image.open(out).size == (w, h)

    proc = _cli("seeds=0", f"out={tmp_path / 'bad.png'}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err == ["config error: seeds=0 must be a positive integer"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------- sr-make-testset with any degradation
@pytest.mark.parametrize("cls, drawn", [
    (TracingDegradation, {"trace": [{"op": "avg_pool", "scale": 4}, {"op": "noise"}]}),
    (PlainDegradation, {}),
    (StaleTraceDegradation, {}),
])
def test_testset_records_last_traces_of_any_degradation(cls, drawn, tmp_path):
    from sr_lab.eval.testset import make_testset

    out = tmp_path / "set"
    cfg = compose_cfg("testset", [f"out_dir={out}", f"paths.output_dir={out}", "crop_size=32", "crop=center",
                                  "max_images=1", "device=cpu"])
    make_testset(with_degradation(cfg, cls))
    man = json.loads((out / "manifest.json").read_text())
    assert man["degradation"]["_target_"].endswith(cls.__name__) and "resize_lr_to_hr" not in man["degradation"]
    assert man["degradation_forced"] == {}
    (pair,) = man["pairs"]
    assert pair["lr_size"] == [8, 8] and pair["hr_size"] == [32, 32]
    if drawn:
        trace = pair["drawn"]["trace"]
        assert trace[0] == drawn["trace"][0] and trace[1]["op"] == "noise" and 0 <= trace[1]["level"] <= 0.2
    else:
        assert pair["drawn"] == {}

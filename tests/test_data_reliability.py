"""HR folder reliability: unusable folders refused by the config check (one line, before any model is
built), symlink loops listed once, GIF first frames read, skipped files counted once and listed in the
run folder."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import hydra.utils
import numpy as np
import pytest
from helpers import FAST, compose_train
from PIL import Image

from sr_lab.callbacks import DataSkipReport
from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.data import (
    HRFolderDataset,
    SRDataModule,
    check_hr_folder,
    find_images,
    read_rgb_uint8,
)
from sr_lab.data import folder as folder_mod

CROP = 64  # FAST's data.crop_size


def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _truncated(path: Path, seed: int = 0) -> Path:
    """A PNG whose header is intact (probes fine) but whose pixel data is cut: fails only when decoded."""
    _png(path, 96, 96, seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cfg(tmp_path: Path, *overrides: str):
    return compose_train([*FAST, *overrides], tmp_path / "run")


def _config_error(cfg) -> str:
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- item 1: unusable folders
def test_unreadable_folder_is_one_line_config_error(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    (d / "fake.png").write_text("not an image")  # header unreadable
    _truncated(d / "trunc.png")  # header fine, pixels not: the old check and the data module's probe pass it
    _png(d / "small.png", 40, 40)
    (d / "notes.txt").write_text("ignored, not an image file")
    msg = _config_error(_cfg(tmp_path, f"data.hr_dirs=[{d}]"))
    assert msg == f"data.hr_dirs: no readable image of at least {CROP} px in {d} (3 files: 2 unreadable, 1 smaller than the crop)"


def test_empty_folder_is_one_line_config_error(tmp_path):
    d = tmp_path / "empty"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "readme.txt").write_text("no image here")
    msg = _config_error(_cfg(tmp_path, f"data.hr_dirs={d}"))
    assert msg == (f"data.hr_dirs: no readable image of at least {CROP} px in {d} "
                   "(no .bmp/.gif/.jpeg/.jpg/.png/.tif/.tiff/.webp file, sub-folders included)")


def test_val_dirs_and_each_listed_folder_are_checked(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir(), empty.mkdir()
    _png(good / "a.png", 80, 72)
    validate_config(_cfg(tmp_path, f"data.hr_dirs=[{good}]", f"data.val_dirs=[{good}]"))  # passes
    msg = _config_error(_cfg(tmp_path, f"data.hr_dirs=[{good},{empty}]"))
    assert msg.startswith(f"data.hr_dirs: no readable image of at least {CROP} px in {empty} (no .bmp/")
    msg = _config_error(_cfg(tmp_path, f"data.hr_dirs=[{good}]", f"data.val_dirs=[{empty}]"))
    assert msg.startswith(f"data.val_dirs: no readable image of at least {CROP} px in {empty}")
    msg = _config_error(_cfg(tmp_path, f"data.hr_dirs=[{good}]", "data.crop_size=96"))
    assert msg.endswith("px in " + str(good) + " (1 file: 0 unreadable, 1 smaller than the crop)")


@pytest.mark.parametrize("content", ["unreadable", "empty"])
def test_train_run_refuses_before_building_anything(tmp_path, monkeypatch, content):
    d = tmp_path / "hr"
    d.mkdir()
    if content == "unreadable":
        _truncated(d / "a.png", 1)
        _truncated(d / "b.png", 2)

    def no_build(*args, **kwargs):
        raise AssertionError("something was instantiated before the config error")

    monkeypatch.setattr(hydra.utils, "instantiate", no_build)
    from sr_lab.train import run

    with pytest.raises(ConfigError, match=r"^data\.hr_dirs: no readable image of at least 64 px in "):
        run(_cfg(tmp_path, f"data.hr_dirs=[{d}]"))


def test_folder_check_stops_at_the_first_usable_file(tmp_path, monkeypatch):
    d = tmp_path / "big"
    d.mkdir()
    _png(d / "a000.png", 80, 80)
    for i in range(1, 60):
        (d / f"a{i:03d}.png").write_text("never probed")
    probed = []
    real_probe = folder_mod._probe
    monkeypatch.setattr(folder_mod, "_probe", lambda p: probed.append(p) or real_probe(p))
    found = check_hr_folder(d, CROP)
    assert found.usable == str(d / "a000.png") and found.files == 60
    assert len(probed) <= 8  # one small first chunk, not the folder


# ---------------------------------------------------------------- item 2: symlink loops
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_lists_each_file_once_and_warns_once(tmp_path, caplog):
    d = tmp_path / "hr"
    (d / "sub").mkdir(parents=True)
    _png(d / "a.png", 80, 80, 1)
    _png(d / "sub" / "b.png", 80, 80, 2)
    os.symlink(".", d / "loop")  # the reported case: one image counted 41 times
    os.symlink("sub", d / "alias")  # a second way into a folder: no loop, no warning, no duplicates
    os.symlink("a.png", d / "same.png")  # a second name for a file
    up = tmp_path / "up"  # a loop through the parent, in its own tree (two loops together take the old
    (up / "deep").mkdir(parents=True)  # recursive walk exponential time)
    _png(up / "c.png", 80, 80, 3)
    os.symlink("..", up / "deep" / "up")
    with caplog.at_level(logging.WARNING, logger="sr_lab.data"):
        files = find_images(d)
        again = find_images([d, d / "sub"])  # overlapping roots; no second warning for the same link
        other = find_images(up)
    assert files == again == [str(d / "a.png"), str(d / "sub" / "b.png")]
    assert other == [str(up / "c.png")]
    warns = [r.getMessage() for r in caplog.records if r.name == "sr_lab.data"]
    assert len(warns) == 2 and all(w.startswith("symlink loop: ") for w in warns)
    assert str(d / "loop") in warns[0] and str(up / "deep" / "up") in warns[1]
    assert len(HRFolderDataset(files, CROP, seed=0)) == 2


# ---------------------------------------------------------------- item 3: GIF
def test_gif_first_frame_is_read(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    idx = np.zeros((72, 80), np.uint8)
    idx[:, 40:] = 1
    first = Image.fromarray(idx, "P")
    first.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    second = Image.fromarray(np.full((72, 80), 2, np.uint8), "P")
    second.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    first.save(d / "anim.GIF", save_all=True, append_images=[second], transparency=0, duration=50)
    assert find_images(d) == [str(d / "anim.GIF")]
    arr, note = read_rgb_uint8(d / "anim.GIF")
    assert arr.shape == (72, 80, 3) and arr.dtype == np.uint8 and note
    assert (arr[:, :40] == 255).all()  # transparent -> white
    assert (arr[:, 40:] == [0, 0, 255]).all()  # first frame, not the green second one
    ds = HRFolderDataset(find_images(d), CROP, seed=0)
    assert len(ds) == 1 and ds[0]["hr"].shape == (3, CROP, CROP) and ds[0]["skipped"] == -1


# ---------------------------------------------------------------- item 4: skip report
def _fake_trainer(dm, out_dir, epoch=0):
    return SimpleNamespace(datamodule=dm, is_global_zero=True, world_size=1, current_epoch=epoch,
                           default_root_dir=str(out_dir))


def test_skip_summary_only_when_the_list_changes(tmp_path, caplog):
    dm = SimpleNamespace(skipped={}, skipped_files=None)
    dm.skipped_files = lambda: dict(dm.skipped)
    cb = DataSkipReport(output_dir=tmp_path / "run")
    stale = tmp_path / "run" / DataSkipReport.FILE_NAME
    stale.parent.mkdir()
    stale.write_text("old\tlist\n")
    with caplog.at_level(logging.WARNING, logger="sr_lab.callbacks"):
        for epoch, new in enumerate([None, "x.png", None, None, "y.png", None]):
            if new:
                dm.skipped[new] = "failed at load time (truncated)"
            cb.on_train_epoch_end(_fake_trainer(dm, tmp_path, epoch), None)
    warns = [r.getMessage() for r in caplog.records if r.name == "sr_lab.callbacks"]
    assert len(warns) == 2
    assert warns[0].startswith("epoch 1: 1 HR file(s) not used so far (1 new: x.png)")
    assert warns[1].startswith("epoch 4: 2 HR file(s) not used so far (1 new: y.png)")
    cb.on_train_end(_fake_trainer(dm, tmp_path), None)
    assert stale.read_text() == "x.png\tfailed at load time (truncated)\ny.png\tfailed at load time (truncated)\n"
    dm.skipped.clear()
    cb.on_train_end(_fake_trainer(dm, tmp_path), None)
    assert not stale.exists()  # nothing skipped: no stale list of an earlier run left in the folder


def test_training_run_counts_distinct_files_and_writes_the_list(tmp_path, monkeypatch, caplog):
    from skimage import data as skdata

    from sr_lab.train import run

    d = tmp_path / "hr"
    d.mkdir()
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"]):
        Image.fromarray(getattr(skdata, name)()).resize((112, 96)).save(d / f"good_{i}.png")
    bad = [_truncated(d / "trunc_a.png", 1), _truncated(d / "trunc_b.png", 2)]
    (d / "fake.png").write_text("not an image")  # excluded when the folder is probed

    attempts = []
    note = SRDataModule._note_skipped
    monkeypatch.setattr(SRDataModule, "_note_skipped",
                        lambda self, skipped, ds: attempts.extend(skipped) or note(self, skipped, ds))
    cfg = _cfg(tmp_path, f"data.hr_dirs=[{d}]", "train.iterations=6", "train.export_weights=false")
    with caplog.at_level(logging.WARNING):
        run(cfg)  # 6 usable files, batch 2: 3 iterations per data-epoch, 2 data-epochs

    assert len(attempts) >= 4  # the truncated files were drawn (and fell back) at least twice each
    out = Path(cfg.paths.output_dir)
    lines = (out / DataSkipReport.FILE_NAME).read_text().splitlines()
    listed = dict(line.split("\t") for line in lines)
    names = list(listed)  # probe exclusions first, then load failures in the order they happened
    assert len(names) == 3 and names[0] == str(d / "fake.png") and set(names[1:]) == set(map(str, bad))
    assert listed[str(d / "fake.png")].startswith("unreadable (")
    assert all(listed[str(p)].startswith("failed at load time (") for p in bad)

    per_file = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped HR image")]
    assert sorted(m.split()[3] for m in per_file) == sorted(map(str, bad))  # one warning per file
    summaries = [r.getMessage() for r in caplog.records if "not used so far" in r.getMessage()]
    assert len(summaries) == 1 and summaries[0].startswith("epoch 0: 3 HR file(s)")  # epoch 1: unchanged

    (metrics,) = out.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [r for r in rows if r.get("data/skipped")]
    assert logged and float(logged[-1]["data/skipped"]) == 3.0  # distinct files, not load attempts
    assert max(float(r["data/skipped"]) for r in logged) == 3.0
    assert all(r.get("train/loss") for r in logged)  # same rows (same step axis) as the training scalars

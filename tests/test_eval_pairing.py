"""Paired folders: the stem rule (RealSR/DRealSR/DIV2K names), the paired dataset, and that the
scorer lists every unpaired / duplicated / mismatched file instead of dropping it."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sr_lab.data.paired import PairedFolderDataset, pair_files, pair_folders, pair_key


def save(path, h, w, value=128, seed=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        arr = np.full((h, w, 3), value, np.uint8)
    else:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("name,key", [
    ("Canon_001_HR.png", "Canon_001"), ("Canon_001_LR4.png", "Canon_001"), ("Nikon_050_lr2.png", "Nikon_050"),
    ("DSC_1454_x1.png", "DSC_1454"), ("DSC_1454_x4.png", "DSC_1454"), ("0801x4.png", "0801"), ("0801.png", "0801"),
    ("img-sr.png", "img"), ("box2.png", "box2"), ("HR.png", "HR"), ("photo_HRnet.png", "photo_HRnet"),
])
def test_pair_key_rule(name, key):
    assert pair_key(name) == key


def test_pair_files_reports_missing_and_duplicates():
    rep = pair_files(["hr/a_HR.png", "hr/b_HR.png", "hr/c.png", "hr/d_HR.png", "hr/d.png"],
                     ["lr/a_LR4.png", "lr/b_LR4.png", "lr/e_LR4.png", "lr/d_LR4.png"])
    assert sorted(rep.pairs) == ["a", "b"]
    assert rep.only_a == ["hr/c.png"] and rep.only_b == ["lr/e_LR4.png"]
    assert rep.duplicates == {"d": ["hr/d.png", "hr/d_HR.png", "lr/d_LR4.png"]}
    assert len(rep.problems()) == 3


def test_paired_folder_dataset_realsr_layout(tmp_path):
    save(tmp_path / "HR" / "Canon_001_HR.png", 32, 48, seed=1)
    save(tmp_path / "LR" / "Canon_001_LR4.png", 8, 12, seed=2)
    save(tmp_path / "HR" / "Canon_002_HR.png", 32, 32)
    save(tmp_path / "LR" / "Canon_002_LR4.png", 8, 9)          # wrong size
    save(tmp_path / "HR" / "Canon_003_HR.png", 16, 16)          # no LR
    ds = PairedFolderDataset(tmp_path / "HR", tmp_path / "LR", scale=4)
    assert len(ds) == 1
    item = ds[0]
    assert item["key"] == "Canon_001" and item["hr"].shape == (3, 32, 48) and item["lr"].shape == (3, 8, 12)
    assert item["hr"].dtype == torch.float32 and 0 <= item["hr"].min() and item["hr"].max() <= 1
    assert "Canon_002" in ds.report.mismatches and "expected 8x8" in ds.report.mismatches["Canon_002"]
    assert ds.report.only_a == [str(tmp_path / "HR" / "Canon_003_HR.png")]
    with pytest.raises(ValueError, match="Canon_002"):
        PairedFolderDataset(tmp_path / "HR", tmp_path / "LR", scale=4, strict=True)
    with pytest.raises(FileNotFoundError, match="lr_dir"):
        PairedFolderDataset(tmp_path / "HR", tmp_path / "nope", scale=4)


def test_drealsr_names_pair(tmp_path):
    save(tmp_path / "test_HR" / "DSC_1454_x1.png", 16, 16)
    save(tmp_path / "test_LR" / "DSC_1454_x4.png", 4, 4)
    rep = pair_folders(tmp_path / "test_HR", tmp_path / "test_LR", scale=4)
    assert list(rep.usable) == ["DSC_1454"] and not rep.problems()


def test_scorer_lists_mismatches_and_missing_pairs(tmp_path, caplog):
    pytest.importorskip("pyiqa")
    from sr_lab.eval.metrics import build_metrics
    from sr_lab.eval.report import write_reports
    from sr_lab.eval.score import discover_runs, score_runs

    for k in ("a", "b", "c"):
        save(tmp_path / "hr" / f"{k}_HR.png", 24, 24, seed=ord(k))
    for s in (0, 1):
        save(tmp_path / "sr" / f"seed_{s}" / "a_LR4.png", 24, 24, seed=10 + s)
        save(tmp_path / "sr" / f"seed_{s}" / "b_LR4.png", 24, 24, seed=20 + s)
    save(tmp_path / "sr" / "seed_0" / "c_LR4.png", 20, 24)   # size mismatch in run 0
    save(tmp_path / "sr" / "seed_1" / "c_LR4.png", 24, 24, seed=5)
    save(tmp_path / "sr" / "seed_1" / "zzz.png", 24, 24)     # no HR partner
    runs = discover_runs(tmp_path / "sr")
    assert [r.name for r in runs] == ["seed_0", "seed_1"]
    metrics, cross, unavailable = build_metrics(["psnr", "ssim"], device=torch.device("cpu"))
    res = score_runs(runs, tmp_path / "hr", metrics, cross, unavailable, crop_border=2)
    summary = write_reports(res, tmp_path / "out", ["psnr", "ssim"])
    assert "c" in summary["pairing"]["seed_0"]["size_mismatches"]
    assert summary["pairing"]["seed_1"]["only_second"] == [str(tmp_path / "sr" / "seed_1" / "zzz.png")]
    assert any("size mismatch 'c'" in r.getMessage() for r in caplog.records)
    assert any("zzz.png" in r.getMessage() for r in caplog.records)
    assert res.common_images == ["a", "b"]  # c is excluded from stability, and says so
    assert any("c: not scored in every run" in m for m in summary["messages"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert {(r["image"], r["run"]) for r in rows} == {("a", "seed_0"), ("b", "seed_0"), ("a", "seed_1"),
                                                      ("b", "seed_1"), ("c", "seed_1")}
    # G-STD from the per-image CSV by hand, L-STD from the SR images by hand
    ps = {(r["image"], r["run"]): float(r["psnr"]) for r in rows}
    want = np.mean([np.std([ps[(k, "seed_0")], ps[(k, "seed_1")]]) for k in ("a", "b")])
    assert summary["metrics"]["psnr"]["g_std"] == pytest.approx(want, abs=1e-12)
    imgs = {k: np.stack([np.asarray(Image.open(tmp_path / "sr" / f"seed_{s}" / f"{k}_LR4.png"), np.float64) / 255
                         for s in (0, 1)]) for k in ("a", "b")}
    want_l = np.mean([imgs[k][:, 4:-4, 4:-4].std(axis=0).mean() for k in ("a", "b")])
    assert summary["stability"]["l_std"] == pytest.approx(want_l, abs=1e-12)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| ↑ PSNR |" in md and "| L-STD ↓ |" in md and "pairing: 2 file(s) not scored" in md
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_runs"] == 2


def test_no_reference_mode_without_hr_folder(tmp_path):
    pytest.importorskip("pyiqa")
    from sr_lab.eval.image_table import table_cells, table_png
    from sr_lab.eval.metrics import build_metrics
    from sr_lab.eval.score import discover_runs, score_runs

    for s in (0, 1, 2):
        save(tmp_path / "sr" / f"seed_{s}" / "a.png", 16, 16, seed=s)
        save(tmp_path / "sr" / f"seed_{s}" / "b.png", 16, 16, seed=10 + s)
    save(tmp_path / "sr" / "seed_2" / "b_SR.png", 16, 16)  # same key as b.png in that run
    metrics, cross, unavailable = build_metrics(["psnr"], device=torch.device("cpu"))
    res = score_runs(discover_runs(tmp_path / "sr"), None, metrics, cross, unavailable, crop_border=0)
    assert "needs the HR folder" in res.unavailable["psnr"] and not res.metrics
    assert res.pairing["seed_2"].duplicates == {"b": sorted([str(tmp_path / "sr" / "seed_2" / "b.png"),
                                                             str(tmp_path / "sr" / "seed_2" / "b_SR.png")])}
    assert res.common_images == ["a"] and res.stability["n_runs"] == 3
    imgs = np.stack([np.asarray(Image.open(tmp_path / "sr" / f"seed_{s}" / "a.png"), np.float64) / 255 for s in range(3)])
    assert res.stability["l_std"] == pytest.approx(imgs[:, 4:-4, 4:-4].std(axis=0).mean(), abs=1e-12)
    rows = table_cells(res, None, max_rows=2, height=32)
    assert len(rows) == 1 and rows[0][1][0] is None and rows[0][1][-1] is None  # no LR, no HR cell
    assert table_png(rows, columns=["LR", "SR 0", "SR 1", "SR 2", "HR"]).shape[0] > 32

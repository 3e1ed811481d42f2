"""End to end on the tiny backbone: a short CCSR stage-1 run gives the checkpoint, `sr-make-testset`
gives HR/LR pairs, `make eval` runs inference with 2 seeds and scores them, a 2x2 Hydra multirun over
the truncated sampler's (t_max, t_min) produces the collected table; plus config errors and W&B."""
import csv
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from helpers import FAST, ROOT, compose_train
from sr_lab.config.validation import ConfigError
from sr_lab.data.paired import PairedFolderDataset
from sr_lab.train import CONF_DIR

pytest.importorskip("pyiqa")

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}


def compose_cfg(name, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """<run>/export of a 1-iteration CCSR stage-1 run on the tiny backbone (sampler: 10 spaced steps)."""
    from sr_lab.train import run

    out = tmp_path_factory.mktemp("ccsr_run")
    run(compose_train([*FAST, "experiment=ccsr_stage1", "train.iterations=1"], out))
    return out / "export"


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    from sr_lab.eval.testset import make_testset

    out = tmp_path_factory.mktemp("testset")
    cfg = compose_cfg("testset", [f"out_dir={out}", "paths.output_dir=" + str(out), "crop_size=32", "crop=center",
                                  "max_images=2", "seed=3"])
    make_testset(cfg)
    return out


def test_testset_is_paired_reproducible_and_has_a_manifest(testset, tmp_path):
    from sr_lab.eval.testset import make_testset

    ds = PairedFolderDataset(testset / "HR", testset / "LR", scale=4, strict=True)
    assert len(ds) == 2 and ds[0]["hr"].shape == (3, 32, 32) and ds[0]["lr"].shape == (3, 8, 8)
    man = json.loads((testset / "manifest.json").read_text())
    assert man["seed"] == 3 and man["degradation"]["_target_"].endswith("RealESRGANDegradation")
    assert man["degradation"]["jpeg_range2"] == [60.0, 100.0]  # StableSR settings
    assert man["degradation_forced"] == {"resize_lr_to_hr": False} and len(man["pairs"]) == 2
    assert "choices" in man["pairs"][0]["drawn"]
    again = tmp_path / "again"
    make_testset(compose_cfg("testset", [f"out_dir={again}", f"paths.output_dir={again}", "crop_size=32",
                                         "crop=center", "max_images=2", "seed=3"]))
    for sub in ("HR", "LR"):
        for f in sorted((testset / sub).iterdir()):
            assert f.read_bytes() == (again / sub / f.name).read_bytes(), f
    bsr = tmp_path / "bsrgan"
    make_testset(compose_cfg("testset", [f"out_dir={bsr}", f"paths.output_dir={bsr}", "degradation=bsrgan",
                                         "crop_size=64", "max_images=1"]))
    man = json.loads((bsr / "manifest.json").read_text())
    assert man["pairs"][0]["lr_size"] == [16, 16] and man["pairs"][0]["drawn"]["trace"][-1]["final"]


def test_make_eval_end_to_end_with_inference(checkpoint, testset, tmp_path):
    out = tmp_path / "eval"
    args = (f"run_inference=true infer.checkpoint={checkpoint} infer.seeds=[0,1] infer.progress=false "
            f"lr_dir={testset / 'LR'} hr_dir={testset / 'HR'} metrics.names=[psnr,ssim,lpips] "
            f"hydra.run.dir={out}")
    proc = subprocess.run(["make", "-s", "-o", ".venv/.sr_lab-installed", "eval", f"ARGS={args}"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "infer").iterdir() if p.is_dir()) == ["seed_0", "seed_1"]
    s = json.loads((out / "summary.json").read_text())
    assert s["n_runs"] == 2 and s["n_images_all_runs"] == 2
    assert s["metrics"]["psnr"]["available"] and s["metrics"]["psnr"]["source"].startswith("pyiqa psnr")
    assert s["metrics"]["psnr"]["g_std"] > 0 and s["stability"]["l_std"] > 0  # two seeds differ
    assert not s["metrics"]["lpips"]["available"] and "LPIPS_v0.1_alex-df73285e.pth" in s["metrics"]["lpips"]["reason"]
    assert s["inference"]["seeds"] == [0, 1] and s["executed_steps"] >= 1
    assert s["psnr_ssim_crosscheck"]["psnr"]["max_abs_diff_eps_corrected"] < 1e-4
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 4 and {"psnr", "ssim", "psnr_sr_lab", "ssim_sr_lab"} <= set(rows[0])
    assert "| ↑ PSNR |" in (out / "summary.md").read_text()
    assert (out / "lr_sr_hr.png").is_file() and list((out / "csv").rglob("images/eval_lr_sr_hr.png"))
    assert list((out / "csv").rglob("metrics.csv"))


def test_multirun_2x2_collects_the_table(checkpoint, testset, tmp_path):
    import shutil

    sweep, one = tmp_path / "sweep", tmp_path / "one"
    for sub in ("HR", "LR"):  # one image keeps the 4 jobs short
        (one / sub).mkdir(parents=True)
        first = sorted((testset / sub).iterdir())[0]
        shutil.copy(first, one / sub / first.name)
    cmd = [sys.executable, "-m", "sr_lab.eval.run", "-m", "run_inference=true", f"infer.checkpoint={checkpoint}",
           "infer.seeds=[0,1]", "infer.progress=false", f"lr_dir={one / 'LR'}", f"hr_dir={one / 'HR'}",
           "metrics.names=[psnr,ssim]", "collect.metrics=[psnr,ssim]", "report.table_images=1",
           "infer.sampler.t_max=0.5,0.6667", "infer.sampler.t_min=0.2,0.3333", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1", "2", "3"]
    md = (sweep / "collected.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| infer.")]
    assert len(rows) == 4
    cells = {r.split(" | ")[1] for r in rows}
    assert cells == {"(T/2, T/5, 3)", "(T/2, T/3, 2)", "(2T/3, T/5, 5)", "(2T/3, T/3, 4)"}  # S of 10 spaced steps
    jobs = json.loads((sweep / "collected.json").read_text())["rows"]
    assert all(r["metrics"]["psnr"]["mean"] is not None and r["l_std"] is not None for r in jobs)
    assert (sweep / "perception_distortion.png").is_file()  # x = PSNR, y = SSIM (no perceptual weights here)


def test_multirun_job_with_a_bad_value_is_recorded_and_the_sweep_goes_on(testset, tmp_path):
    sr = _noisy_runs(testset, tmp_path / "sr")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sr_lab.eval.run", "-m", f"sr_dir={sr}", f"hr_dir={testset / 'HR'}",
           "metrics.names=[psnr]", "collect.metrics=[psnr]", "metrics.crop_border=-1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "metrics.crop_border=-1 must be an integer >= 0" in json.loads((sweep / "0" / "failed.json").read_text())["error"]
    assert (sweep / "1" / "summary.json").is_file()
    md = (sweep / "collected.md").read_text()
    assert "| metrics.crop_border=-1 | failed | failed |" in md and "| metrics.crop_border=2 | " in md


@pytest.mark.parametrize("override,match", [
    (["metrics.names=[psnr,psnrr]"], "metrics.names: unknown metric 'psnrr'"),
    (["metrics.psnr_ssim_impl=basicsr"], "metrics.psnr_ssim_impl=basicsr"),
    (["metrics.maniqa_checkpoint=kadid"], "metrics.maniqa_checkpoint=kadid"),
    (["metrics.crop_border=-1"], "metrics.crop_border=-1"),
    (["hr_dir=/no/such/hr"], "hr_dir=/no/such/hr does not exist"),
    (["sr_dir=null"], "sr_dir is required"),
    (["stability.crop_border=x"], "stability.crop_border=x"),
    (["run_inference=true", "sr_dir=null"], "lr_dir is required"),
    (["run_inference=true"], "sr_dir must be null with run_inference=true"),
    (["collect.metrics=[psnr,fidd]"], "collect.metrics: unknown metric 'fidd'"),
    (["report.cell_height=4"], "report.cell_height=4 must be >= 16"),
])
def test_bad_eval_values_name_the_key(override, match, tmp_path):
    from sr_lab.eval.config import validate_eval_config

    cfg = compose_cfg("eval", [f"sr_dir={tmp_path}", f"paths.output_dir={tmp_path}", *override])
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace(".", r"\.")):
        validate_eval_config(cfg)


def test_testset_config_errors_name_the_key(tmp_path):
    from sr_lab.eval.testset import make_testset

    base = [f"out_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    for override, match in ((["crop_size=30"], "crop_size=30 must be null or a positive multiple of upscale=4"),
                            (["crop=corner"], "crop=corner"), (["hr_dirs=/no/such"], "hr_dirs: /no/such does not exist"),
                            (["degradation=bsrgan", "degradation.jpeg_prob=2"], "degradation: jpeg_prob")):
        with pytest.raises(ConfigError, match=match):
            make_testset(compose_cfg("testset", base + override))


def test_inference_knobs_are_validated_with_the_infer_prefix(tmp_path, checkpoint):
    from sr_lab.eval.config import validate_eval_config

    cfg = compose_cfg("eval", [f"paths.output_dir={tmp_path}", "run_inference=true", f"lr_dir={tmp_path}",
                               f"infer.checkpoint={checkpoint}", "infer.sampler.t_max=0.2", "infer.sampler.t_min=0.5"])
    with pytest.raises(ConfigError, match=r"infer\.sampler\.t_min=0\.5 must be smaller"):
        validate_eval_config(cfg)


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sr_lab.eval.run", f"sr_dir={tmp_path}", "metrics.names=[nope]",
                           f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "config error: metrics.names: unknown metric 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def _noisy_runs(testset, root, seeds=(0, 1)):
    import numpy as np
    from PIL import Image

    for s in seeds:
        for f in sorted((testset / "HR").iterdir()):
            a = np.asarray(Image.open(f), np.float64)
            noisy = np.clip(a + np.random.default_rng(s).normal(0, 6, a.shape), 0, 255).astype(np.uint8)
            (root / f"seed_{s}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(root / f"seed_{s}" / f.name)
    return root


def test_wandb_gets_scalars_and_the_image_table(testset, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from sr_lab.eval.run import run_eval

    sr = _noisy_runs(testset, tmp_path / "sr")
    out = tmp_path / "out"
    summary = run_eval(compose_cfg("eval", [f"sr_dir={sr}", f"hr_dir={testset / 'HR'}", f"lr_dir={testset / 'LR'}",
                                            f"paths.output_dir={out}", "logger=csv_wandb", "metrics.names=[psnr,ssim]"]))
    assert wandb.run is None and summary["n_runs"] == 2 and summary["metrics"]["psnr"]["g_std"] > 0
    run = next((out / "wandb").glob("offline-run-*"))
    assert list(run.rglob("*.table.json"))  # LR | SR seed_0 | SR seed_1 | HR
    assert list(run.rglob("media/images/**/*.png"))  # the grid PNG


def test_wandb_is_finished_when_evaluation_fails(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from sr_lab.eval import run as eval_run

    def boom(*a, **k):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(eval_run, "score_runs", boom)
    cfg = compose_cfg("eval", [f"sr_dir={tmp_path}", f"hr_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}",
                               "logger=csv_wandb", "metrics.names=[psnr]"])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # one SR/HR pair (the same file), so scoring is reached
    with pytest.raises(RuntimeError, match="scoring failed"):
        eval_run.run_eval(cfg)
    assert wandb.run is None
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))

"""Resume in one run folder: ``ckpt_path=<run>/checkpoints/x.ckpt`` continues in <run> (checkpoints, image grids,
train.log, one metrics.csv history), ``ckpt_path=last|auto`` finds the newest complete checkpoint."""
import csv
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import sr_lab.train as train_mod
from helpers import FAST, ROOT, compose_train
from sr_lab.config.validation import ConfigError
from sr_lab.train import resolve_ckpt_path, resume_overrides, run

CLI_FAST = [o for o in FAST if "enable_progress_bar" not in o]  # the CLI decides: not a tty -> log lines


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _sr_train(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "sr_lab.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "offline", "SR_LAB_ROOT": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_cli_resume_from_last_ckpt_continues_in_the_run_folder_with_one_metrics_history(tmp_path):
    """A run "killed" after iteration 3 whose last checkpoint is iteration 2 (rows past it were logged):
    ``ckpt_path=<run>/checkpoints/last.ckpt`` (no hydra.run.dir) resumes into <run>, not a new dated folder;
    metrics.csv ends as the uninterrupted run's (one history, steps monotonic), the first run's .hydra is kept."""
    run_dir = tmp_path / "run"
    args = ["experiment=ccsr_stage1", *CLI_FAST, "train.iterations=4", "train.ckpt_every=2", "train.val_every=2",
            "train.export_weights=false"]
    _sr_train([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    full = _csv(run_dir / "csv" / "version_0" / "metrics.csv")
    ckpts = run_dir / "checkpoints"
    shutil.copyfile(ckpts / "step0000004.ckpt", ckpts / "last.ckpt")  # the state after iteration 2
    (ckpts / "step0000008.ckpt").unlink()

    out = _sr_train([*args, f"ckpt_path={ckpts / 'last.ckpt'}"], tmp_path)
    assert not (tmp_path / "outputs").exists(), "the resumed run started a new dated folder"
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    resumed = _csv(run_dir / "csv" / "version_0" / "metrics.csv")
    steps = [int(r["step"]) for r in resumed]
    assert steps == sorted(steps) and steps == [int(r["step"]) for r in full]
    assert resumed == full  # the resume is exact, so the re-logged rows (steps 6, 8) are the same values
    assert (ckpts / "step0000008.ckpt").is_file()
    assert "iteration 3/4" in out and "iteration 4/4" in out and "iteration 2/4" not in out  # counts on
    # Hydra's record: the first run's kept, the resumed run's next to it; one train.log with both runs
    assert "ckpt_path" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    (resume_hydra,) = (run_dir / ".hydra").glob("resume_*")
    assert "last.ckpt" in (resume_hydra / "overrides.yaml").read_text()
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("iteration 2/4") == 1 and log_text.count("iteration 4/4") == 2
    assert "resuming from" in log_text


def test_resume_overrides(tmp_path, monkeypatch):
    run_dir = tmp_path / "outputs" / "t" / "2026-01-01_00-00-00"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    ckpt = f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    extra = resume_overrides(["experiment=ccsr_stage1", ckpt])
    assert extra[0] == f"hydra.run.dir={run_dir}" and extra[1].startswith("hydra.output_subdir=.hydra/resume_")
    monkeypatch.chdir(tmp_path)  # a relative path names the same folder
    assert resume_overrides(["ckpt_path=outputs/t/2026-01-01_00-00-00/checkpoints/last.ckpt"])[0] \
        == f"hydra.run.dir={run_dir}"
    # the user named the folder: only Hydra's record moves aside
    (only,) = resume_overrides([f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert only.startswith("hydra.output_subdir=")
    assert resume_overrides([f"hydra.run.dir={tmp_path}/new", "ckpt_path=auto"]) == []
    assert resume_overrides([ckpt, "paths.output_dir=/elsewhere"]) == []
    assert resume_overrides(["-m", ckpt]) == []
    assert resume_overrides(["ckpt_path=last"]) == []  # no folder named: Hydra's new dated one
    assert resume_overrides(["train.iterations=3"]) == []
    outside = tmp_path / "weights" / "checkpoints"
    outside.mkdir(parents=True)
    (outside / "x.ckpt").write_bytes(b"x")
    assert resume_overrides([f"ckpt_path={outside / 'x.ckpt'}"]) == []  # not an sr_lab run folder
    spaced = tmp_path / "my runs" / "a"
    (spaced / ".hydra").mkdir(parents=True)
    (spaced / "checkpoints").mkdir()
    (spaced / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_overrides([f"ckpt_path={spaced}/checkpoints/last.ckpt"]) == [f"hydra.run.dir='{spaced}'"]


def _fake_ckpt(path, step, mtime):
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(64)}}, path)
    os.utime(path, (mtime, mtime))


def test_ckpt_path_last_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    t = time.time() - 100
    _fake_ckpt(ckpts / "step0000002.ckpt", 2, t)
    _fake_ckpt(ckpts / "step0000004.ckpt", 4, t + 1)
    _fake_ckpt(ckpts / "last.ckpt", 4, t + 2)
    _fake_ckpt(ckpts / "step0000006.ckpt", 6, t + 3)
    data = (ckpts / "step0000006.ckpt").read_bytes()
    (ckpts / "step0000006.ckpt").write_bytes(data[: len(data) // 2])  # truncated: newer but incomplete
    (ckpts / "step0000008.ckpt").write_bytes(b"garbage")
    (ckpts / ".last.ckpt.abcdefgh.tmp").write_bytes(b"a temporary file of an atomic write")
    caplog.set_level(logging.INFO, logger="sr_lab.train")

    cfg = compose_train(["ckpt_path=last"], tmp_path)
    resolve_ckpt_path(cfg)
    assert cfg.ckpt_path == str(ckpts / "last.ckpt")
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step0000006.ckpt" in m for m in skipped) and any("step0000008.ckpt" in m for m in skipped)
    assert any(f"newest complete checkpoint is {ckpts / 'last.ckpt'}" in r.getMessage() for r in caplog.records)

    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:100])  # now last.ckpt is cut too
    cfg = compose_train(["ckpt_path=auto"], tmp_path)
    resolve_ckpt_path(cfg)
    assert cfg.ckpt_path == str(ckpts / "step0000004.ckpt")


def test_ckpt_path_last_without_a_checkpoint(tmp_path):
    cfg = compose_train(["ckpt_path=last"], tmp_path / "fresh")
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no complete checkpoint in .*fresh/checkpoints") as err:
        resolve_ckpt_path(cfg)
    assert "\n" not in str(err.value)
    cfg = compose_train(["ckpt_path=auto"], tmp_path / "fresh")
    resolve_ckpt_path(cfg)
    assert cfg.ckpt_path is None  # auto: starts fresh
    cfg = compose_train(["ckpt_path=/some/file.ckpt"], tmp_path)
    resolve_ckpt_path(cfg)
    assert cfg.ckpt_path == "/some/file.ckpt"  # a path is the validation's to check


def test_ckpt_path_last_resumes_in_process_and_appends_to_metrics_csv(tmp_path, caplog):
    """End to end without the CLI: ckpt_path=last in paths.output_dir resumes the newest checkpoint and the
    CSV logger appends to the same version_0/metrics.csv."""
    base = [*FAST, "experiment=ccsr_stage1", "train.ckpt_every=2", "train.export_weights=false"]
    run(compose_train([*base, "train.iterations=2"], tmp_path))
    first = _csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    caplog.set_level(logging.INFO, logger="sr_lab.train")
    run(compose_train([*base, "train.iterations=3", "ckpt_path=last"], tmp_path))
    assert any("newest complete checkpoint is" in r.getMessage() and "last.ckpt" in r.getMessage()
               for r in caplog.records)
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    rows = _csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert rows[: len(first)] == first and steps == [2, 4, 6]  # alternate mode: 2 global steps per iteration
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 6


def test_checkpoint_global_step_rejects_a_truncated_file(tmp_path):
    _fake_ckpt(tmp_path / "a.ckpt", 7, time.time())
    assert train_mod.checkpoint_global_step(tmp_path / "a.ckpt") == 7
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "b.ckpt").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="truncated"):
        train_mod.checkpoint_global_step(tmp_path / "b.ckpt")

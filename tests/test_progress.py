"""What a training run shows: progress in iterations (a bar on a terminal, plain log lines otherwise), one step
axis in metrics.csv, one-line errors printed once (a config error; trainer=ddp without a GPU)."""
import csv
import io
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import sr_lab.train as train_mod
from helpers import FAST, ROOT, compose_train
from sr_lab import progress
from sr_lab.config.validation import ConfigError
from sr_lab.train import run

# FAST turns Lightning's bar off (+trainer.enable_progress_bar=false); the bar tests need it on
FAST_BAR = [o for o in FAST if "enable_progress_bar" not in o]
# 2 micro-batches per iteration (accumulate) and 2 global steps per iteration (alternate mode)
ACCUM2 = ["experiment=ccsr_stage1", "optim.mode=alternate", "data.batch_size=2", "train.total_batch_size=4",
          "train.export_weights=false"]


def _rows(run_dir):
    files = sorted((run_dir / "csv").rglob("metrics.csv"))
    assert len(files) == 1, files
    with files[0].open(newline="") as f:
        return list(csv.DictReader(f))


def test_plain_progress_lines_every_log_every_iterations_when_stdout_is_not_a_tty(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # redirected output: no terminal
    caplog.set_level(logging.INFO, logger="sr_lab.progress")
    run(compose_train([*FAST, *ACCUM2, "train.iterations=4", "train.log_every=2"], tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "sr_lab.progress"]
    assert [re.match(r"iteration (\d+/\d+)", m).group(1) for m in lines] == ["2/4", "4/4"], lines
    for m in lines:  # iteration k/N (percent) loss | it/s | elapsed | ETA
        assert re.fullmatch(r"iteration \d+/4 \([\d.]+%\) loss \S+ \| [\d.]+ it/s \| elapsed [\d:]+ \| ETA [\d:]+", m), m
    assert "ETA 0:00:00" in lines[-1]


def test_progress_log_counts_iterations_from_the_resumed_step(caplog):
    """Unit: a resumed run (global step 6 = iteration 3 with 2 steps per iteration), micro-batches inside an
    iteration print nothing, rate and ETA from a fake clock (1 s per iteration)."""
    clock = SimpleNamespace(t=100.0)
    cb = progress.ProgressLog(total=10, every=2, clock=lambda: clock.t)
    module = SimpleNamespace(optimizer_steps_per_iteration=2)
    trainer = SimpleNamespace(global_step=6, is_global_zero=True, callback_metrics={"train/loss": torch.tensor(0.5)})
    caplog.set_level(logging.INFO, logger="sr_lab.progress")
    cb.on_train_start(trainer, module)
    for it in range(4, 11):
        for micro in range(2):  # accumulate=2: the step count moves on the second micro-batch only
            clock.t += 0.5
            if micro == 1:
                trainer.global_step = 2 * it
            cb.on_train_batch_end(trainer, module, None, None, 0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "sr_lab.progress"]
    assert msgs == [
        "iteration 4/10 (40.0%) loss 0.5 | 1.00 it/s | elapsed 0:00:01 | ETA 0:00:06",
        "iteration 6/10 (60.0%) loss 0.5 | 1.00 it/s | elapsed 0:00:03 | ETA 0:00:04",
        "iteration 8/10 (80.0%) loss 0.5 | 1.00 it/s | elapsed 0:00:05 | ETA 0:00:02",
        "iteration 10/10 (100.0%) loss 0.5 | 1.00 it/s | elapsed 0:00:07 | ETA 0:00:00",
    ]


def test_progress_mode():
    assert progress.resolve_mode("auto", isatty=lambda: True) == "bar"
    assert progress.resolve_mode("auto", isatty=lambda: False) == "log"
    assert progress.resolve_mode("LOG") == "log" and progress.resolve_mode(None) == "none"
    with pytest.raises(ValueError, match="train.progress=fancy must be one of auto, bar, log, none"):
        progress.resolve_mode("fancy")
    with pytest.raises(ConfigError, match="train.progress"):
        train_mod.progress_mode(compose_train(["train.progress=fancy"], "/tmp/unused"))


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_bar_total_is_train_iterations(tmp_path, monkeypatch, kind):
    """The bar counts iterations (not data batches of a data epoch): total = train.iterations, and it ends at it,
    with 2 micro-batches and 2 global steps per iteration."""
    made = []

    def factory(total):
        bar = progress.IterationRichProgressBar(total) if kind == "rich" else progress.IterationTQDMProgressBar(total)
        made.append(bar)
        return bar

    monkeypatch.setattr(progress, "iteration_progress_bar", factory)
    run(compose_train([*FAST_BAR, *ACCUM2, "train.iterations=3", "train.progress=bar"], tmp_path))
    (bar,) = made
    if kind == "rich":
        task = bar.progress.tasks[bar.train_progress_bar_id]
        assert (task.total, task.completed, task.description) == (3, 3, "Iterations")
        assert len([t for t in bar.progress.tasks if t.description == "Iterations"]) == 1  # one for the run
    else:
        assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (3, 3)


def test_metrics_csv_rows_share_one_step_axis(tmp_path):
    """Every row of metrics.csv is on the global step, the axis of the checkpoint and image-grid names (2 per
    iteration here; Lightning's default axis counted micro-batches: 1, 3, 5, ...)."""
    run(compose_train([*FAST, *ACCUM2, "train.iterations=4", "train.val_every=2", "train.ckpt_every=2",
                       "train.log_every=1"], tmp_path))
    rows = _rows(tmp_path)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    val_steps = {int(r["step"]) for r in rows if r.get("val/psnr_y")}
    assert train_steps == [2, 4, 6, 8]  # iteration k at global step 2k
    assert val_steps == {4, 8}
    assert set(steps) <= set(train_steps)  # every row (data/skipped included) on that axis
    grids = {int(re.search(r"step(\d+)", p.name).group(1)) for p in (tmp_path / "csv").rglob("val_*.png")}
    ckpts = {int(re.search(r"step(\d+)", p.name).group(1)) for p in (tmp_path / "checkpoints").glob("step*.ckpt")}
    assert grids == val_steps == ckpts
    assert "epoch" not in rows[0]  # Lightning's data epoch (over the small sample set) is not a progress axis


def test_ddp_without_gpu_is_one_line_before_any_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def built(*a, **k):
        raise AssertionError("a component was built before the accelerator check")

    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", built)
    cfg = compose_train([*FAST, "experiment=ccsr_stage1", "trainer=ddp"], tmp_path)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "torch.cuda.is_available() is False" in msg
    assert "trainer=ddp trainer.accelerator=cpu trainer.devices=2" in msg
    # the CPU recipe itself passes the check
    train_mod.check_accelerator(compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
                                              tmp_path))


def test_config_error_is_printed_once(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sr_lab.train", "experiment=ccsr_stage1", "schedule.t_min=0.9",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("must be smaller than schedule.t_max") == 1, out[-3000:]
    assert "config error: schedule.t_min=0.9" in proc.stderr  # once, on stderr (every sr_lab command)
    assert "config error: schedule.t_min=0.9" in (tmp_path / "train.log").read_text()  # and in the log file


def test_cli_error_goes_to_stderr_and_the_log_file_not_the_console_handler(tmp_path, capsys):
    from sr_lab.config.validation import ConfigError
    from sr_lab.utils.cli import report_cli_error

    logger = logging.getLogger("sr_lab.test_cli_error")
    logger.propagate = False
    console, file_handler = logging.StreamHandler(sys.stdout), logging.FileHandler(tmp_path / "job.log")
    logger.addHandler(console)
    logger.addHandler(file_handler)
    try:
        report_cli_error(logger, ConfigError("x=1 is wrong"))
    finally:
        logger.removeHandler(console)
        logger.removeHandler(file_handler)
        file_handler.close()
    out = capsys.readouterr()
    assert out.err == "config error: x=1 is wrong\n" and out.out == ""
    assert "config error: x=1 is wrong" in (tmp_path / "job.log").read_text()

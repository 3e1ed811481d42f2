"""The W&B logger runs offline without an account, and the task wrapper always finishes it."""
import pytest

from helpers import FAST, compose_train
from sr_lab.train import _wandb_offline, run


def test_wandb_offline_auto(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert _wandb_offline("auto") is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_offline("auto") is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _wandb_offline("auto") is True
    assert _wandb_offline(False) is False


def test_wandb_run_is_finished_even_when_training_fails(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_train([*FAST, "experiment=ccsr_stage1", "logger=csv_wandb", "train.iterations=1",
                         f"ckpt_path={bad}"], tmp_path / "run")
    with pytest.raises(Exception):
        run(cfg)
    assert wandb.run is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))

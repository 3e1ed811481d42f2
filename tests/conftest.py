import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_backbone():
    from sr_lab.models.backbone import build_tiny

    return build_tiny(seed=0)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weight folders: $SR_LAB_WEIGHTS and the torch hub cache."""
    monkeypatch.setenv("SR_LAB_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "weights"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short tiny CCSR stage-1 training run (export folder + last.ckpt: a denoising stage), shared by
    the inference tests of the whole session."""
    from helpers import FAST, compose_train

    from sr_lab.train import run as train_run

    out = tmp_path_factory.mktemp("ccsr_stage1_run")
    train_run(compose_train([*FAST, "experiment=ccsr_stage1", "train.iterations=1", "train.ckpt_every=1",
                             "data.crop_size=32", "data.batch_size=1", "train.total_batch_size=1",
                             "data.num_val_images=1"], out))
    return out

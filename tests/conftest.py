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

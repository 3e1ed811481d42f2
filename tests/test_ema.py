"""EMA of the trainable weights (``ema.decay``, sr_lab/ema.py): the per-iteration update against a hand
computation, validation on the EMA weights, exact resume, the export and its use by sr-infer."""
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FAST, compose_train
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from sr_lab.config.validation import ConfigError
from sr_lab.ema import EMA_STATE_KEY
from sr_lab.inference.run import run_inference
from sr_lab.modules.stage_io import EMA_FILE, read_stage_source
from sr_lab.train import CONF_DIR, run

DECAY = 0.7
# CCSR stage 1, alternate mode (2 optimizer steps per iteration) and 2 micro-batches per iteration: the EMA
# must move once per 2 batches / 2 global steps. A large lr makes every iteration's change visible.
# (data.crop_size=32 with data.batch_size=1 is not bit-reproducible on CPU with 2+ threads, so FAST's 64/2)
BASE = [*FAST, "experiment=ccsr_stage1", "train.total_batch_size=4", "data.num_val_images=1", "optim.lr=1e-2",
        f"ema.decay={DECAY}"]


class WeightSpy(pl.Callback):
    """Records the trainable weights at the start and after every iteration, and what validation sees."""

    last = None

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.val_weights: list[tuple[int, dict[str, torch.Tensor]]] = []
        WeightSpy.last = self

    @staticmethod
    def _snap(pl_module):
        keys = pl_module.trainable_state_keys()
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in keys}

    def on_train_start(self, trainer, pl_module):
        self.weights = [self._snap(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step // pl_module.optimizer_steps_per_iteration >= len(self.weights):
            self.weights.append(self._snap(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.val_weights.append((len(self.weights) - 1, self._snap(pl_module)))


SPY = [f"+callbacks.spy._target_={__name__}.WeightSpy"]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _hand_ema(weights: list[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """decay^k w_0 + sum_i (1 - decay) decay^(k-i) w_i, in float64."""
    return {n: DECAY ** k * weights[0][n].double()
            + sum((1 - DECAY) * DECAY ** (k - i) * weights[i][n].double() for i in range(1, k + 1))
            for n in weights[0]}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """4 iterations with EMA, a checkpoint every 2 and a validation after iteration 2."""
    out = tmp_path_factory.mktemp("ema_run")
    run(compose_train([*BASE, *SPY, "train.iterations=4", "train.ckpt_every=2", "train.val_every=2"], out))
    return out, WeightSpy.last


def test_ema_is_the_per_iteration_average_and_validation_uses_it(ema_run):
    out, spy = ema_run
    assert len(spy.weights) == 5  # w_0 and one snapshot per iteration
    raw = load_file(out / "export" / "trainable.safetensors")
    ema = load_file(out / "export" / EMA_FILE)
    assert ema.keys() == raw.keys() == spy.weights[0].keys()
    assert all(k.startswith("adapter.") for k in ema)  # the trainable tensors only
    assert all(torch.equal(raw[k], spy.weights[4][k]) for k in raw)  # raw export = last weights (swapped back)
    want = _hand_ema(spy.weights, 4)
    for k in ema:
        assert torch.allclose(ema[k].double(), want[k], rtol=1e-6, atol=1e-6), k
    assert any(not torch.allclose(ema[k], raw[k], atol=1e-4) for k in ema)  # it is not the raw weights
    # the mid-run checkpoint holds the EMA after 2 iterations; last.ckpt the final one
    mid = _ckpt(out / "checkpoints" / "step0000004.ckpt")["callbacks"][EMA_STATE_KEY]
    assert mid["updates"] == 2 and mid["decay"] == DECAY
    want2 = _hand_ema(spy.weights, 2)
    assert all(torch.allclose(mid["ema"][k].double(), want2[k], rtol=1e-6, atol=1e-6) for k in want2)
    last = _ckpt(out / "checkpoints" / "last.ckpt")
    assert all(torch.equal(last["callbacks"][EMA_STATE_KEY]["ema"][k], ema[k]) for k in ema)
    assert all(torch.equal(last["state_dict"][k], raw[k]) for k in raw)
    # validation after iteration 2 ran on the EMA weights (as of iteration 2)
    assert [it for it, _ in spy.val_weights] == [2, 4]
    seen = spy.val_weights[0][1]
    assert all(torch.equal(seen[k], mid["ema"][k]) for k in seen)
    assert any(not torch.equal(seen[k], spy.weights[2][k]) for k in seen)


def test_resume_gives_the_uninterrupted_ema(ema_run, tmp_path):
    out, _ = ema_run
    mid = out / "checkpoints" / "step0000004.ckpt"  # after iteration 2 of 4
    run(compose_train([*BASE, "train.iterations=4", "train.ckpt_every=2", "train.val_every=100",
                       f"ckpt_path={mid}"], tmp_path))
    a = _ckpt(out / "checkpoints" / "last.ckpt")
    b = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    ea, eb = a["callbacks"][EMA_STATE_KEY], b["callbacks"][EMA_STATE_KEY]
    assert ea["updates"] == eb["updates"] == 4
    assert ea["ema"].keys() == eb["ema"].keys()
    assert all(torch.equal(ea["ema"][k], eb["ema"][k]) for k in ea["ema"]), "resumed EMA differs"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ra, rb = load_file(out / "export" / EMA_FILE), load_file(tmp_path / "export" / EMA_FILE)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def _infer(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_ema_infer"):
        return run_inference(compose(config_name="infer", overrides=list(overrides)))


def test_sr_infer_uses_the_ema_unless_told_not_to(ema_run, tmp_path):
    out, _ = ema_run
    img = tmp_path / "x.png"
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(img)
    base = [f"checkpoint={out / 'export'}", f"input={img}", "sampler=ddim", "sampler.steps=2", "progress=false"]
    meta = {}
    for name, extra in (("default", []), ("raw", ["ema=false"])):
        o = _infer([*base, *extra, f"output_dir={tmp_path / name}"])
        meta[name] = json.loads((o / "run.json").read_text())
    assert meta["default"]["ema"] is True and meta["default"]["checkpoint"]["path"].endswith(EMA_FILE)
    assert meta["raw"]["ema"] is False and meta["raw"]["checkpoint"]["path"].endswith("trainable.safetensors")
    # the stage layer: export folder and .ckpt give the same EMA; ema=False the raw weights
    ema, raw = load_file(out / "export" / EMA_FILE), load_file(out / "export" / "trainable.safetensors")
    for source in (out / "export", out, out / "checkpoints" / "last.ckpt"):
        src = read_stage_source(source)
        assert src.ema and all(torch.equal(src.state[k], ema[k]) for k in ema), source
        src = read_stage_source(source, ema=False)
        assert not src.ema and all(torch.equal(src.state[k], raw[k]) for k in raw), source
    named = read_stage_source(out / "export" / "trainable.safetensors")  # a named file is read as named
    assert not named.ema and named.path.name == "trainable.safetensors"


def test_a_run_without_ema_exports_none(tmp_path):
    stale = tmp_path / "export" / EMA_FILE  # left by an earlier run in the same folder: removed
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    run(compose_train([o for o in BASE if not o.startswith("ema.")] + ["train.iterations=1"], tmp_path))
    assert (tmp_path / "export" / "trainable.safetensors").is_file() and not stale.exists()
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert EMA_STATE_KEY not in ckpt.get("callbacks", {})
    assert not read_stage_source(tmp_path / "export").ema


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "true", "abc"])
def test_decay_out_of_range_is_a_config_error(value, tmp_path):
    with pytest.raises(ConfigError, match=r"^ema\.decay=.* must be a number in \(0, 1\)"):
        run(compose_train([*FAST, f"ema.decay={value}"], tmp_path))

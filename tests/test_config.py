"""Every preset composes and instantiates on the tiny backbone; bad values fail early and clearly."""
import subprocess
import sys

import hydra
import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from helpers import ROOT, compose_train, presets
from sr_lab.config.validation import ConfigError, validate_config
from stage_inputs import preset_inputs


@pytest.mark.parametrize("name", presets())
def test_preset_composes_validates_and_instantiates(name, tmp_path, tmp_path_factory, tiny_backbone):
    # chained presets (stage1=..., records.dir=...) get tiny inputs made by tests/stage_inputs.py
    inputs = preset_inputs(name, tmp_path_factory, tiny_backbone)
    cfg = compose_train([f"experiment={name}", "data.crop_size=64", *inputs], tmp_path)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    inst = hydra.utils.instantiate
    deg = inst(cfg.degradation)
    dm = inst(cfg.data, degradation=deg)
    dm.setup("fit")
    module = inst(cfg.module, backbone=tiny_backbone)  # the shared tiny backbone replaces backbone=${backbone}
    if cfg.run_mode == "fit":  # run_mode=predict stages (stablesr_latents) write outputs, train nothing
        assert module.trainable_parameters(), "a stage must train something"
    assert all(not p.requires_grad for p in tiny_backbone.parameters())


def test_ccsr_stage1_preset_has_the_paper_settings(tmp_path):
    cfg = compose_train(["experiment=ccsr_stage1"], tmp_path)
    assert cfg.schedule.t_max == pytest.approx(2 / 3, abs=1e-3) and cfg.schedule.t_min == pytest.approx(1 / 3, abs=1e-3)
    assert cfg.sampler.t_max == cfg.schedule.t_max and cfg.sampler.grid == 45
    assert cfg.loss._target_.endswith("CCSRNUTL") and cfg.method.paper_lr == pytest.approx(1e-4)
    # the toy default learns in minutes at 10x the paper's lr; scale=paper trains at the paper's
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.iterations == 300
    paper = compose_train(["experiment=ccsr_stage1", "scale=paper"], tmp_path)
    assert paper.optim.lr == pytest.approx(1e-4) and paper.train.iterations == 25000
    assert compose_train(["experiment=ccsr_stage1", "optim.lr=3e-4"], tmp_path).optim.lr == pytest.approx(3e-4)
    assert cfg.backbone._target_.endswith("build_tiny_trained")  # the embedded default: the shipped tiny prior
    paper = compose_train(["experiment=ccsr_stage1", "scale=paper"], tmp_path)
    assert paper.backbone._target_.endswith("load_pretrained") and paper.data.crop_size == 512
    assert paper.train.total_batch_size == 192 and paper.train.iterations == 25000
    # the method's own settings do not change with the scale (but the learning rate: method.paper_lr / toy_lr)
    for key in ("schedule", "loss", "sampler", "optim", "adapter", "degradation"):
        a, b = OmegaConf.to_container(paper[key]), OmegaConf.to_container(cfg[key])
        if key == "optim":
            a.pop("lr"), b.pop("lr")
        assert a == b, key


@pytest.mark.parametrize("override,match", [
    (["schedule.t_min=0.7"], "schedule.t_min=0.7 must be smaller than schedule.t_max"),
    (["sampler.t_max=1.5"], "sampler.t_max=1.5"),
    (["data.crop_size=2048"], "data.crop_size=2048 is larger than every embedded sample photo"),
    (["data.crop_size=100"], "data.crop_size=100 must be a positive multiple of 8"),
    (["backbone=sd21_base", "backbone.path=/no/such/sd21"], "backbone.path=/no/such/sd21 does not exist"),
    (["data.hr_dirs=[/no/such/dir]"], "data.hr_dirs: folder /no/such/dir does not exist"),
    (["train.total_batch_size=3"], "train.total_batch_size=3"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["optim.mode=both"], "optim.mode=both"),
    (["schedule=uniform"], "loss=ccsr_nutl needs schedule=ccsr_nonuniform"),
    (["trainer.precision=8"], "trainer.precision=8"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt"),
])
def test_bad_values_name_the_key(override, match, tmp_path):
    cfg = compose_train(["experiment=ccsr_stage1", *override], tmp_path)
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace(".", r"\.")):
        validate_config(cfg)


def test_unknown_group_option_is_rejected(tmp_path):
    with pytest.raises(HydraException, match="backbone"):
        compose_train(["experiment=ccsr_stage1", "backbone=sd99"], tmp_path)


def test_cli_reports_config_error_in_one_line_before_building(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sr_lab.train", "experiment=ccsr_stage1", "schedule.t_min=0.9",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: schedule.t_min=0.9 must be smaller than schedule.t_max=0.6667" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()

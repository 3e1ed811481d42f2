"""Shared code reads what a component declares, never its ``_target_`` string: a NEW component (defined
here, named by ``_target_: test_capabilities.<name>``) is handled by its declarations alone."""
import pytest
from lightning.pytorch import LightningDataModule
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from helpers import compose_train
from sr_lab.config.stages import is_records_data, needs_hr_folders
from sr_lab.config.validation import ConfigError, declared, target_object, validate_config
from sr_lab.diffusion.timesteps import CCSRNonUniformTimesteps, UniformTimesteps
from sr_lab.losses.diffusion import CCSRNUTL, EpsMSE
from sr_lab.models.backbone import backbone_builder
from sr_lab.modules.stage_io import _backbone_name
from stage_inputs import fake_records

HERE = __name__  # the module name pytest imported this file as (``_target_`` prefix)


# -- test-local components ------------------------------------------------------------------------
class PairedTimesteps(UniformTimesteps):
    """A new schedule type."""


class PairedLoss(EpsMSE):
    required_schedule = PairedTimesteps
    required_schedule_message = "loss=paired needs schedule=paired"


class UndocumentedLoss(EpsMSE):
    required_schedule = PairedTimesteps  # no message: the shared check writes a generic one


class NUTLVariant(CCSRNUTL):
    """Inherits CCSRNUTL's requirement."""


class FinerNonUniform(CCSRNonUniformTimesteps):
    """A subclass satisfies the requirement of its base."""


def _check_mini(cfg, error):
    if OmegaConf.select(cfg, "backbone.width", default=None) is None:
        raise error("backbone.width is required by the mini backbone")


@backbone_builder("mini", toy=True, validate_config=_check_mini)
def build_mini(width: int = 8):  # never called: declarations are read from the imported function
    raise AssertionError("a config check must not build the backbone")


@backbone_builder("big")
def build_big(path: str = ""):
    raise AssertionError("a config check must not build the backbone")


class ShardReader(LightningDataModule):
    """A new data module reading latent records from its own keys."""

    reads_latent_records = True
    needs_hr_folders = False

    def __init__(self, *args, **kwargs):
        raise AssertionError("a config check must not build the data module")

    @classmethod
    def validate_config(cls, cfg, error):
        if OmegaConf.select(cfg, "data.shards", default=None) is None:
            raise error("data.shards is required by ShardReader")


class FakeWandb(WandbLogger):
    """A W&B logger subclass; records its arguments instead of starting a run."""

    def __init__(self, **kwargs):  # no super().__init__: nothing to start
        self.kwargs = kwargs


class PlainLogger:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _target(name: str) -> str:
    return f"{HERE}.{name}"


# -- loss -> schedule -----------------------------------------------------------------------------
def test_a_new_loss_declares_the_schedule_it_needs(tmp_path):
    base = ["experiment=ccsr_stage1", "schedule=uniform", f"loss._target_={_target('PairedLoss')}"]
    with pytest.raises(ConfigError, match="^loss=paired needs schedule=paired$"):
        validate_config(compose_train(base, tmp_path))
    validate_config(compose_train([*base, f"schedule._target_={_target('PairedTimesteps')}"], tmp_path))
    generic = ["experiment=ccsr_stage1", "schedule=uniform", f"loss._target_={_target('UndocumentedLoss')}"]
    with pytest.raises(ConfigError, match=r"loss\._target_=.*UndocumentedLoss needs a schedule of type "
                                          r".*PairedTimesteps, not schedule\._target_=.*UniformTimesteps"):
        validate_config(compose_train(generic, tmp_path))


def test_the_requirement_is_inherited_and_met_by_schedule_subclasses(tmp_path):
    variant = ["experiment=ccsr_stage1", f"loss._target_={_target('NUTLVariant')}"]
    validate_config(compose_train(variant, tmp_path))
    with pytest.raises(ConfigError, match="loss=ccsr_nutl needs schedule=ccsr_nonuniform"):
        validate_config(compose_train([*variant, "schedule=uniform"], tmp_path))
    validate_config(compose_train(["experiment=ccsr_stage1", f"schedule._target_={_target('FinerNonUniform')}"],
                                  tmp_path))
    # a loss that declares nothing takes any schedule (EpsMSE)
    validate_config(compose_train(["experiment=ccsr_stage1", "loss=eps_mse", "schedule=uniform"], tmp_path))


# -- backbone builders ----------------------------------------------------------------------------
def test_a_new_backbone_builder_runs_its_own_check_and_names_itself(tmp_path, monkeypatch):
    from sr_lab.config import safe_instantiate

    mini = ["experiment=ccsr_stage1", f"backbone._target_={_target('build_mini')}"]
    with pytest.raises(ConfigError, match="backbone.width is required by the mini backbone"):
        validate_config(compose_train(mini, tmp_path))
    cfg = compose_train([*mini, "+backbone.width=8"], tmp_path)
    validate_config(cfg)
    # a stage's stored config is untrusted: a builder outside the allow-list is not even imported
    assert _backbone_name(cfg) is None
    monkeypatch.setattr(safe_instantiate, "LIBRARY_TARGETS", frozenset({_target("build_mini")}))
    assert _backbone_name(cfg) == "mini"
    assert _backbone_name(compose_train([*mini, "+backbone.name=mini_v2"], tmp_path)) == "mini_v2"
    # the shipped builders: the names stage configs were always compared with
    assert _backbone_name(compose_train(["experiment=ccsr_stage1"], tmp_path)) == "tiny"
    assert _backbone_name(compose_train(["experiment=ccsr_stage1", "backbone=sd21_base"], tmp_path)) == "sd21_base"
    assert _backbone_name(OmegaConf.create({"backbone": {"_target_": "no.such.builder"}})) is None
    assert _backbone_name(OmegaConf.create({})) is None


def test_toy_is_a_declaration_of_the_builder(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SR_LAB_WEIGHTS", raising=False)
    records = fake_records(tmp_path_factory.mktemp("rec"))
    base = ["experiment=stablesr_cfw", f"records.dir={records}", "perceptual.allow_random_init=true"]
    validate_config(compose_train([*base, f"backbone._target_={_target('build_mini')}", "+backbone.width=8"],
                                  tmp_path))
    with pytest.raises(ConfigError, match="perceptual.allow_random_init=true is only for smoke runs on backbone=tiny"):
        validate_config(compose_train([*base, f"backbone._target_={_target('build_big')}"], tmp_path))


# -- data modules ---------------------------------------------------------------------------------
def test_a_new_data_module_declares_records_and_checks_its_own_keys(tmp_path):
    reader = ["experiment=ccsr_stage1", f"data._target_={_target('ShardReader')}",
              "data.hr_dirs=[/no/such/dir]"]  # not probed: the module needs no HR folders
    cfg = compose_train(reader, tmp_path)
    assert is_records_data(cfg) and not needs_hr_folders(cfg)
    with pytest.raises(ConfigError, match="data.shards is required by ShardReader"):
        validate_config(cfg)
    validate_config(compose_train([*reader, "+data.shards=4"], tmp_path))
    shipped = compose_train(["experiment=ccsr_stage1", "data.hr_dirs=[/no/such/dir]"], tmp_path)
    assert not is_records_data(shipped) and needs_hr_folders(shipped)
    with pytest.raises(ConfigError, match="data.hr_dirs: folder /no/such/dir does not exist"):
        validate_config(shipped)


def test_declarations_are_read_without_building_and_unknown_targets_declare_nothing():
    cfg = OmegaConf.create({"data": {"_target_": _target("ShardReader")}, "loss": {"_target_": "no.such.Loss"},
                            "backbone": {"_target_": _target("build_mini")}})
    assert target_object(cfg, "data") is ShardReader  # imported, __init__ (which raises) never called
    assert target_object(cfg, "loss") is None and target_object(cfg, "schedule") is None
    assert declared(cfg, "backbone", "toy") is True
    assert declared(cfg, "loss", "required_schedule", "none") == "none"


# -- loggers --------------------------------------------------------------------------------------
def test_wandb_handling_follows_the_logger_class(monkeypatch):
    from sr_lab.eval.loggers import _is_wandb_class
    from sr_lab.train import build_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"logger": {"w": {"_target_": _target("FakeWandb"), "offline": "auto"},
                                       "p": {"_target_": _target("PlainLogger"), "offline": "auto"}}})
    w, p = build_loggers(cfg)
    assert w.kwargs["offline"] is True  # a WandbLogger subclass gets the W&B "offline: auto" treatment
    assert p.kwargs["offline"] == "auto"  # any other logger is left alone
    assert _is_wandb_class(_target("FakeWandb")) and _is_wandb_class("lightning.pytorch.loggers.WandbLogger")
    assert not _is_wandb_class(_target("PlainLogger")) and not _is_wandb_class("lightning.pytorch.loggers.CSVLogger")
    assert not _is_wandb_class("no.such.WandbLogger") and not _is_wandb_class(None)

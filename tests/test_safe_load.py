"""A stored stage config is untrusted: loading a crafted export must not run code from it.

A crafted export whose ``config.yaml`` says ``module: {_target_: torch.load, f: <pickle>, weights_only:
false}`` would execute an arbitrary pickle through ``hydra.utils.instantiate``; sr_lab refuses every
``_target_`` that is not an allow-listed sr_lab class or function (sr_lab/config/safe_instantiate.py),
with one line naming the target, through ``load_stage``, ``build_stage``, ``load_frozen_stage`` (chained
stages) and ``sr-infer``. The repo's own presets stay accepted.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import types
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from helpers import ROOT, compose_train, presets
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from sr_lab.config import safe_instantiate as si
from sr_lab.config.safe_instantiate import UnsafeTarget, check_targets, safe_instantiate
from sr_lab.inference.stage import StageLoadError, StageSource, build_stage, load_stage, read_stage_source
from sr_lab.modules.stage_io import load_frozen_stage

VALID_MODULE = "sr_lab.modules.diffusion_finetune.DiffusionAdapterFinetune"


class _Payload:
    """Unpickling it creates ``marker`` (stands for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _pickle(path: Path, marker: Path) -> Path:
    torch.save({"weights": _Payload(marker)}, path)
    return path


def _export(folder: Path, config: dict) -> Path:
    """An export folder: ``config.yaml`` + a valid-looking ``trainable.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    save_file({"adapter.weight": torch.zeros(2, 2)}, str(folder / "trainable.safetensors"))
    return folder


@pytest.fixture()
def crafted(tmp_path):
    """(export folder whose module is ``torch.load`` of a code-running pickle, the marker it would create)."""
    marker = tmp_path / "pwned"
    evil = _pickle(tmp_path / "evil.pt", marker)
    folder = _export(tmp_path / "crafted" / "export", {
        "task_name": "ccsr_stage1",
        "module": {"_target_": "torch.load", "f": str(evil), "weights_only": False},
    })
    return folder, marker


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


def test_the_payload_really_runs_code_when_instantiated_unchecked(tmp_path):
    # the vulnerability the checks close: plain hydra instantiate of the crafted node runs the pickle
    marker = tmp_path / "sanity"
    evil = _pickle(tmp_path / "sanity.pt", marker)
    hydra.utils.instantiate(OmegaConf.create({"_target_": "torch.load", "f": str(evil), "weights_only": False}))
    assert marker.exists()


def test_load_stage_refuses_torch_load_and_runs_nothing(crafted):
    folder, marker = crafted
    with pytest.raises(StageLoadError) as err:
        load_stage(folder)
    msg = _one_line(str(err.value))
    assert "module._target_=torch.load" in msg and "not an allow-listed sr_lab class or function" in msg
    assert "export/config.yaml" in msg  # names the file that is wrong (the stored config)
    assert not marker.exists()


def test_build_stage_itself_refuses_a_source_built_elsewhere(crafted):
    folder, marker = crafted
    src = StageSource(folder / "trainable.safetensors", OmegaConf.load(folder / "config.yaml"), {})
    with pytest.raises(StageLoadError, match=r"module\._target_=torch\.load") as err:
        build_stage(src)
    _one_line(str(err.value))
    assert not marker.exists()


def test_a_crafted_ckpt_is_refused_too(crafted, tmp_path):
    folder, marker = crafted
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"sr_lab": {"config": OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))},
                "state_dict": {"adapter.weight": torch.zeros(2, 2)}}, ckpt)
    with pytest.raises(StageLoadError, match=r"crafted\.ckpt: stored config refuses module\._target_=torch\.load"):
        load_stage(ckpt)
    assert not marker.exists()


def _cli(checkpoint: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sr_lab.inference.run", f"checkpoint={checkpoint}",
                           f"input={img}", f"output_dir={tmp_path / 'out'}", "device=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_cli_refused(proc: subprocess.CompletedProcess, target_key: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("checkpoint error: ") and f"{target_key}=torch.load" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_sr_infer_refuses_the_crafted_export_in_one_line(crafted, tmp_path):
    folder, marker = crafted
    proc = _cli(folder, tmp_path)
    _assert_cli_refused(proc, "module._target_")
    assert not marker.exists()
    assert not (tmp_path / "out" / "run.json").exists()


def test_sr_infer_refuses_a_crafted_stored_sampler(tmp_path):
    # sr-infer falls back on the stored top-level sampler (instantiated after the module is built):
    # a valid module with a torch.load sampler must be refused as well
    marker = tmp_path / "pwned_sampler"
    evil = _pickle(tmp_path / "evil_sampler.pt", marker)
    cfg = compose_train(["experiment=ccsr_stage1"], tmp_path / "run")
    OmegaConf.resolve(cfg)
    stored = OmegaConf.to_container(cfg, resolve=True)
    stored.pop("hydra", None)
    stored["sampler"] = {"_target_": "torch.load", "f": str(evil), "weights_only": False}
    folder = _export(tmp_path / "crafted_sampler" / "export", stored)
    with pytest.raises(StageLoadError, match=r"sampler\._target_=torch\.load"):
        read_stage_source(folder)
    proc = _cli(folder, tmp_path)
    _assert_cli_refused(proc, "sampler._target_")
    assert not marker.exists()


def test_a_foreign_object_reached_through_an_sr_lab_module_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _pickle(tmp_path / "evil.pt", marker)
    folder = _export(tmp_path / "export", {"module": {
        "_target_": "sr_lab.modules.stage_io.torch.load", "f": str(evil), "weights_only": False}})
    with pytest.raises(StageLoadError) as err:
        load_stage(folder)
    msg = _one_line(str(err.value))
    assert "module._target_=sr_lab.modules.stage_io.torch.load" in msg and "torch.serialization.load" in msg
    assert not marker.exists()


@pytest.mark.parametrize("node,where", [
    ({"_target_": VALID_MODULE, "adapter": {"_target_": "builtins.eval", "_args_": ["1"]}},
     "module.adapter._target_=builtins.eval"),
    ({"_target_": VALID_MODULE, "adapter": {"_target_": "os.system", "command": "true"}},
     "module.adapter._target_=os.system"),
    ({"_target_": VALID_MODULE, "loss": {"_target_": "sr_lab.losses.diffusion.EpsMSE",
                                         "_args_": [{"_target_": "os.system", "_args_": ["true"]}]}},
     "module.loss._args_[0]._target_=os.system"),
    ({"_target_": VALID_MODULE, "backbone": "${evil}"}, "module.backbone._target_=torch.load"),
    ({"_target_": "${evil._target_}"}, "module._target_=torch.load"),
    ({"_target_": VALID_MODULE, "adapter": "${oc.create:'{_target_: builtins.exec}'}"},
     "module.adapter._target_=builtins.exec"),
    ({"_target_": "sr_lab.modules.stage_io.__builtins__"}, "module._target_=sr_lab.modules.stage_io.__builtins__"),
    ({"_target_": "sr_lab.models.backbone.torch"}, "module._target_=sr_lab.models.backbone.torch"),
])
def test_nested_and_interpolated_targets_are_refused(node, where, tmp_path):
    folder = _export(tmp_path / "export", {"evil": {"_target_": "torch.load", "f": "x"}, "module": node})
    with pytest.raises(StageLoadError) as err:
        load_stage(folder)
    assert where in _one_line(str(err.value))
    src = StageSource(folder, OmegaConf.load(folder / "config.yaml"), {})
    with pytest.raises(StageLoadError, match=where.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        build_stage(src)


def test_an_unresolvable_target_is_refused_and_other_broken_values_are_not_targets():
    with pytest.raises(UnsafeTarget, match="cannot be resolved"):
        check_targets(OmegaConf.create({"module": {"_target_": "${nope}"}}).module)
    # a missing/unresolvable plain value is not a target: left to instantiate to complain about
    check_targets(OmegaConf.create({"module": {"_target_": VALID_MODULE, "a": "???", "b": "${nope}",
                                               "me": "${module}"}}).module)


def test_temporary_nodes_made_by_resolvers_are_all_checked():
    # nodes made by oc.create are temporary: a freed one's id must not make a later node look checked
    items = {f"a{i}": "${oc.create:'{x: 1}'}" for i in range(50)}
    items["z"] = "${oc.create:'{_target_: torch.load}'}"
    with pytest.raises(UnsafeTarget, match=r"module\.z\._target_=torch\.load"):
        check_targets(OmegaConf.create({"module": items}).module)


def test_the_target_path_is_checked_before_anything_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sr_lab_evil_mod.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                                 "def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnsafeTarget, match="sr_lab_evil_mod.f"):
        check_targets({"_target_": "sr_lab_evil_mod.f"}, "stored config", key="module")
    with pytest.raises(UnsafeTarget, match="cannot be located"):
        check_targets({"_target_": "sr_lab.models.sr_lab_evil_mod.f"}, "stored config", key="module")
    assert not marker.exists() and "sr_lab_evil_mod" not in sys.modules


def test_library_targets_are_the_repo_optimizers_by_exact_path(monkeypatch):
    for target in ("torch.optim.Adam", "torch.optim.AdamW"):  # optim.optimizer of the presets
        check_targets({"optimizer": {"_target_": target, "_partial_": True}}, "stored config", key="module")
    for target in ("torch.optim.SGD", "torch.optim.adamw.AdamW", "lightning.pytorch.Trainer",
                   "torch.optim.AdamW.step"):
        with pytest.raises(UnsafeTarget, match="module.optimizer._target_=" + re.escape(target) + " "):
            check_targets({"optimizer": {"_target_": target}}, "stored config", key="module")
    monkeypatch.setattr(si, "LIBRARY_TARGETS", frozenset({"torch.optim.SGD"}))
    check_targets({"_target_": "torch.optim.SGD"}, "stored config", key="x")


def test_safe_instantiate_builds_allowed_targets():
    sched = safe_instantiate(OmegaConf.create({"_target_": "sr_lab.diffusion.timesteps.UniformTimesteps"}))
    assert type(sched).__module__ == "sr_lab.diffusion.timesteps"
    with pytest.raises(UnsafeTarget):
        safe_instantiate({"_target_": "builtins.print"})


@pytest.mark.parametrize("target", ["builtins.eval", "os.system"])
def test_load_frozen_stage_refuses_a_crafted_adapter(target, tmp_path):
    # a chained stage (stage1=<export>) is rebuilt from its stored config on the shared backbone
    folder = _export(tmp_path / "stage1" / "export", {"module": {
        "_target_": VALID_MODULE, "adapter": {"_target_": target, "_args_": ["touch " + str(tmp_path / "x")]}}})
    backbone = types.SimpleNamespace(name="tiny", unet=None)
    with pytest.raises(StageLoadError) as err:
        load_frozen_stage(folder, backbone)
    msg = _one_line(str(err.value))
    assert f"module.adapter._target_={target}" in msg and str(folder) in msg
    assert not (tmp_path / "x").exists()


def test_load_frozen_stage_refuses_torch_load(tmp_path):
    marker = tmp_path / "pwned"
    evil = _pickle(tmp_path / "evil.pt", marker)
    folder = _export(tmp_path / "stage1" / "export", {"module": {
        "_target_": VALID_MODULE, "adapter": {"_target_": "torch.load", "f": str(evil), "weights_only": False}}})
    with pytest.raises(StageLoadError, match=r"module\.adapter\._target_=torch\.load"):
        load_frozen_stage(folder, types.SimpleNamespace(name="tiny", unet=None))
    assert not marker.exists()


def _preset_config(name: str, scale: str, out: Path):
    ov = [f"experiment={name}", f"scale={scale}"]
    cfg = compose_train(ov, out)
    extra = []
    if OmegaConf.is_missing(cfg, "stage1"):
        extra.append(f"stage1={out / 'stage1' / 'export'}")
    return compose_train([*ov, *extra], out) if extra else cfg


@pytest.mark.parametrize("scale", ["toy", "paper"])
@pytest.mark.parametrize("name", presets())
def test_every_preset_config_is_accepted(name, scale, tmp_path):
    cfg = _preset_config(name, scale, tmp_path)
    OmegaConf.resolve(cfg)
    # what build_stage / sr-infer / load_frozen_stage instantiate from a stored config
    for key in ("module", "backbone", "sampler", "adapter"):
        check_targets(cfg[key], "preset config", key=key)
    if "adapter" in cfg.module:
        check_targets(cfg.module.adapter, "preset config")
    # stored exactly as sr-train's export writes it, and read back through the stage layer
    stored = OmegaConf.to_container(cfg, resolve=True)
    stored.pop("hydra", None)
    folder = _export(tmp_path / "export", stored)
    src = read_stage_source(folder)
    check_targets(src.config.module, "stored config")


def test_undeclared_sr_lab_functions_are_refused():
    """Only functions that declare themselves components (samplers, backbone builders) may be named: an sr_lab
    function that writes files from config values (the record-shard writer) is refused."""
    from sr_lab.config.safe_instantiate import UnsafeTarget, check_targets

    with pytest.raises(UnsafeTarget, match="module._target_=sr_lab.data.records.write_shard"):
        check_targets({"_target_": "sr_lab.data.records.write_shard", "folder": "/tmp/x"}, key="module")
    check_targets({"_target_": "sr_lab.diffusion.samplers.renoise.sample"}, key="sampler")
    check_targets({"_target_": "sr_lab.models.backbone.build_tiny"}, key="backbone")

"""sr-infer / sr-eval reliability (issue 12): everything that can fail cheaply fails before the model is
loaded, in one line with exit 2 — unwritable output/seed folders, a single unreadable input, decoder vs
denoising stages swapped, a broken stored config (the file named), a corrupt ``stage1=`` file, an
evaluation with nothing to pair — and the inference progress has a known total (images × seeds × model
calls) shown as plain log lines when the output is not a terminal."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import sr_lab.inference.stage as stage_mod
import sr_lab.modules.stage_io as stage_io
from sr_lab.config.validation import ConfigError
from sr_lab.inference import SRPipeline, StageLoadError, load_stage
from sr_lab.inference.progress import InferenceProgress, resolve_mode
from sr_lab.inference.run import InferInputError, OutputDirError, check_run_dir_before_hydra, run_inference
from sr_lab.train import CONF_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(trained_run):
    """A 1-iteration tiny CCSR stage-1 run (conftest): export folder + last.ckpt (a denoising stage)."""
    return trained_run


@pytest.fixture(scope="module")
def export(run_dir):
    return run_dir / "export"


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory, tiny_backbone):
    """The export of a decoder stage (StableSR CFW: DecoderGANFinetune, capabilities {"decoder"})."""
    from stage_inputs import stage1_export

    return stage1_export("stablesr_cfw", tmp_path_factory.mktemp("cfw"), tiny_backbone)


@pytest.fixture
def no_model(monkeypatch):
    """Reading a stage's tensors or building it fails the test: the check must come first."""
    def boom(*a, **k):
        raise AssertionError("a stage was loaded before the check")

    for mod in (stage_mod, stage_io):
        for name in ("read_stage_source", "build_stage", "load_stage"):
            monkeypatch.setattr(mod, name, boom)


def compose_infer(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_infer_rel"):
        return compose(config_name="infer", overrides=list(overrides))


def compose_eval(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_eval_rel"):
        return compose(config_name="eval", overrides=list(overrides))


def _png(path: Path, size=(10, 8), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return path


def _chmod_blocks_writes(folder: Path) -> bool:
    """chmod 0o500 ``folder``; whether that really stops writes (it does not for root)."""
    folder.chmod(0o500)
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    folder.chmod(0o700)
    return False


def _cli(module: str, *args: str, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    # printed once: not a second time through the console log handler (stdout)
    assert (proc.stdout + proc.stderr).count(lines[0][len(prefix):]) == 1, proc.stdout[-2000:]
    return lines[0]


# ---------------------------------------------------------------- 2. output folders
def test_unwritable_output_dir_fails_before_the_model_loads(export, tmp_path, no_model):
    img = _png(tmp_path / "x.png")
    (tmp_path / "afile").write_text("a regular file")
    base = [f"checkpoint={export}", f"input={img}", "progress=false"]
    with pytest.raises(OutputDirError, match=r"output_dir=.*afile/sub cannot be created: .*afile is not a folder"):
        run_inference(compose_infer([*base, f"output_dir={tmp_path / 'afile' / 'sub'}"]))
    locked = tmp_path / "locked"
    locked.mkdir()
    if _chmod_blocks_writes(locked):  # not as root
        try:
            with pytest.raises(OutputDirError, match=r"output_dir=.*locked cannot be created or written"):
                run_inference(compose_infer([*base, f"output_dir={locked}"]))
        finally:
            locked.chmod(0o700)


def test_unwritable_seed_folder_fails_before_the_model_loads(export, tmp_path, no_model):
    img = _png(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "seed_3").write_text("a file where the seed folder goes")
    cfg = compose_infer([f"checkpoint={export}", f"input={img}", f"output_dir={out}", "seeds=[0,3]",
                         "progress=false"])
    with pytest.raises(OutputDirError, match=r"seed folder .*out/seed_3 \(output_dir=.*\) is not a folder"):
        run_inference(cfg)
    (out / "seed_3").unlink()
    (out / "seed_3").mkdir()
    if _chmod_blocks_writes(out / "seed_3"):
        try:
            with pytest.raises(OutputDirError,
                               match=r"seed folder .*seed_3 \(output_dir=.*\) cannot be created or written"):
                run_inference(cfg)
        finally:
            (out / "seed_3").chmod(0o700)
    assert not [p for p in out.rglob("*") if p.is_file()]  # the probe file is gone


def test_cli_unwritable_output_dir_is_one_line_before_hydra(export, tmp_path):
    img = _png(tmp_path / "x.png")
    (tmp_path / "afile").write_text("a regular file")
    proc = _cli("sr_lab.inference.run", f"checkpoint={export}", f"input={img}",
                f"output_dir={tmp_path / 'afile' / 'sub'}")
    line = _one_line_error(proc, "output error: ")
    assert "afile/sub" in line and "Unable to configure handler" not in proc.stderr
    # the same check, in process: Hydra flags are left to Hydra; hydra.run.dir wins over output_dir
    args = [f"output_dir={tmp_path}/ok", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"]
    with pytest.raises(OutputDirError, match="hydra.run.dir="):
        check_run_dir_before_hydra(args, "infer", ("hydra.run.dir", "output_dir"))
    check_run_dir_before_hydra([*args, "--cfg", "job"], "infer", ("hydra.run.dir", "output_dir"))
    check_run_dir_before_hydra([f"output_dir='{tmp_path}/q/${{now:%H}}'"], "infer", ("hydra.run.dir", "output_dir"))
    assert (tmp_path / "q").is_dir()  # the part before the interpolation was probed


# ---------------------------------------------------------------- 3. unreadable inputs
def test_single_unreadable_input_exits_2_before_the_model_loads(export, tmp_path, no_model):
    bad = _broken(tmp_path / "bad.png")
    out = tmp_path / "out"
    with pytest.raises(InferInputError, match=r"input=.*bad\.png cannot be read: "):
        run_inference(compose_infer([f"checkpoint={export}", f"input={bad}", f"output_dir={out}"]))
    assert not (out / "seed_0").exists() and not (out / "run.json").exists()


def test_cli_single_unreadable_input(export, tmp_path):
    bad = _broken(tmp_path / "bad.png")
    proc = _cli("sr_lab.inference.run", f"checkpoint={export}", f"input={bad}", f"output_dir={tmp_path / 'o'}")
    line = _one_line_error(proc, "input error: ")
    assert "bad.png cannot be read" in line
    assert not (tmp_path / "o" / "run.json").exists()
    assert "bad.png cannot be read" in (tmp_path / "o" / "infer.log").read_text()  # the log file has it too


def test_folder_of_only_unreadable_inputs_exits_2(export, tmp_path):
    _broken(tmp_path / "in" / "a.png")
    _broken(tmp_path / "in" / "b.png")
    with pytest.raises(InferInputError, match=r"none of its 2 image\(s\) could be read \(first: .*a\.png"):
        run_inference(compose_infer([f"checkpoint={export}", f"input={tmp_path / 'in'}",
                                     f"output_dir={tmp_path / 'o'}", "progress=false"]))
    assert not (tmp_path / "o" / "run.json").exists()


# ---------------------------------------------------------------- 4. stage kinds
def test_decoder_and_denoising_stages_swapped_fail_from_the_stored_config(export, decoder_export, tmp_path,
                                                                         no_model):
    img = _png(tmp_path / "x.png")
    base = [f"input={img}", f"output_dir={tmp_path / 'o'}"]
    with pytest.raises(ConfigError) as err:
        run_inference(compose_infer([*base, f"checkpoint={decoder_export}"]))
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint=" in msg and "does not denoise" in msg
    assert "give it as decoder_checkpoint=" in msg
    with pytest.raises(ConfigError) as err:
        run_inference(compose_infer([*base, f"checkpoint={export}", f"decoder_checkpoint={export}"]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"decoder_checkpoint={export} is a ccsr_stage1 stage without a "
                                              f"trained decoder")
    assert "give it as checkpoint=" in msg


def test_a_ckpt_of_the_wrong_kind_fails_before_the_model_is_built(run_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("built")

    monkeypatch.setattr(stage_mod, "build_stage", boom)
    img = _png(tmp_path / "x.png")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"decoder_checkpoint=.*last\.ckpt is a ccsr_stage1 stage without"):
        run_inference(compose_infer([f"checkpoint={run_dir / 'export'}", f"decoder_checkpoint={ckpt}",
                                     f"input={img}", f"output_dir={tmp_path / 'o'}"]))


def test_cli_decoder_stage_as_checkpoint_is_one_line(decoder_export, tmp_path):
    img = _png(tmp_path / "x.png")
    proc = _cli("sr_lab.inference.run", f"checkpoint={decoder_export}", f"input={img}",
                f"output_dir={tmp_path / 'o'}")
    line = _one_line_error(proc, "config error: ")
    assert "does not denoise (a decoder stage: give it as decoder_checkpoint=)" in line
    assert "AttributeError" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------- 5. the file that is wrong
def _copy_export(export: Path, dst: Path) -> Path:
    shutil.copytree(export, dst)
    return dst


def test_broken_stored_config_names_config_yaml(export, tmp_path):
    img = _png(tmp_path / "x.png")
    unparsable = _copy_export(export, tmp_path / "unparsable")
    (unparsable / "config.yaml").write_text("module: [\n  _target_: x\n")
    no_module = _copy_export(export, tmp_path / "no_module")
    stored = OmegaConf.load(export / "config.yaml")
    del stored["module"]
    OmegaConf.save(stored, no_module / "config.yaml")
    dangling = _copy_export(export, tmp_path / "dangling")
    stored = OmegaConf.load(export / "config.yaml")
    stored.sampler.t_max = "${nope.x}"
    OmegaConf.save(stored, dangling / "config.yaml")
    for folder, what in ((unparsable, "cannot read"), (no_module, "no module._target_"),
                         (dangling, "does not resolve")):
        cfg = compose_infer([f"checkpoint={folder}", f"input={img}", f"output_dir={tmp_path / 'o'}"])
        with pytest.raises(StageLoadError) as err:
            run_inference(cfg)
        msg = str(err.value)
        assert str(folder / "config.yaml") in msg and what in msg and "safetensors" not in msg, msg
        assert "\n" not in msg
    with pytest.raises(StageLoadError, match=r"no_module/config\.yaml: stored config has no 'module'"):
        load_stage(no_module)


def test_corrupt_stage1_file_is_named(export, tmp_path):
    from sr_lab.config.validation import validate_config

    corrupt_ckpt = tmp_path / "stage1.ckpt"
    corrupt_ckpt.write_bytes(b"\x00\x01 not a checkpoint")
    bad_yaml = _copy_export(export, tmp_path / "bad_yaml")
    (bad_yaml / "config.yaml").write_text("module: [\n")
    bad_weights = _copy_export(export, tmp_path / "bad_weights")
    (bad_weights / "trainable.safetensors").write_bytes(b"\xff" * 16)
    base = ["experiment=ccsr_stage2", "perceptual.allow_random_init=true"]
    for value, wrong in ((corrupt_ckpt, corrupt_ckpt), (bad_yaml, bad_yaml / "config.yaml"),
                         (bad_weights / "trainable.safetensors", bad_weights / "trainable.safetensors")):
        with pytest.raises(ConfigError) as err:
            validate_config(compose_train([*base, f"stage1={value}"], tmp_path / "run"))
        msg = str(err.value)
        assert msg.startswith(f"stage1={value}: {wrong} cannot be read") and "\n" not in msg, msg
    validate_config(compose_train([*base, f"stage1={export}"], tmp_path / "run"))  # a good one passes
    loose = tmp_path / "loose" / "w.safetensors"
    loose.parent.mkdir()
    shutil.copy(export / "trainable.safetensors", loose)
    with pytest.raises(ConfigError, match=r"w\.safetensors: its folder .*loose lacks config\.yaml"):
        validate_config(compose_train([*base, f"stage1={loose}"], tmp_path / "run"))


# ---------------------------------------------------------------- 6. sr-eval with nothing to pair
def test_eval_needs_hr_dir_for_reference_metrics(tmp_path):
    from sr_lab.eval.config import validate_eval_config

    _png(tmp_path / "sr" / "a.png")
    base = [f"sr_dir={tmp_path / 'sr'}", f"paths.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"hr_dir is required: metrics.names lists psnr, fid, which need SR/HR"):
        validate_eval_config(compose_eval([*base, "metrics.names=[psnr,niqe,fid]"]))
    validate_eval_config(compose_eval([*base, "metrics.names=[niqe,musiq]"]))  # no-reference only: fine


def test_eval_without_pairs_exits_2_before_metrics_or_inference(tmp_path, monkeypatch):
    from sr_lab.eval import run as eval_run
    from sr_lab.eval.config import EvalInputError

    def boom(*a, **k):
        raise AssertionError("built / ran before the pairing check")

    monkeypatch.setattr(eval_run, "build_metrics", boom)
    _png(tmp_path / "sr" / "seed_0" / "a.png")
    _png(tmp_path / "hr" / "b_HR.png")
    _png(tmp_path / "lr" / "c.png")
    cfg = compose_eval([f"sr_dir={tmp_path / 'sr'}", f"hr_dir={tmp_path / 'hr'}", "metrics.names=[psnr,niqe]",
                        f"paths.output_dir={tmp_path / 'out'}", "logger=csv"])
    with pytest.raises(EvalInputError, match=r"no SR image in .*seed_0 \(1 file\(s\)\) pairs with an HR image.*psnr "
                                             r"need SR/HR pairs"):
        eval_run.run_eval(cfg)
    assert not (tmp_path / "out" / "summary.json").exists()
    import sr_lab.eval.inference as eval_inf

    monkeypatch.setattr(eval_inf, "run_inference_for_eval", boom)
    cfg = compose_eval(["run_inference=true", f"infer.checkpoint={tmp_path}", f"lr_dir={tmp_path / 'lr'}",
                        f"hr_dir={tmp_path / 'hr'}", "metrics.names=[ssim]", f"paths.output_dir={tmp_path / 'o2'}",
                        "logger=csv"])
    with pytest.raises(EvalInputError, match=r"no LR image in .*lr \(1 file\(s\)\) pairs with an HR image"):
        eval_run._sr_root(cfg, tmp_path / "o2", {})


def test_eval_where_nothing_could_be_scored_exits_2(tmp_path):
    pytest.importorskip("pyiqa")
    from sr_lab.eval.config import EvalInputError
    from sr_lab.eval.run import run_eval

    _png(tmp_path / "sr" / "a.png", size=(16, 16))
    _png(tmp_path / "hr" / "a.png", size=(32, 32))  # pairs by stem, but the sizes differ
    cfg = compose_eval([f"sr_dir={tmp_path / 'sr'}", f"hr_dir={tmp_path / 'hr'}", "metrics.names=[psnr]",
                        f"paths.output_dir={tmp_path / 'out'}", "logger=csv", "metrics.device=cpu"])
    with pytest.raises(EvalInputError, match="nothing scored: no SR image in .* of the same size"):
        run_eval(cfg)


def test_cli_eval_without_hr_and_without_pairs(tmp_path):
    _png(tmp_path / "sr" / "a.png")
    _png(tmp_path / "hr" / "b.png")
    proc = _cli("sr_lab.eval.run", f"sr_dir={tmp_path / 'sr'}", f"hr_dir={tmp_path / 'hr'}",
                "metrics.names=[psnr]", f"hydra.run.dir={tmp_path / 'out'}")
    line = _one_line_error(proc, "input error: ")
    assert "pairs with an HR image" in line and not (tmp_path / "out" / "summary.json").exists()
    proc = _cli("sr_lab.eval.run", f"sr_dir={tmp_path / 'sr'}", "metrics.names=[ssim]",
                f"hydra.run.dir={tmp_path / 'out2'}")
    assert "hr_dir is required" in _one_line_error(proc, "config error: ")


# ---------------------------------------------------------------- 1. progress
def _records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sr_lab.infer"]


def test_progress_log_lines_have_the_right_totals(export, tmp_path, caplog):
    """Not a terminal (pytest captures both streams): plain lines, total = images x seeds x model calls; a
    skipped input takes its share off; the counted model calls reach exactly that total."""
    _png(tmp_path / "in" / "a.png", size=(10, 8))
    _png(tmp_path / "in" / "b.png", size=(12, 8))
    _broken(tmp_path / "in" / "c.png")
    _png(tmp_path / "in" / "d.png", size=(10, 8), value=30)
    cfg = compose_infer([f"checkpoint={export}", f"input={tmp_path / 'in'}", f"output_dir={tmp_path / 'o'}",
                         "seeds=[0,5]", "sampler=ddim", "sampler.steps=3", "seed_batch=1"])
    assert cfg.progress is True and resolve_mode(cfg.progress) == "log"
    with caplog.at_level(logging.INFO, logger="sr_lab.infer"):
        out = run_inference(cfg)
    meta = json.loads((out / "run.json").read_text())
    calls = meta["model_calls_per_image"]
    assert calls == 3 and [Path(s["input"]).name for s in meta["skipped"]] == ["c.png"]
    lines = _records(caplog)
    assert f"sr-infer: 4 image(s) x 2 seed(s) x 3 model calls = {4 * 2 * 3} model calls" in lines
    done = 3 * 2 * 3  # c.png skipped
    assert any(ln.startswith(f"sr-infer: {done} model calls in ") for ln in lines), lines
    steps = [ln for ln in lines if " model calls (" in ln]
    assert steps and steps[-1].endswith("ETA 0 s") and f"{done}/{done} model calls (100 %)" in steps[-1], steps
    assert any(ln.startswith("image 4/4 seed 5: 3 model calls, ") and " s/image; " in ln for ln in steps), steps
    assert all("\r" not in ln and "\x1b" not in ln for ln in lines)
    assert len(steps) <= 12  # every 10 % (or a minute), not every step


def test_pipeline_progress_counts_rows_and_calls(export, caplog):
    from functools import partial

    from sr_lab.diffusion.samplers import ddim

    stage, _ = load_stage(export)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="sr_lab.infer"):
        SRPipeline(stage, partial(ddim.sample, steps=4), progress="log", seed_batch=2)(lr, [0, 1, 2])
    lines = _records(caplog)
    assert "sampling: 2 image(s) x 3 seed(s) x 4 model calls = 24 model calls" in lines
    assert any(ln.startswith("sampling: 24 model calls in ") for ln in lines), lines
    # a bar (a terminal) gets the same total and reaches it
    prog = InferenceProgress(2, [0, 1, 2], 4, "bar", leave=False)
    SRPipeline(stage, partial(ddim.sample, steps=4), progress=prog)(lr, [0, 1, 2])
    assert prog._bar.total == prog.total == prog.done == 24
    prog.close()


def test_progress_mode_follows_the_terminals(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    for out, err, want in ((True, True, "bar"), (False, True, "log"), (True, False, "log"), (False, False, "log")):
        monkeypatch.setattr(sys, "stdout", Stream(out))
        monkeypatch.setattr(sys, "stderr", Stream(err))
        assert resolve_mode(True) == want and resolve_mode("auto") == want
    assert resolve_mode(False) == resolve_mode("none") == "off" and resolve_mode("log") == "log"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")

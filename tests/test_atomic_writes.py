"""Output files are written atomically (temp + rename in the same folder), with the user's umask, and
temporary files of a killed run are removed by the next run (project issue 12, item 3)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, compose_train
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from sr_lab.utils import atomic
from sr_lab.utils.atomic import (
    atomic_omegaconf_save,
    atomic_safetensors_save,
    atomic_save_image,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    is_temp_name,
    remove_stale_temps,
)
from sr_lab.utils.checkpoint_io import AtomicCheckpointIO


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield 0o644
    finally:
        os.umask(old)


# one writer per helper: (file name, write(path, version), read(path) -> version)
WRITERS = {
    "bytes": ("a.bin", lambda p, v: atomic_write_bytes(p, bytes([v]) * 10), lambda p: p.read_bytes()[0]),
    "text": ("a.json", lambda p, v: atomic_write_text(p, json.dumps({"v": v})), lambda p: json.loads(p.read_text())["v"]),
    "image": ("a.png", lambda p, v: atomic_save_image(p, np.full((4, 6, 3), v, np.uint8)),
              lambda p: int(np.asarray(Image.open(p))[0, 0, 0])),
    "torch": ("a.ckpt", lambda p, v: atomic_torch_save({"w": torch.full((3,), v)}, p),
              lambda p: int(torch.load(p, weights_only=True)["w"][0])),
    "safetensors": ("a.safetensors", lambda p, v: atomic_safetensors_save({"w": torch.full((3,), v)}, p, {"k": "x"}),
                    lambda p: int(load_file(p)["w"][0])),
    "omegaconf": ("a.yaml", lambda p, v: atomic_omegaconf_save(OmegaConf.create({"v": v, "r": "${v}"}), p, resolve=True),
                  lambda p: OmegaConf.load(p).v),
    "checkpoint_io": ("last.ckpt", lambda p, v: AtomicCheckpointIO().save_checkpoint({"step": v}, p),
                      lambda p: AtomicCheckpointIO().load_checkpoint(p)["step"]),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_failed_rename_keeps_the_previous_file_and_no_temp(kind, tmp_path, monkeypatch):
    name, write, read = WRITERS[kind]
    path = tmp_path / name
    write(path, 1)
    assert read(path) == 1
    real_replace, calls = os.replace, []

    def fail_once(src, dst):  # the process "dies" between the complete write and the rename
        calls.append((Path(src).name, Path(dst).name))
        assert Path(src).parent == Path(dst).parent and is_temp_name(Path(src).name)
        assert Path(src).stat().st_size > 0
        raise OSError("simulated failure before the rename")

    monkeypatch.setattr(os, "replace", fail_once)
    with pytest.raises(OSError, match="simulated"):
        write(path, 2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls and read(path) == 1 and temps(tmp_path) == []
    write(path, 3)  # and the next write goes through
    assert read(path) == 3 and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_writer_failing_midway_keeps_the_previous_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_text(path, '{"ok": 1}')

    def half(f):
        f.write(b'{"ok": ')
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"ok": 1} and temps(tmp_path) == []


KILLED_WRITER = r"""
import sys, time
from pathlib import Path
from sr_lab.utils.atomic import atomic_write
def writer(f):
    f.write(b"new but incomplete")
    f.flush()
    Path(sys.argv[2]).touch()
    time.sleep(60)
atomic_write(sys.argv[1], writer)
"""


def test_a_killed_write_leaves_the_earlier_file_and_the_next_run_removes_the_temp(tmp_path):
    out = tmp_path / "checkpoints"
    last = out / "last.ckpt"
    atomic_torch_save({"step": 1}, last)
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last), str(flag)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert torch.load(last, weights_only=True) == {"step": 1}  # the earlier checkpoint is intact
    left = temps(out)
    assert len(left) == 1 and left[0].startswith(".last.ckpt.")
    # written after this process started: may be another live writer's, so the default keeps it
    assert remove_stale_temps(out) == [] and temps(out) == left
    old = time.time() - 3600
    os.utime(out / left[0], (old, old))  # a leftover of an earlier (killed) run
    assert [p.name for p in remove_stale_temps(out)] == left
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt"]


def test_remove_stale_temps_removes_leftovers_and_nothing_else(tmp_path):
    old = time.time() - 3600
    stale = [tmp_path / ".a.png.k2j4_x9q.tmp", tmp_path / ".meta.json.12345.tmp",
             tmp_path / "seed_0" / "sub" / ".x.png.abcdefgh.tmp"]
    keep = [tmp_path / "a.png", tmp_path / "a.png.tmp", tmp_path / ".cache.tmp", tmp_path / ".hidden",
            tmp_path / ".a.png.abcdefgh.tmp.bak", tmp_path / "seed_0" / "x.png"]
    for p in stale + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    (tmp_path / ".d.abcdefgh.tmp").mkdir()  # a folder with a temp-like name
    (tmp_path / ".l.abcdefgh.tmp").symlink_to(tmp_path / "a.png")  # a link with a temp-like name
    fresh = tmp_path / ".b.png.zzzzzzzz.tmp"
    fresh.write_bytes(b"being written by a live process")

    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale[:2])  # not recursive: top level only
    assert [p.name for p in remove_stale_temps(tmp_path, recursive=True)] == [stale[2].name]
    assert all(p.exists() for p in keep) and fresh.exists()
    assert (tmp_path / ".d.abcdefgh.tmp").is_dir() and (tmp_path / ".l.abcdefgh.tmp").is_symlink()
    assert remove_stale_temps(tmp_path, older_than=None) == [fresh]  # no age limit: every match
    assert remove_stale_temps(tmp_path / "missing") == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_umask_mode_not_0600(umask, tmp_path):
    old = os.umask(umask)
    try:
        for kind, (name, write, _) in WRITERS.items():
            write(tmp_path / name, 1)
            assert mode(tmp_path / name) == 0o666 & ~umask, kind
            write(tmp_path / name, 2)  # replacing an existing file: same mode
            assert mode(tmp_path / name) == 0o666 & ~umask, kind
    finally:
        os.umask(old)


def test_umask_fallback_reads_and_restores_the_umask(monkeypatch, umask022):
    real_open = open

    def no_proc(file, *a, **k):
        if str(file).startswith("/proc/"):
            raise OSError("no /proc")
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(atomic, "_umask_cache", None)
    assert atomic.file_mode() == 0o644 and os.umask(0o022) == 0o022  # the umask was restored


def test_export_trainable_and_report_csv_are_atomic(tmp_path, umask022):
    from sr_lab.eval.report import _write_csv
    from sr_lab.train import export_trainable

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def trainable_state_keys(self):
            return {"a.weight", "a.bias"}

    m, cfg = Stage(), OmegaConf.create({"task_name": "t", "x": 1, "y": "${x}"})
    out = tmp_path / "export"
    export_trainable(m, out, cfg, ema={k: torch.zeros_like(v) for k, v in m.state_dict().items()})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "trainable.safetensors", "trainable_ema.safetensors"]
    assert {mode(p) for p in out.iterdir()} == {umask022}
    assert set(load_file(out / "trainable.safetensors")) == {"a.weight", "a.bias"}
    assert OmegaConf.load(out / "config.yaml").y == 1
    _write_csv(tmp_path / "per_image.csv", [{"image": "a", "psnr": 1.5}, {"image": "b", "lpips": None}])
    assert (tmp_path / "per_image.csv").read_bytes() == b"image,psnr,lpips\r\na,1.5,\r\nb,,\r\n"
    assert mode(tmp_path / "per_image.csv") == umask022


def test_model_checkpoint_save_last_goes_through_the_atomic_io(tmp_path, umask022):
    """``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` with ``trainer.save_checkpoint`` (a real
    file, not a link or a shutil copy), i.e. through AtomicCheckpointIO."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.w(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    saved = []

    class Spy(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            saved.append(Path(path).name)
            super().save_checkpoint(checkpoint, path, storage_options)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                           save_last=True, save_top_k=-1, every_n_train_steps=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, callbacks=[ckpt], plugins=[Spy()], default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), data)
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in files] == ["last.ckpt", "step0000001.ckpt", "step0000002.ckpt"]
    assert saved.count("last.ckpt") == 2 and not any(p.is_symlink() for p in files)
    assert {mode(p) for p in files} == {umask022} and temps(tmp_path) == []


def test_training_run_and_sr_infer_write_readable_files_and_clean_leftovers(tmp_path, umask022):
    """A short real run + sr-infer: every output has the umask's mode, and the temporary files a killed
    earlier run left in these folders are gone."""
    from hydra import compose, initialize_config_dir

    from sr_lab.inference.run import run_inference
    from sr_lab.train import CONF_DIR, run

    old = time.time() - 3600
    run_dir = tmp_path / "run"
    leftovers = [run_dir / "checkpoints" / ".last.ckpt.abc123_x.tmp", run_dir / "export" / ".trainable.safetensors.q1w2e3r4.tmp",
                 run_dir / ".metrics.json.zz99yy88.tmp"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
        os.utime(p, (old, old))
    run(compose_train([*FAST, "experiment=ccsr_stage1", "train.iterations=1", "train.ckpt_every=1", "train.val_every=1",
                       "data.crop_size=32", "data.batch_size=1", "train.total_batch_size=1", "data.num_val_images=1"],
                      run_dir))
    outputs = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(run_dir).as_posix() for p in outputs}
    assert {"checkpoints/last.ckpt", "export/trainable.safetensors", "export/config.yaml", "metrics.json"} <= names
    assert any(n.endswith(".png") for n in names)  # a validation image grid
    assert temps(run_dir) == []
    assert {p.relative_to(run_dir).as_posix(): mode(p) for p in outputs} == {n: umask022 for n in names}

    img = tmp_path / "in" / "x.png"
    img.parent.mkdir()
    Image.fromarray(np.full((8, 10, 3), 128, np.uint8)).save(img)
    out = tmp_path / "sr"
    stale = out / "seed_0" / ".x.png.k2j4_x9q.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (old, old))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_atomic"):
        cfg = compose(config_name="infer", overrides=[f"checkpoint={run_dir / 'export'}", f"input={img.parent}",
                                                      f"output_dir={out}", "sampler=ddim", "sampler.steps=1",
                                                      "progress=false", "upscale=2"])
    run_inference(cfg)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["run.json", "seed_0/x.png"]
    assert mode(out / "run.json") == mode(out / "seed_0" / "x.png") == umask022

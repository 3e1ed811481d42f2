"""Tests for sr_lab.data: robust loading, folder dataset, counter sampler, datamodule resume/degradation."""
from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from sr_lab.data import (
    CounterSampler,
    HRFolderDataset,
    ImageReadError,
    SRDataModule,
    find_images,
    probe_image,
    read_rgb_uint8,
    sample_image_dir,
)

CROP = 64
REPO = Path(__file__).resolve().parents[1]


def _rgb(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_png48(path: Path, arr: np.ndarray):
    """Minimal 16-bit-per-channel RGB PNG writer (Pillow cannot write 48-bit PNGs)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Mixed folder: 3 RGB (nested, upper-case ext), gray, RGBA, 16-bit, 48-bit, 2 truncated, 1 fake, 1 small."""
    root = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    _rgb(rng, 96, 80).save(root / "a" / "rgb1.png")
    _rgb(rng, 100, 90).save(root / "a" / "b" / "rgb2.jpg", quality=95)
    _rgb(rng, 72, 72).save(root / "rgb3.PNG")
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8), "L").save(root / "gray.png")
    rgba = rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)
    rgba[:, :40, 3] = 0  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray((rng.integers(0, 256, (80, 80)) * 257).astype(np.uint16)).save(root / "i16.png")
    _write_png48(root / "rgb48.png", (rng.integers(0, 256, (70, 70, 3)) * 257).astype(np.uint16))
    _rgb(rng, 96, 96).save(root / "a" / "trunc.jpg", quality=95)
    _truncate(root / "a" / "trunc.jpg")
    _rgb(rng, 96, 96).save(root / "trunc.png")
    _truncate(root / "trunc.png")
    (root / "fake.png").write_text("this is not an image\n")
    _rgb(rng, 40, 40).save(root / "small.png")
    (root / "notes.txt").write_text("ignored")
    return root


USABLE = {"rgb1.png", "rgb2.jpg", "rgb3.PNG", "gray.png", "rgba.png", "i16.png", "rgb48.png", "trunc.jpg", "trunc.png"}
TRUNCATED = {"trunc.jpg", "trunc.png"}
EXCLUDED = {"fake.png", "small.png"}


def _names(paths):
    return {os.path.basename(p) for p in paths}


def _toy_degradation(hr, g):
    lr = F.avg_pool2d(hr, 4)
    noise = torch.randn(lr.shape, generator=g, device=hr.device) * 0.05
    return {"hr": hr, "lr": (lr + noise).clamp(0, 1)}


def _dm(folder, **kw):
    args = dict(hr_dirs=str(folder), crop_size=CROP, batch_size=4, degradation=_toy_degradation)
    args.update(kw)
    return SRDataModule(**args)


def _train_batches(dm, k):
    """k processed training batches, re-iterating the loader at data-epoch ends as Lightning does."""
    loader, out = dm.train_dataloader(), []
    while len(out) < k:
        n0 = len(out)
        for b in loader:
            out.append(dm.on_after_batch_transfer(b, 0))
            if len(out) == k:
                break
        assert len(out) > n0, "an epoch yielded no batch"
    return out


# ---------------------------------------------------------------- files and decoding
def test_find_images(folder, tmp_path):
    files = find_images(str(folder))
    assert files == sorted(files)
    assert _names(files) == USABLE | EXCLUDED  # recursive, case-insensitive, .txt ignored
    assert _names(find_images([folder / "a"], recursive=False)) == {"rgb1.png", "trunc.jpg"}
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        find_images([str(folder), str(tmp_path / "does_not_exist")])


def test_read_and_convert(folder, monkeypatch):
    arr, note = read_rgb_uint8(folder / "a" / "rgb1.png")
    assert arr.shape == (80, 96, 3) and arr.dtype == np.uint8 and note is None
    g, note = read_rgb_uint8(folder / "gray.png")
    assert g.shape == (80, 80, 3) and "L" in note and (g[..., 0] == g[..., 2]).all()
    a, note = read_rgb_uint8(folder / "rgba.png")
    assert "white" in note and (a[:, :40] == 255).all()  # transparent -> white
    i16, note = read_rgb_uint8(folder / "i16.png")
    src = np.asarray(Image.open(folder / "i16.png")).astype(np.int64)
    assert "16-bit" in note and np.array_equal(i16[..., 1], (src // 257).astype(np.uint8))
    a48, note = read_rgb_uint8(folder / "rgb48.png")
    assert a48.shape == (70, 70, 3) and "16-bit" in note
    assert probe_image(folder / "a" / "b" / "rgb2.jpg") == (100, 90)

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone enabled it globally
    for name in ("a/trunc.jpg", "trunc.png", "fake.png"):
        with pytest.raises(ImageReadError) as ei:
            read_rgb_uint8(folder / name)
        assert ei.value.reason and name.split("/")[-1] in str(ei.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert probe_image(folder / "trunc.png") == (96, 96)  # header is intact: fails only at load time
    with pytest.raises(ImageReadError):
        probe_image(folder / "fake.png")


# ---------------------------------------------------------------- dataset
def test_dataset_probe_exclusions_and_fallback(folder, caplog):
    files = find_images(folder)
    with caplog.at_level(logging.WARNING, logger="sr_lab.data"):
        ds = HRFolderDataset(files, CROP, seed=0)
    warns = [r.getMessage() for r in caplog.records if r.name == "sr_lab.data" and r.levelno >= logging.WARNING]
    assert len(warns) == len(EXCLUDED)
    for name in EXCLUDED:
        assert sum(name in m for m in warns) == 1
    assert _names(ds.files) == USABLE and _names(p for p, _ in ds.excluded) == EXCLUDED

    n = len(ds)
    items = [ds[i] for i in range(2 * n)]  # two data-epochs
    assert all(it["hr"].shape == (3, CROP, CROP) and it["hr"].dtype == torch.uint8 for it in items)
    skipped = [it["skipped"] for it in items if it["skipped"] >= 0]
    assert len(skipped) == 2 * len(TRUNCATED)  # each truncated file is drawn once per epoch
    assert _names(ds.files[i] for i in skipped) == TRUNCATED
    # every epoch visits each file once (permutation)
    perm0, perm1 = ds.permutation(0), ds.permutation(1)
    assert sorted(perm0.tolist()) == list(range(n)) and not torch.equal(perm0, perm1)


def test_dataset_determinism(folder):
    files = find_images(folder)
    a, b, c = (HRFolderDataset(files, CROP, seed=s) for s in (7, 7, 8))
    for n in (0, 3, 11, 25):
        assert torch.equal(a[n]["hr"], b[n]["hr"])
    assert any(not torch.equal(a[n]["hr"], a[n + 1]["hr"]) for n in range(5))
    assert any(not torch.equal(a[n]["hr"], c[n]["hr"]) for n in range(5))
    ev = HRFolderDataset(files, CROP, seed=0, train=False)
    arr, _ = read_rgb_uint8(ev.files[0])
    top, left = (arr.shape[0] - CROP) // 2, (arr.shape[1] - CROP) // 2
    expect = torch.from_numpy(arr[top : top + CROP, left : left + CROP].transpose(2, 0, 1).copy())
    assert torch.equal(ev[0]["hr"], expect) and ev[0]["index"] == 0


def test_no_usable_image_and_argument_errors(folder, tmp_path):
    bad = tmp_path / "bad"
    (bad / "sub").mkdir(parents=True)
    (bad / "sub" / "fake.jpg").write_text("nope")
    Image.new("RGB", (40, 40)).save(bad / "small.png")
    with pytest.raises(ValueError, match=r"(?s)bad.*2 image file\(s\).*crop_size=64"):
        _dm(bad).setup("fit")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="0 image file"):
        _dm(empty).setup("fit")
    with pytest.raises(ValueError, match="crop_size=512"):  # larger than every image
        _dm(folder, crop_size=512).setup("fit")
    for kw, arg in [({"crop_size": 100}, "crop_size"), ({"crop_size": 0}, "crop_size"),
                    ({"batch_size": 0}, "batch_size"), ({"num_val_images": 0}, "num_val_images"),
                    ({"samples_per_epoch": 0}, "samples_per_epoch")]:
        with pytest.raises(ValueError, match=arg):
            _dm(folder, **kw)
    _dm(folder, crop_size=48, crop_multiple=16)  # other multiples are configurable


# ---------------------------------------------------------------- sampler
def test_counter_sampler_epochs_and_ddp():
    s = CounterSampler(0, samples_per_epoch=12, batch_size=4)
    assert list(s) == list(range(12)) and len(s) == 12
    assert list(CounterSampler(20, 12, 4)) == list(range(20, 24))  # rest of data-epoch 1
    # not a multiple of the global batch: the tail of an epoch is dropped, iteration moves on
    assert list(CounterSampler(8, 10, 4)) == list(range(10, 18))
    # DDP: rank r takes start + k*W + r; ranks are disjoint and together cover the block
    r0, r1 = (list(CounterSampler(8, 32, 4, world_size=2, rank=r)) for r in (0, 1))
    assert r0 == list(range(8, 32, 2)) and r1 == list(range(9, 32, 2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(8, 32))
    assert len(CounterSampler(0, 32, 4, world_size=2, rank=1)) == 16
    with pytest.raises(ValueError, match="samples_per_epoch"):
        CounterSampler(0, 6, 4, world_size=2)
    # the start is read at iteration time (datamodule's consumed_samples)
    state = {"n": 0}
    lazy = CounterSampler(lambda: state["n"], 8, 4)
    state["n"] = 4
    assert list(lazy) == [4, 5, 6, 7]


def test_ddp_batches_and_consumed(folder):
    dms = [_dm(folder, samples_per_epoch=16) for _ in range(2)]
    for r, dm in enumerate(dms):
        dm.trainer = SimpleNamespace(training=True, world_size=2, global_rank=r)
    b0, b1 = (next(iter(dm.train_dataloader())) for dm in dms)
    assert b0["index"].tolist() == [0, 2, 4, 6] and b1["index"].tolist() == [1, 3, 5, 7]
    for dm, b in zip(dms, (b0, b1)):
        dm.on_after_batch_transfer(b, 0)
        assert dm.consumed_samples == 8  # global batch, same on every rank


# ---------------------------------------------------------------- datamodule
def test_resume_matches_uninterrupted(folder):
    ref = _dm(folder, samples_per_epoch=12)  # 3 batches per data-epoch
    ref.setup("fit")
    full = _train_batches(ref, 8)
    assert torch.cat([b["index"] for b in full]).tolist() == list(range(32))
    for cut in (3, 4):  # at an epoch boundary and mid-epoch
        first = _dm(folder, samples_per_epoch=12)
        first.setup("fit")
        _train_batches(first, cut)
        state = first.state_dict()
        assert state == {"consumed_samples": 4 * cut}
        resumed = _dm(folder, samples_per_epoch=12)
        resumed.load_state_dict(state)
        resumed.setup("fit")
        rest = _train_batches(resumed, 8 - cut)
        for a, b in zip(full[cut:], rest):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])
    loader = ref.train_dataloader()
    assert loader.state_dict() == ref.state_dict() and len(loader) == 3


def test_workers_do_not_change_batches(folder):
    a, b = _dm(folder, samples_per_epoch=8), _dm(folder, samples_per_epoch=8, num_workers=2)
    for x, y in zip(_train_batches(a, 2), _train_batches(b, 2)):
        assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"])


def test_on_after_batch_transfer(folder):
    dm = _dm(folder)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["hr"].dtype == torch.uint8
    o1 = dm.on_after_batch_transfer(dict(batch), 0)
    o2 = _dm(folder).on_after_batch_transfer(dict(batch), 0)
    assert set(o1) == {"hr", "lr", "index"}
    assert o1["hr"].dtype == torch.float32 and 0 <= o1["hr"].min() and o1["hr"].max() <= 1
    assert o1["lr"].shape == (4, 3, CROP // 4, CROP // 4) and torch.equal(o1["lr"], o2["lr"])
    other = dm.on_after_batch_transfer(dict(batch, first_index=batch["first_index"] + 4), 0)
    assert not torch.equal(o1["lr"], other["lr"])  # degradation noise is keyed by the counter
    assert torch.equal(_dm(folder, degradation=None).on_after_batch_transfer(dict(batch), 0)["hr"], o1["hr"])


def test_skip_report_and_single_warning(folder, caplog):
    dm = _dm(folder, samples_per_epoch=len(USABLE) // 4 * 4)
    dm.setup("fit")
    ds = dm.train_dataset
    expected = sum(ds[n]["skipped"] >= 0 for n in range(3 * dm.effective_samples_per_epoch()))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sr_lab.data"):
        _train_batches(dm, 3 * dm.effective_samples_per_epoch() // 4)
    warns = [r.getMessage() for r in caplog.records if r.name == "sr_lab.data"]
    assert expected > len(TRUNCATED) and len(warns) == len(TRUNCATED)
    assert {n for n in TRUNCATED if any(n in m for m in warns)} == TRUNCATED
    skipped = dm.skipped_files()  # distinct files, not load attempts; plus the setup exclusions
    assert _names(skipped) == TRUNCATED | EXCLUDED and dm.skipped_count() == len(skipped)
    assert all("load time" in skipped[p] for p in skipped if os.path.basename(p) in TRUNCATED)


def test_validation_batches_identical(folder):
    dm = _dm(folder, num_val_images=3, val_batch_size=2)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=False, world_size=1, global_rank=0)

    def run():
        return [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]

    v1, v2 = run(), run()
    assert [b["hr"].shape[0] for b in v1] == [2, 1]
    assert dm.val_dataset.files == dm.train_dataset.files[:3]
    for a, b in zip(v1, v2):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])
    assert dm.consumed_samples == 0  # validation does not advance the training counter
    other = _dm(folder, val_dirs=str(folder / "a"), num_val_images=4)
    other.setup("validate")
    assert _names(other.val_dataset.files) == {"rgb1.png", "rgb2.jpg", "trunc.jpg"}


def test_default_sample_images(caplog):
    with caplog.at_level(logging.WARNING, logger="sr_lab.data"):
        dm = SRDataModule(crop_size=128, batch_size=4, degradation=_toy_degradation)
        dm.setup("fit")
    assert not [r for r in caplog.records if r.name == "sr_lab.data"]  # quiet for the shipped samples
    assert dm.train_dataset.source == sample_image_dir() and len(dm.train_dataset) >= 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["hr"].shape == (4, 3, 128, 128)
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["hr"].shape == (4, 3, 128, 128) and out["lr"].shape == (4, 3, 32, 32)
    assert len(dm.val_dataset) == 4


def test_hydra_configs():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge({"seed": 5}, {"data": OmegaConf.load(REPO / "conf/data/sample_images.yaml")})
    dm = instantiate(cfg.data)
    assert isinstance(dm, SRDataModule) and dm.seed == 5 and dm.crop_size == 128 and dm.hr_dirs is None
    folder_cfg = OmegaConf.load(REPO / "conf/data/folder.yaml")
    assert OmegaConf.is_missing(folder_cfg, "hr_dirs") and folder_cfg.crop_size % 32 == 0


def test_lightning_resume(folder, tmp_path):
    """End to end with a Trainer: a run resumed mid-epoch from a checkpoint sees the same samples."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.w - batch["lr"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None):
        dm, model = _dm(folder, samples_per_epoch=12), Recorder()
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, model, dm

    _, full, _ = fit(7)
    trainer, first, _ = fit(4)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rest, dm = fit(7, str(tmp_path / "mid.ckpt"))
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the train loader is stateful
    assert first.seen + rest.seen == full.seen
    assert sum(full.seen, []) == list(range(28)) and dm.consumed_samples == 28

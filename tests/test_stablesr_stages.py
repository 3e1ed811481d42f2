"""StableSR end to end on the tiny backbone: stage 1 (train + exact resume), the latent-record predict loop
(write, skip on rerun, resume, rank partition) and its config checks."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, compose_train
from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.data.records import (LatentRecordsDataModule, LatentRecordsDataset, RecordSourceDataModule, list_shards,
                                 select_shards, shard_ranges)
from sr_lab.train import run
from stage_inputs import stage1_export


def _weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_backbone):
    return stage1_export("stablesr_stage1", tmp_path_factory.mktemp("stablesr"), tiny_backbone)


def test_stage1_preset_has_the_paper_settings(tmp_path):
    cfg = compose_train(["experiment=stablesr_stage1"], tmp_path)
    assert cfg.adapter.branches.sft._target_.endswith("TimeAwareSFTBranch") and cfg.loss._target_.endswith("EpsMSE")
    assert cfg.module.start == "lr"  # validated (and inferred by default) from the noised LR latent, as the authors
    assert cfg.schedule._target_.endswith("UniformTimesteps") and cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.sampler._target_.endswith("ddpm_spaced.sample") and cfg.sampler.steps == 200
    assert cfg.degradation.resize_lr_to_hr is True and cfg.degradation.round_lr is False  # StableSR degradation
    assert cfg.module.prompt.text == ""  # the empty prompt (prompt=none)
    paper = compose_train(["experiment=stablesr_stage1", "scale=paper"], tmp_path)
    assert paper.data.crop_size == 512 and paper.train.total_batch_size == 192
    assert paper.train.iterations == cfg.method.paper_iterations == 15400
    for key in ("schedule", "loss", "sampler", "optim", "adapter", "degradation"):
        assert paper[key] == cfg[key], key


def test_stage1_trains_and_resumes_to_the_same_weights(tmp_path):
    base = [*FAST, "experiment=stablesr_stage1", "train.iterations=4", "train.export_weights=false"]
    full = run(compose_train([*base, "train.ckpt_every=2"], tmp_path / "full"))
    assert full["train/eps"] == full["train/eps"]
    mid = tmp_path / "full" / "checkpoints" / "step0000002.ckpt"
    run(compose_train([*base, f"ckpt_path={mid}"], tmp_path / "resumed"))
    a = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a and all(k.startswith(("adapter.branches.sft.encoder.", "adapter.branches.sft.sft.")) for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in _weights(mid).items())


def _latents_cfg(stage1, records, tmp, extra=()):
    return compose_train([*FAST, "experiment=stablesr_latents", f"stage1={stage1}", f"records.dir={records}",
                          "records.num=5", "records.shard_size=2", "sampler.steps=3", *extra], tmp)


def test_latent_records_write_skip_and_resume(stage1, tmp_path):
    records = tmp_path / "records"
    run(_latents_cfg(stage1, records, tmp_path / "r1"))
    shards = list_shards(records)
    assert [(a, b) for a, b, _ in shards] == [(0, 2), (2, 4), (4, 5)]
    meta = json.loads((records / "meta.json").read_text())
    assert meta["num_records"] == 5 and meta["shard_size"] == 2 and meta["start"] == "lr"
    first = load_file(shards[0][2])
    assert first["hr"].dtype == torch.uint8 and first["hr"].shape == (2, 3, 64, 64)
    assert first["lr"].shape == (2, 3, 64, 64)  # StableSR: the LR bicubically resized to the HR size
    assert first["latent"].shape == (2, 4, 8, 8) and first["latent"].dtype == torch.float32
    assert torch.equal(first["index"], torch.tensor([0, 1])) and torch.isfinite(first["latent"]).all()
    stamps = {p.name: p.stat().st_mtime_ns for _, _, p in shards}
    kept = load_file(shards[1][2])

    # rerun: every shard exists -> nothing is sampled or rewritten
    run(_latents_cfg(stage1, records, tmp_path / "r2"))
    assert {p.name: p.stat().st_mtime_ns for _, _, p in list_shards(records)} == stamps

    # "interrupted" run: a shard is missing -> only it is written again, identical to before
    shards[1][2].unlink()
    run(_latents_cfg(stage1, records, tmp_path / "r3"))
    again = list_shards(records)
    assert len(again) == 3 and again[0][2].stat().st_mtime_ns == stamps[shards[0][2].name]
    redone = load_file(again[1][2])
    assert all(torch.equal(redone[k], kept[k]) for k in kept)
    assert not list(records.glob("*.tmp"))

    # the CFW records data module reads them: aligned random crops, counter order, exact state
    ds = LatentRecordsDataset(records, crop_size=32, seed=0)
    item = ds[7]
    assert len(ds) == 5 and item["hr"].shape == (3, 32, 32) and item["latent"].shape == (4, 4, 4)
    full = ds.record(int(item["record"]))
    assert any(torch.equal(item["latent"], full["latent"][:, y:y + 4, x:x + 4]) for y in range(5) for x in range(5))
    dm = LatentRecordsDataModule(str(records), crop_size=64, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (2, 4, 8, 8) and batch["first_index"] == 0


def test_records_folder_with_other_settings_is_refused(stage1, tmp_path):
    records = tmp_path / "records"
    run(_latents_cfg(stage1, records, tmp_path / "a", ["records.num=2"]))
    with pytest.raises(ConfigError, match="records written with shard_size=2, this run has shard_size=1"):
        run(_latents_cfg(stage1, records, tmp_path / "b", ["records.num=2", "records.shard_size=1",
                                                            "data.batch_size=1", "train.total_batch_size=1"]))


def test_more_records_extend_the_set_and_a_stale_partial_shard_is_ignored(stage1, tmp_path):
    records = tmp_path / "records"
    run(_latents_cfg(stage1, records, tmp_path / "a", ["records.num=3"]))   # shards [0,2) [2,3)
    run(_latents_cfg(stage1, records, tmp_path / "b", ["records.num=4"]))   # adds [2,4)
    assert [(a, b) for a, b, _ in list_shards(records)] == [(0, 2), (2, 3), (2, 4)]
    assert [(a, b) for a, b, _ in select_shards(records)] == [(0, 2), (2, 4)]
    assert len(LatentRecordsDataset(records)) == 4


def test_each_rank_takes_every_world_size_th_shard(tmp_path):
    dm = RecordSourceDataModule(records_dir=str(tmp_path), num_records=10, shard_size=2, batch_size=2, crop_size=64,
                                crop_multiple=32)
    ranks = [dm.pending_shards(world_size=3, rank=r) for r in range(3)]
    assert ranks == [[(0, 2), (6, 8)], [(2, 4), (8, 10)], [(4, 6)]]
    assert sorted(sum(ranks, [])) == shard_ranges(10, 2)


def test_latents_config_errors(stage1, tmp_path):
    with pytest.raises(ConfigError, match="stage1 is required"):
        validate_config(compose_train(["experiment=stablesr_latents"], tmp_path))
    with pytest.raises(ConfigError, match="stage1=/no/such/export: /no/such/export does not exist"):
        validate_config(compose_train(["experiment=stablesr_latents", "stage1=/no/such/export"], tmp_path))
    with pytest.raises(ConfigError, match="records.shard_size=6 must be a positive multiple of data.batch_size=4"):
        validate_config(compose_train(["experiment=stablesr_latents", f"stage1={stage1}", "records.shard_size=6"],
                                      tmp_path))
    with pytest.raises(ConfigError, match="ckpt_path is not used by run_mode=predict"):
        ck = tmp_path / "x.ckpt"
        ck.write_bytes(b"")
        validate_config(compose_train(["experiment=stablesr_latents", f"stage1={stage1}", f"ckpt_path={ck}"], tmp_path))
    with pytest.raises(ConfigError, match="run_mode=train must be one of"):
        validate_config(compose_train(["experiment=stablesr_stage1", "run_mode=train"], tmp_path))
    validate_config(compose_train(["experiment=stablesr_latents", f"stage1={stage1}"], tmp_path))


@pytest.mark.parametrize("variant,w", [("w0", 0.0), ("w0_25", 0.25), ("w0_5", 0.5), ("w0_75", 0.75), ("w1", 1.0)])
def test_cfw_w_sweep_recipe(variant, w, tmp_path):
    """experiments/sweeps/stablesr_cfw_w.yaml: one eval job per w (StableSR Table 4 layout)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from sr_lab.eval.inference import infer_config
    from sr_lab.train import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose("eval", overrides=["sweep=stablesr_cfw_w", f"variant={variant}", f"lr_dir={tmp_path}",
                                         "infer.checkpoint=/s1", "infer.decoder_checkpoint=/cfw"],
                      return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.variant == "w0,w0_25,w0_5,w0_75,w1"
    with open_dict(cfg):
        del cfg["hydra"]
    ic = infer_config(cfg, tmp_path / "infer")
    assert ic.decoder_w == w and ic.decoder_checkpoint == "/cfw" and ic.start == "lr" and ic.color_fix == "adain"
    assert list(cfg.collect.metrics) == ["psnr", "ssim", "lpips", "fid", "clipiqa", "musiq"]


@pytest.mark.slow  # two CPU processes (~40 s); run with `make test-slow`
@pytest.mark.timeout(400)
def test_latents_ddp_two_cpu_processes_write_the_same_records(stage1, tmp_path):
    """trainer=ddp: every rank writes its own shards (k = rank mod 2); the set equals a 1-device run's
    (up to float summation order in the sampled latents)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import ROOT

    run(_latents_cfg(stage1, tmp_path / "one", tmp_path / "r1", ["records.num=6"]))
    args = ["experiment=stablesr_latents", f"stage1={stage1}", f"records.dir={tmp_path / 'two'}", "records.num=6",
            "records.shard_size=2", "data.batch_size=2", "train.total_batch_size=4", "data.crop_size=64",
            "sampler.steps=3", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32",
            f"hydra.run.dir={tmp_path / 'r2'}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "sr-train"), *args], cwd=ROOT,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "rank 0 writes 2 of 3 shard(s)" in out and "rank 1 writes 1 of 3 shard(s)" in out
    one, two = list_shards(tmp_path / "one"), list_shards(tmp_path / "two")
    assert [(a, b) for a, b, _ in one] == [(a, b) for a, b, _ in two] == [(0, 2), (2, 4), (4, 6)]
    for (_, _, p), (_, _, q) in zip(one, two):
        x, y = load_file(p), load_file(q)
        assert all(torch.equal(x[k], y[k]) for k in ("lr", "hr", "index"))
        assert torch.allclose(x["latent"], y["latent"], atol=1e-4)

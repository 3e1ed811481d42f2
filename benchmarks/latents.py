"""Throughput of StableSR's latent-record generation (experiment=stablesr_latents, a Lightning predict loop).

Composes the ``stablesr_latents`` preset, makes an (untrained, same cost) stage-1 export unless
``--stage1`` is given, runs ``trainer.predict`` on this machine's device and prints one line, e.g.

    latents stablesr_latents backbone=tiny crop=128 batch=4 steps=200 device=cpu (<cpu model>) torch=2.x:
        X.XX records/s (Y s/record)

The rate counts the batches after the first (warm-up) one: HR crop loading, the StableSR degradation,
DDPM sampling (``--steps``) with the time-aware SFT adapter, and the shard writes.

Usage: python benchmarks/latents.py [--records 16] [--batch 4] [--crop 128] [--steps 200] [--device cuda|cpu]
       [--backbone-path /weights/sd21-base] [--stage1 <stablesr_stage1 export>] [--precision bf16-mixed]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from degradation import device_name, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="DDPM respaced steps (StableSR: 200)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone-path", default=None, help="SD 2.1-base diffusers folder (default: the tiny backbone)")
    ap.add_argument("--stage1", default=None, help="a stablesr_stage1 export (default: an untrained one)")
    ap.add_argument("--precision", default=None, help="trainer precision (default: 32 on cpu, bf16-mixed on cuda)")
    args = ap.parse_args()

    import hydra
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir

    from sr_lab.train import CONF_DIR, export_trainable

    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = ["backbone=sd21_base", f"backbone.path={args.backbone_path}"] if args.backbone_path else []
        common = [*backbone, f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
                  f"train.total_batch_size={args.batch}", f"paths.output_dir={tmp}"]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="bench_latents"):
            stage1 = args.stage1
            if stage1 is None:
                s1 = compose(config_name="train", overrides=["experiment=stablesr_stage1", *common])
                export_trainable(hydra.utils.instantiate(s1.module), tmp / "stage1", s1)
                stage1 = str(tmp / "stage1")
            cfg = compose(config_name="train", overrides=[
                "experiment=stablesr_latents", *common, f"stage1={stage1}", f"records.dir={tmp / 'records'}",
                f"records.num={args.records}", f"records.shard_size={args.batch}", f"sampler.steps={args.steps}"])
        inst = hydra.utils.instantiate
        dm = inst(cfg.data, degradation=inst(cfg.degradation))
        dm.setup("fit")
        module = inst(cfg.module)

        stamps: list[tuple[float, int]] = []

        class Clock(pl.Callback):
            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                sync(device)
                stamps.append((time.perf_counter(), int(batch["hr"].shape[0])))

        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[Clock()])
        trainer.predict(module, datamodule=dm, return_predictions=False)
    if len(stamps) < 2:
        raise SystemExit("need at least two batches (--records >= 2 x --batch)")
    seconds = stamps[-1][0] - stamps[0][0]
    records = sum(n for _, n in stamps[1:])
    rate = records / seconds
    name = "sd21_base" if args.backbone_path else "tiny"
    print(f"latents stablesr_latents backbone={name} crop={args.crop} batch={args.batch} steps={args.steps} "
          f"device={device.type} ({device_name(device)}) torch={torch.__version__}: {rate:.2f} records/s "
          f"({1 / rate:.2f} s/record)")


if __name__ == "__main__":
    main()

"""Checkpoint hooks shared by every sr_lab LightningModule: only what trains is saved.

A module using :class:`TrainableOnlyCheckpoint` keeps a micro-batch counter ``_micro`` and a
``run_config`` dict; its checkpoints hold the trainable tensors (plus buffers of the modules that own
them), the counter and the resolved config. The frozen backbone is rebuilt from its source.
"""
from __future__ import annotations


class TrainableOnlyCheckpoint:
    _micro: int
    run_config: dict | None

    def trainable_state_keys(self) -> set[str]:
        """Names of trainable parameters plus the buffers of modules that own trainable parameters."""
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        owners = {n.rsplit(".", 1)[0] for n in keys}
        for name, _ in self.named_buffers():
            if name.rsplit(".", 1)[0] in owners:
                keys.add(name)
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["sr_lab"] = {"micro_batches": self._micro, "config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trainable_state_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]} "
                           f"(was it written by another stage or adapter?)")
        self._micro = int(checkpoint.get("sr_lab", {}).get("micro_batches", 0))

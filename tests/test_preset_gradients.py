"""For every preset: a training step gives every trainable parameter a finite, non-zero gradient and no
frozen parameter a gradient (recorded right before each optimizer step of a real `sr-train` run)."""
import math

import pytest
import torch

from helpers import FAST, compose_train, presets
from sr_lab.modules.manual_optimization import ManualOptimization
from stage_inputs import preset_inputs


@pytest.mark.parametrize("name", presets())
def test_every_trainable_parameter_gets_a_gradient_and_no_frozen_one(name, tmp_path, tmp_path_factory,
                                                                     tiny_backbone, monkeypatch):
    from sr_lab.train import run

    seen: dict[str, torch.Tensor] = {}
    frozen_with_grad: set[str] = set()
    trainable: set[str] = set()
    original = ManualOptimization.step_optimizer

    def recording(self, opt):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        for n, p in self.named_parameters():
            if p.requires_grad:
                trainable.add(n)
                if id(p) in ids and p.grad is not None:
                    seen[n] = p.grad.detach().clone()
            elif p.grad is not None:
                frozen_with_grad.add(n)
        return original(self, opt)

    monkeypatch.setattr(ManualOptimization, "step_optimizer", recording)
    # 3 iterations: zero-initialised output layers (ControlNet zero convs, SFT alpha/beta, CFW fusion) pass
    # gradients to the layers before them only once they have moved
    extra = ["module.disc_start=0"] if name in ("stablesr_cfw", "ccsr_stage2") else []
    # ClearSR's encoder LoRA A sits behind three zero-initialised layers (ControlNet zero convs, then the
    # conditioning embedding's zero conv / the window attention's output, then LoRA B): 4 iterations
    iterations = 4 if name == "clearsr" else 3
    cfg = compose_train([*FAST, f"experiment={name}", f"train.iterations={iterations}", "train.export_weights=false",
                         *preset_inputs(name, tmp_path_factory, tiny_backbone), *extra], tmp_path)
    run(cfg)
    if name == "stablesr_latents":  # a predict stage: nothing trains
        assert not trainable and not seen
        return
    assert trainable, name
    missing = sorted(trainable - set(seen))
    assert not missing, f"{name}: {len(missing)} trainable tensors never got a gradient, e.g. {missing[:3]}"
    bad = [n for n, g in seen.items() if not torch.isfinite(g).all()]
    # exempt by construction: the bias of a projected-discriminator head's last conv shifts real and fake
    # logits alike (same c_img projection), so while every hinge margin is active its gradients from
    # E[relu(1 - D(x))] and E[relu(1 + D(x_hat))] cancel exactly
    exempt = ("discriminator.heads.",)
    zero = [n for n, g in seen.items() if float(g.abs().sum()) == 0.0
            and not (n.startswith(exempt) and n.endswith(".cls.bias"))]
    assert not bad, f"{name}: non-finite gradients in {bad[:3]}"
    assert not zero, f"{name}: {len(zero)} all-zero gradients at the last step, e.g. {zero[:3]}"
    assert not frozen_with_grad, f"{name}: frozen tensors got gradients: {sorted(frozen_with_grad)[:3]}"
    assert math.isfinite(sum(float(g.abs().sum()) for g in seen.values()))

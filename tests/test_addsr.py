"""AddSR's adversarial distillation stage on the tiny backbone: teacher / student / discriminator roles,
PSR conditions, which weights each half changes, any batch size, exact resume, fail-fast weights, and the
end-to-end chain teacher -> addsr -> sr-infer (1 and 4 steps) -> sr-eval over seeds."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import FAST, compose_train
from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.modules.manual_optimization import ManualOptimization
from sr_lab.train import CONF_DIR
from sr_lab.train import run as train_run

ADDSR = [*FAST, "experiment=addsr", "train.export_weights=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("addsr_teacher")
    train_run(compose_train([*FAST, "experiment=addsr_teacher", "train.iterations=2"], out))
    return out


def _module(teacher, overrides=()):
    import hydra

    cfg = compose_train([*ADDSR, f"teacher={teacher}", *overrides])
    module = hydra.utils.instantiate(cfg.module)
    module.setup("fit")
    return module


def test_roles_teacher_on_hr_student_on_lr_then_refined_x0(teacher):
    """The teacher is conditioned on the HR (and HR prompts), the student's first step on the LR, step i's
    on x̂0 of step i-1 (psr_w = 1: the condition *is* the previous prediction, paper Eq. 2 / set C)."""
    from sr_lab.utils.seeding import make_generator

    m = _module(teacher)
    g = torch.Generator().manual_seed(0)
    hr, lr = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    seen_student, seen_teacher = [], []
    student_denoise, teacher_prepare = m.denoise, m.teacher.prepare
    m.denoise = lambda x, t, c: (seen_student.append((int(t[0]), c["lr_latent"].clone())), student_denoise(x, t, c))[1]
    m.teacher.prepare = lambda img, size, **kw: (seen_teacher.append(img.clone()), teacher_prepare(img, size, **kw))[1]
    for micro in range(12):  # find a draw whose graded step is the 3rd (two PSR rollout steps before it)
        seen_student.clear()
        gen = make_generator(0, "train", micro, 0)
        x0, i, _ = m.student_x0(hr, lr, gen)
        if i == 2:
            break
    assert i == 2 and [t for t, _ in seen_student] == [999, 749, 499]
    up = torch.nn.functional.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    z_lr = m.backbone.encode(up)
    assert torch.allclose(seen_student[0][1], z_lr, atol=1e-6)  # step 1: the LR
    assert not torch.allclose(seen_student[1][1], z_lr, atol=1e-3)  # step 2: refined from x̂0 of step 1
    x_psi, t = m.teacher_x0(x0, hr, make_generator(0, "train", 99, 0))
    assert torch.equal(seen_teacher[-1], hr)  # the teacher sees the HR, never the LR
    assert x_psi.shape[0] == 2 * m.teacher_draws and t.shape[0] == 2 * m.teacher_draws


def test_each_half_changes_only_its_own_weights(teacher, tmp_path, monkeypatch):
    snapshots = []
    original = ManualOptimization.step_optimizer

    def spy(self, opt):
        ids = {id(p) for grp in opt.param_groups for p in grp["params"]}
        before = {n: p.detach().clone() for n, p in self.named_parameters()}
        frozen_grads = [n for n, p in self.named_parameters() if p.grad is not None and id(p) not in ids]
        original(self, opt)
        changed = {n for n, p in self.named_parameters() if not torch.equal(before[n], p.detach())}
        snapshots.append((changed, frozen_grads, {n for n, p in self.named_parameters() if id(p) in ids}))

    monkeypatch.setattr(ManualOptimization, "step_optimizer", spy)
    train_run(compose_train([*ADDSR, f"teacher={teacher}", "train.iterations=2"], tmp_path))
    assert len(snapshots) == 4  # (student, heads) x 2 iterations
    for k, (changed, frozen_grads, own) in enumerate(snapshots):
        assert changed and changed <= own, k
        assert not frozen_grads, (k, frozen_grads[:3])
        prefix = "adapter." if k % 2 == 0 else "discriminator."
        assert all(n.startswith(prefix) for n in changed), (k, sorted(changed)[:3])
        assert not any(n.startswith(("teacher.", "backbone.")) or ".trunk" in n or "cond_net" in n for n in changed)


@pytest.mark.parametrize("batch", [1, 3])
def test_any_batch_size_trains(teacher, tmp_path, batch):
    m = train_run(compose_train([*ADDSR, f"teacher={teacher}", "train.iterations=1", f"data.batch_size={batch}",
                                 f"train.total_batch_size={batch}"], tmp_path))
    assert m["train/loss"] == m["train/loss"] and m["train/d_loss"] == m["train/d_loss"]


def test_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    base = [*ADDSR, f"teacher={teacher}", "train.iterations=4", "train.total_batch_size=4"]  # accumulate 2
    train_run(compose_train([*base, "train.ckpt_every=2"], tmp_path / "full"))
    mid = tmp_path / "full" / "checkpoints" / "step0000004.ckpt"
    train_run(compose_train([*base, f"ckpt_path={mid}"], tmp_path / "resumed"))
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)["state_dict"]  # noqa: E731
    a, b = load(tmp_path / "full" / "checkpoints" / "last.ckpt"), load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    assert not any(k.startswith("teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_and_discriminator_weights_are_checked_before_anything_is_built(teacher, tmp_path):
    with pytest.raises(ConfigError, match="teacher is required"):
        validate_config(compose_train([*ADDSR]))
    with pytest.raises(ConfigError, match="teacher=/no/such"):
        validate_config(compose_train([*ADDSR, "teacher=/no/such"]))
    with pytest.raises(ConfigError, match="dinov2-small"):
        validate_config(compose_train([*ADDSR, f"teacher={teacher}", "discriminator=projected_dinov2"]))
    sd = tmp_path / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd / sub).mkdir(parents=True)
    with pytest.raises(ConfigError, match="only for smoke runs on backbone=tiny"):
        validate_config(compose_train([*ADDSR, f"teacher={teacher}", "backbone=sd21_base", f"backbone.path={sd}",
                                       "prompt=none"]))
    # a real backbone with the paper's discriminator: the missing DINOv2 folder is named before any build
    with pytest.raises(ConfigError, match="dinov2-small"):
        validate_config(compose_train([*ADDSR, f"teacher={teacher}", "backbone=sd21_base", f"backbone.path={sd}",
                                       "prompt=none", "discriminator=projected_dinov2"]))


def test_end_to_end_teacher_addsr_infer_1_and_4_steps_and_eval(teacher, tmp_path):
    from PIL import Image

    from sr_lab.eval.run import run_eval
    from sr_lab.inference.run import run_inference

    train_run(compose_train([*FAST, "experiment=addsr", f"teacher={teacher}", "train.iterations=1",
                             "sampler.steps=4"], tmp_path / "addsr"))
    export = tmp_path / "addsr" / "export"
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(3, 32, 32, generator=g) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(hr).save(hr_dir / "a.png")
    Image.fromarray(hr).resize((8, 8), Image.BICUBIC).save(lr_dir / "a.png")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="addsr_e2e"):
        for k, want in ((1, [999]), (4, [999, 749, 499, 249])):
            cfg = compose(config_name="infer", overrides=[f"checkpoint={export}", f"input={lr_dir}",
                                                          f"output_dir={tmp_path / f'sr{k}'}", f"sampler.first={k}",
                                                          "progress=false"])
            meta = json.loads((run_inference(cfg) / "run.json").read_text())
            assert meta["timesteps"] == want
        ecfg = compose(config_name="eval", overrides=[
            "run_inference=true", f"infer.checkpoint={export}", "infer.seeds=[0,1,2]", "infer.progress=false",
            f"lr_dir={lr_dir}", f"hr_dir={hr_dir}", "metrics.names=[psnr,ssim]", f"hydra.run.dir={tmp_path / 'eval'}",
            f"paths.output_dir={tmp_path / 'eval'}", "logger=csv"])
    summary = run_eval(ecfg)
    assert summary["n_runs"] == 3 and summary["metrics"]["psnr"]["available"]
    assert summary["stability"]["l_std"] > 0  # the seeds differ


def test_authors_student_option_trains_only_embedding_and_attention(teacher):
    import hydra

    cfg = compose_train([*ADDSR, f"teacher={teacher}", "student_trainable=authors"])
    m = hydra.utils.instantiate(cfg.module)
    trains = [n for n, p in m.adapter.named_parameters() if p.requires_grad]
    frozen = [n for n, p in m.adapter.named_parameters() if not p.requires_grad]
    assert trains and frozen
    assert all(("controlnet_cond_embedding" in n or "conv_in" in n or "attentions" in n) for n in trains)
    assert any("resnets" in n for n in frozen)
    # the export still holds the whole student (its frozen part came from the teacher)
    assert {f"adapter.{n}" for n in trains + frozen} <= m.trainable_state_keys()

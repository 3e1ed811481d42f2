"""AddSR's projected discriminator (sr_lab/models/discriminators.py): shapes, frozen trunk, heads train,
hinge/R1 values, DiffAugment from an explicit generator, local weights (Hugging Face folders), fail-fast
lookup, and the three conf/discriminator presets. CPU, tiny random trunks."""
import copy
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from sr_lab.models import discriminators as dmod
from sr_lab.models.discriminators import (
    ProjectedDiscriminator,
    check_discriminator_weights,
    diff_augment,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
)
from sr_lab.utils.weights import MissingWeights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny trunks' ops are too small for two threads (OpenMP spin-waits dominate on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_weights_env(tmp_path, monkeypatch):
    """No real weights leak in from the machine: empty $SR_LAB_WEIGHTS and torch hub cache."""
    empty = tmp_path / "empty_env"
    empty.mkdir()
    monkeypatch.setenv("SR_LAB_WEIGHTS", str(empty / "sr_lab_weights"))
    monkeypatch.setenv("TORCH_HOME", str(empty / "torch"))


def tiny(**kw):
    opts = {"trunk": "dino_vits16", "cond_trunk": "dinov2_vits14", "tiny": True, "allow_random_init": True, "seed": 0}
    opts.update(kw)
    return ProjectedDiscriminator(**opts)


@pytest.fixture(scope="module")
def disc():
    return tiny()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(disc, batch):
    d = copy.deepcopy(disc).train()
    c = d.embed_condition(torch.rand(batch, 3, 16, 16))
    assert c.shape == (batch, d.c_dim) and not c.requires_grad
    logits = d(torch.rand(batch, 3, 64, 64), c, generator=gen(0))
    assert len(logits) == len(d.layers) + 1 == 5  # blocks 0..3 + patch embedding
    n = (56 // 8) ** 2
    assert all(l.shape == (batch, n) for l in logits)
    logits, feats = d.eval()(torch.rand(batch, 3, 56, 56), c, return_features=True)
    assert all(f.shape == (batch, d.trunk.hidden_size, n) and f.requires_grad for f in feats)


def test_same_cond_and_shared_trunk():
    same = tiny(trunk="dinov2_vits14", cond_trunk="same")
    assert same.cond_net is None and same.c_dim == same.trunk.hidden_size
    shared = tiny(trunk="dinov2_vits14", cond_trunk="dinov2_vits14")
    assert shared.cond_net is None  # one network serves both
    c = same.embed_condition(torch.rand(2, 3, 20, 20))
    out = same.eval()(torch.rand(2, 3, 56, 56), c)
    assert c.shape == (2, 32) and all(o.shape == (2, 16) for o in out)  # 56 / 14 = 4 -> 16 tokens


def test_seeded_construction_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny(seed=1), tiny(seed=1), tiny(seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if k.startswith("heads."))


# -- frozen trunk, trainable heads -----------------------------------------------------------------
def test_trunk_frozen_heads_train(disc):
    d = copy.deepcopy(disc)
    d.requires_grad_(True)  # a stage toggling the discriminator must not unfreeze the trunks
    d.train()
    frozen = [m for m in (d.trunk, d.cond_net)]
    assert all(not m.training for m in frozen) and d.heads.training
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    before = {k: v.clone() for m in frozen for k, v in m.state_dict().items()}
    heads = d.trainable_parameters()
    assert {id(p) for p in heads} == {id(p) for p in d.heads.parameters()}
    opt = torch.optim.Adam(heads, lr=1e-2)
    c = d.embed_condition(torch.rand(2, 3, 16, 16))
    real, fake = torch.rand(2, 3, 56, 56), torch.rand(2, 3, 56, 56, requires_grad=True)
    loss = hinge_d_loss(d(real, c, generator=gen(1)), d(fake, c, generator=gen(2)))
    loss.backward()
    opt.step()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in heads) and sum(float(p.grad.abs().sum()) for p in heads) > 0
    after = {k: v for m in frozen for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # G's loss reaches the image through the trunk
    d.eval()
    assert not d.heads.training and not d.trunk.training


# -- losses ----------------------------------------------------------------------------------------
def test_hinge_losses_hand_values():
    real = [torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 0.0]])]
    fake = [torch.tensor([[-0.5, 1.0]]), torch.tensor([[-2.0, 0.0]])]
    # real: relu(1 - [0.5, 2, -1, 0]) = [0.5, 0, 2, 1] -> 0.875 ; fake: relu(1 + [-0.5, 1, -2, 0]) = [0.5, 2, 0, 1] -> 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.75)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-0.5 + 1.0 - 2.0 + 0.0) / 4)
    assert hinge_d_loss(real[0], fake[0]).item() == pytest.approx(0.25 + 1.25)


def test_r1_penalty_hand_values():
    f = torch.ones(2, 3, 4, requires_grad=True)
    g = torch.ones(2, 3, 4, requires_grad=True)
    logits = [(3 * f).sum(1), (2 * g).sum(1)]  # grads 3 and 2 everywhere: ||.||^2 = 9*12, 4*12
    assert r1_penalty(logits, [f, g], gamma=0.5).item() == pytest.approx(0.5 * (108 + 48) / 2)
    x = torch.ones(2, 5, requires_grad=True)
    assert r1_penalty([2 * x, x], x).item() == pytest.approx(9 * 5)


def test_r1_on_discriminator_features_trains_heads(disc):
    d = copy.deepcopy(disc).train()
    c = d.embed_condition(torch.rand(2, 3, 16, 16))
    logits, feats = d(torch.rand(2, 3, 56, 56), c, generator=gen(0), return_features=True)
    pen = r1_penalty(logits, feats, gamma=1.0)
    assert torch.isfinite(pen) and pen > 0
    pen.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.trainable_parameters())


def test_r1_wrt_image_double_backward_and_stage_methods(disc):
    d = copy.deepcopy(disc).train()
    c = d.embed_condition(torch.rand(2, 3, 16, 16))
    real = torch.rand(2, 3, 56, 56).requires_grad_(True)  # a leaf: the trunk runs on the math SDPA backend
    logits_real = d(real, c, generator=gen(0))
    logits_fake = d(torch.rand(2, 3, 56, 56), c, generator=gen(1))
    loss = d.discriminator_loss(logits_real, logits_fake) + 0.1 * d.r1(real, logits_real)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.trainable_parameters())
    assert d.generator_loss(logits_fake).item() == pytest.approx(hinge_g_loss(logits_fake).item())


# -- DiffAugment -----------------------------------------------------------------------------------
def test_diffaugment_generator_determinism():
    x = torch.rand(4, 3, 32, 32)
    a, b = diff_augment(x, gen(5)), diff_augment(x, gen(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, diff_augment(x, gen(6)))
    assert not torch.equal(a, x)
    assert ((a == 0.5).float().mean() > 0.02)  # vacated / cut-out pixels are grey (0 in [-1, 1])


def test_forward_augmentation_uses_only_the_generator(disc):
    d1, d2, d3 = (copy.deepcopy(disc).train() for _ in range(3))
    c = d1.embed_condition(torch.rand(2, 3, 16, 16))
    x = torch.rand(2, 3, 64, 64)
    state = torch.get_rng_state()
    o1, o2, o3 = d1(x, c, generator=gen(3)), d2(x, c, generator=gen(3)), d3(x, c, generator=gen(4))
    assert torch.equal(torch.get_rng_state(), state)  # never the global RNG
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert not all(torch.equal(a, b) for a, b in zip(o1, o3))
    with pytest.raises(ValueError, match="Generator"):
        copy.deepcopy(disc).train()(x, c)


def test_no_augmentation_when_diffaug_false():
    d = tiny(diffaug=False, p_crop=0.0).train()
    e = copy.deepcopy(d)
    c = d.embed_condition(torch.rand(2, 3, 16, 16))
    x = torch.rand(2, 3, 56, 56)
    o1, o2 = d(x, c, generator=gen(1)), e(x, c)  # identity: no generator needed, none consumed
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))


# -- weights ---------------------------------------------------------------------------------------
def _refuse_building(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a trunk was built before the weights were checked")
    monkeypatch.setattr(dmod, "_random_trunk", boom)
    monkeypatch.setattr(dmod, "_load_trunk", boom)


def test_missing_weights_fail_fast(tmp_path, monkeypatch):
    _refuse_building(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(MissingWeights) as err:
        check_discriminator_weights("dino_vits16", tmp_path, cond_trunk="dinov2_vits14")
    msg = str(err.value)
    assert "dino-vits16/model.safetensors" in msg and str(tmp_path) in msg and "facebook/dino-vits16" in msg
    (tmp_path / "dino-vits16").mkdir()
    (tmp_path / "dino-vits16" / "model.safetensors").write_bytes(b"")
    with pytest.raises(MissingWeights, match="dinov2-small/model.safetensors"):  # the cond trunk's turn
        check_discriminator_weights("dino_vits16", tmp_path, cond_trunk="dinov2_vits14")
    check_discriminator_weights("dino_vits16", tmp_path, cond_trunk="same")
    with pytest.raises(MissingWeights, match="dinov2-small/model.safetensors") as err:
        ProjectedDiscriminator(trunk="dinov2_vits14", cond_trunk="same", weights=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    hf = tmp_path / "half_folder"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(MissingWeights) as err:  # one network's folder without its weights file
        ProjectedDiscriminator(trunk="dinov2_vits14", cond_trunk="same", weights=hf)
    assert err.value.name == "model.safetensors" and Path(err.value.folder) == hf
    with pytest.raises(ValueError, match="two networks"):
        ProjectedDiscriminator(trunk="dino_vits16", cond_trunk="dinov2_vits14", weights=hf)
    with pytest.raises(ValueError, match="pickle"):
        ProjectedDiscriminator(trunk="dinov2_vits14", cond_trunk="same", weights=tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(ValueError, match="trunk"):
        check_discriminator_weights("vit_huge", tmp_path)
    assert time.perf_counter() - t0 < 2.0


def test_random_init_refused_without_allow_random_init(monkeypatch):
    with pytest.raises(ValueError, match="allow_random_init"):
        ProjectedDiscriminator(trunk="dino_vits16", cond_trunk="dinov2_vits14", tiny=True, allow_random_init=False)
    _refuse_building(monkeypatch)
    with pytest.raises(MissingWeights):
        ProjectedDiscriminator(trunk="dino_vits16", cond_trunk="dinov2_vits14")


def _tiny_hf(kind, seed):
    spec = dmod.TRUNKS[kind]
    return dmod._random_trunk(spec, spec.tiny, seed)


def _v4_keys(kind, state):
    """The key names of the checkpoints on the Hub (transformers 4.x layout), which from_pretrained converts."""
    out = {}
    for k, v in state.items():
        k = k.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj", "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense")
        if kind == "dino_vits16":
            k = k.replace("layers.", "encoder.layer.").replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[k] = v.contiguous()
    return out


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_hugging_face_folder(tmp_path, monkeypatch):
    ref = _tiny_hf("dinov2_vits14", seed=7)
    ref.save_pretrained(tmp_path / "dinov2-small")
    opts = {"trunk": "dinov2_vits14", "cond_trunk": "same", "image_size": 56, "layers": [0, 1, 2, 3]}
    d = ProjectedDiscriminator(weights=tmp_path / "dinov2-small", **opts)  # the folder itself
    assert not d.random_trunk and _same_params(d.trunk.model, ref)
    assert not any(p.requires_grad for p in d.trunk.parameters())
    d2 = ProjectedDiscriminator(weights=tmp_path, **opts)  # a weights root holding dinov2-small/
    assert _same_params(d2.trunk.model, ref)
    monkeypatch.setenv("SR_LAB_WEIGHTS", str(tmp_path))
    d3 = ProjectedDiscriminator(**opts)  # $SR_LAB_WEIGHTS/dinov2-small
    assert _same_params(d3.trunk.model, ref)
    d4 = ProjectedDiscriminator(weights=tmp_path / "dinov2-small" / "model.safetensors", **opts)  # one file + config
    assert _same_params(d4.trunk.model, ref)
    lr = torch.rand(1, 3, 56, 56)
    want = ref(pixel_values=d._normalise(lr)).last_hidden_state[:, 0]  # "same": the trunk's own CLS token
    assert torch.allclose(d.embed_condition(lr), want, atol=1e-5)


def test_load_hub_layout_both_networks(tmp_path):
    """Both networks from folders in the Hub's (transformers 4.x) key layout, given as a mapping."""
    from safetensors.torch import save_file

    refs = {}
    for i, (kind, folder) in enumerate([("dino_vits16", "dino-vits16"), ("dinov2_vits14", "dinov2-small")]):
        refs[kind] = _tiny_hf(kind, seed=10 + i)
        refs[kind].config.save_pretrained(tmp_path / folder)
        save_file(_v4_keys(kind, refs[kind].state_dict()), str(tmp_path / folder / "model.safetensors"))
    d = ProjectedDiscriminator(trunk="dino_vits16", cond_trunk="dinov2_vits14", image_size=56, cond_image_size=56,
                               layers=[0, 1, 2, 3], weights={"dino_vits16": str(tmp_path / "dino-vits16"),
                                                             "dinov2_vits14": str(tmp_path / "dinov2-small")})
    assert _same_params(d.trunk.model, refs["dino_vits16"]) and _same_params(d.cond_net.model, refs["dinov2_vits14"])
    lr = torch.rand(2, 3, 56, 56)
    want = refs["dinov2_vits14"](pixel_values=d._normalise(lr)).last_hidden_state[:, 0]
    assert torch.allclose(d.embed_condition(lr), want, atol=1e-5)
    with pytest.raises(ValueError, match="model_type"):  # a DINOv2 folder where DINO ViT-S/16 is expected
        ProjectedDiscriminator(trunk="dino_vits16", cond_trunk="same", weights=tmp_path / "dinov2-small",
                               image_size=56, layers=[0, 1, 2, 3])


# -- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,trunk,cond", [("projected_dino", "dino_vits16", "dinov2_vits14"),
                                             ("projected_dinov2", "dinov2_vits14", "dinov2_vits14"),
                                             ("projected_tiny", "dino_vits16", "dinov2_vits14")])
def test_presets(name, trunk, cond, monkeypatch):
    import inspect

    from hydra.utils import instantiate

    node = OmegaConf.load(ROOT / "conf" / "discriminator" / f"{name}.yaml")
    cfg = OmegaConf.create({"seed": 3, "d": node})
    # partial: the stage builds it when training starts (setup), so inference needs no DINO weights
    assert cfg.d._target_ == "sr_lab.models.discriminators.ProjectedDiscriminator" and cfg.d._partial_ is True
    assert (cfg.d.trunk, cfg.d.cond_trunk) == (trunk, cond)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.d, resolve=True).items() if not k.startswith("_")}
    inspect.signature(ProjectedDiscriminator).bind(**kwargs)  # every key is a constructor argument
    with open_dict(cfg):
        cfg.d._partial_ = False
    if cfg.d.tiny:
        d = instantiate(cfg.d)
        assert d.random_trunk and d.image_size == 56 and len(d.heads) == 5
    else:
        assert list(cfg.d.layers) == [2, 5, 8, 11] and cfg.d.image_size == 224 and not cfg.d.allow_random_init
        _refuse_building(monkeypatch)
        with pytest.raises(Exception) as err:  # hydra wraps it in an InstantiationException
            instantiate(cfg.d)
        assert isinstance(err.value.__cause__, MissingWeights), err.value


@pytest.mark.parametrize("backbone", ["build_tiny", "load_pretrained"])
def test_validate_config(backbone, tmp_path):
    from sr_lab.config.validation import ConfigError

    def cfg(**disc):
        node = OmegaConf.load(ROOT / "conf" / "discriminator" / "projected_tiny.yaml")
        node.merge_with(disc)
        return OmegaConf.create({"seed": 0, "backbone": {"_target_": f"sr_lab.models.backbone.{backbone}"},
                                 "discriminator": node})

    check = ProjectedDiscriminator.validate_config
    if backbone == "build_tiny":
        check(cfg(), ConfigError)  # tiny trunks on the tiny backbone
        check(cfg(tiny=False, image_size=224, layers=[2, 5, 8, 11]), ConfigError)  # missing weights, random allowed
    else:
        with pytest.raises(ConfigError, match="discriminator.tiny=true is only for smoke runs"):
            check(cfg(), ConfigError)
        with pytest.raises(ConfigError, match="allow_random_init=true is only for smoke runs"):
            check(cfg(tiny=False, layers=[2, 5, 8, 11]), ConfigError)
    real = {"tiny": False, "allow_random_init": False, "layers": [2, 5, 8, 11], "weights": str(tmp_path)}
    with pytest.raises(ConfigError, match="dino-vits16/model.safetensors"):
        check(cfg(**real), ConfigError)
    with pytest.raises(ConfigError, match="blocks 0..11"):
        check(cfg(**{**real, "layers": [2, 12]}), ConfigError)
    with pytest.raises(ConfigError, match="cond_trunk"):
        check(cfg(**{**real, "cond_trunk": "clip"}), ConfigError)
    with pytest.raises(ConfigError, match="p_crop"):
        check(cfg(**{**real, "p_crop": 2.0}), ConfigError)

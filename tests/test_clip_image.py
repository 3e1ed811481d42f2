"""ClipImageEncoder (sr_lab/models/clip_image.py): ClearSR's frozen CLIP image prompt, on the tiny CLIP."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sr_lab.models.clip_image import ClipImageEncoder
from sr_lab.models.open_clip_models import TINY_CLIP, WEIGHT_FILES, build_open_clip
from sr_lab.utils.weights import MissingWeights
from helpers import random_images

KEY = "adapter.branches.image_prompt.clip"


class Refused(Exception):
    pass


@pytest.fixture(scope="module")
def encoder():
    return ClipImageEncoder(tiny=True, allow_random_init=True)




@pytest.mark.parametrize(("batch", "size"), [(1, (16, 16)), (3, (24, 40)), (2, (64, 48))])
def test_shape_and_dtype(encoder, batch, size):
    out = encoder(random_images(batch, size=size))
    assert encoder.embed_dim == TINY_CLIP["embed_dim"] == 32
    assert out.shape == (batch, encoder.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not out.requires_grad
    assert not torch.allclose(out.norm(dim=-1), torch.ones(batch))  # raw, not L2-normalised


def test_deterministic_under_the_seed(encoder):
    x = random_images(2, seed=1)
    torch.testing.assert_close(encoder(x), encoder(x), rtol=0, atol=0)
    torch.testing.assert_close(ClipImageEncoder(tiny=True, allow_random_init=True, seed=0)(x), encoder(x),
                               rtol=0, atol=0)
    other = ClipImageEncoder(tiny=True, allow_random_init=True, seed=1)
    assert not torch.allclose(other(x), encoder(x))


def test_is_encode_image_of_the_same_clip_with_clip_tags_preprocessing(encoder):
    """The visual tower of the seeded tiny CLIP, fed exactly as ClipTags feeds it."""
    from sr_lab.models.tagging import ClipTags

    tagger = ClipTags(tiny=True, allow_random_init=True)
    x = random_images(3, seed=2, size=(20, 50))
    assert encoder.image_size == tagger.image_size
    with torch.no_grad():
        want = tagger.model.encode_image(tagger.preprocess(x))
    torch.testing.assert_close(encoder(x), want)


def test_visual_tower_only_frozen_and_always_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    keys = list(encoder.state_dict())
    assert keys and all(k.startswith("visual.") for k in keys)  # no text tower, no mean/std buffers
    assert not hasattr(encoder, "transformer") and not hasattr(encoder.visual, "token_embedding")
    assert not encoder.training and not encoder.visual.training
    holder = torch.nn.Sequential(encoder)
    holder.train()  # e.g. a stage switching everything to train mode
    assert holder.training and not encoder.training
    assert not any(m.training for m in encoder.modules())
    encoder.train(True)
    assert not any(m.training for m in encoder.modules())
    x = random_images(1)
    x.requires_grad_(True)
    assert not encoder(x).requires_grad  # under no_grad


def test_autocast_is_disabled(encoder):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(random_images(2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, encoder(random_images(2)))


def test_bad_input_shape(encoder):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.rand(3, 16, 16))


def test_missing_weights_fail_fast(no_weights):
    with pytest.raises(MissingWeights, match=r"ViT-H-14/open_clip_model\.safetensors") as exc:
        ClipImageEncoder()
    assert str(no_weights) in str(exc.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(exc.value)  # where it is published
    missing = no_weights.parent / "nowhere" / "vit_h.safetensors"
    with pytest.raises(MissingWeights, match=r"vit_h\.safetensors.*put it in " + str(missing.parent)):
        ClipImageEncoder(weights=str(missing))
    with pytest.raises(ValueError, match="allow_random_init"):
        ClipImageEncoder(tiny=True)  # no published tiny weights


def test_weights_are_loaded_from_local_files(tmp_path, encoder):
    from safetensors.torch import save_file

    net, path = build_open_clip("tiny", tiny=True, allow_random_init=True, seed=7)  # a full tiny CLIP
    assert path is None
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    f = tmp_path / WEIGHT_FILES[0]
    save_file(state, str(f))
    loaded = ClipImageEncoder(tiny=True, weights=str(f))
    assert not loaded.random_weights and loaded.weights_path == f
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert any(not torch.equal(v, state[k]) for k, v in encoder.state_dict().items())  # seed 0 != seed 7
    with torch.no_grad():
        want = net.encode_image(loaded.preprocess(random_images(2)))
    torch.testing.assert_close(loaded(random_images(2)), want)
    # a state dict of another architecture: one line naming the file
    bad = tmp_path / "bad.safetensors"
    save_file({"visual.nope": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match=r"not an open_clip state dict of tiny") as exc:
        ClipImageEncoder(tiny=True, weights=str(bad), key=KEY)
    assert str(exc.value).startswith(f"{KEY}.weights: {bad}") and "\n" not in str(exc.value)


def test_validate_config(tmp_path, no_weights):
    tiny = OmegaConf.create({"model": "ViT-H-14", "weights": None, "tiny": True, "allow_random_init": True})
    with pytest.raises(Refused, match=rf"^{KEY}\.tiny=true is only for smoke runs on backbone=tiny") as exc:
        ClipImageEncoder.validate_config(tiny, Refused, KEY, random_backbone=False)
    assert "\n" not in str(exc.value) and WEIGHT_FILES[0] in str(exc.value)
    with pytest.raises(Refused, match=rf"^{KEY}\.allow_random_init=true is only for smoke runs"):
        ClipImageEncoder.validate_config({"allow_random_init": True}, Refused, KEY)
    ClipImageEncoder.validate_config(tiny, Refused, KEY, random_backbone=True)  # a smoke run: accepted
    ClipImageEncoder.validate_config({"allow_random_init": True}, Refused, KEY, random_backbone=True)

    with pytest.raises(Refused, match=rf"^{KEY}: missing weight file ViT-H-14/open_clip_model\.safetensors") as exc:
        ClipImageEncoder.validate_config(OmegaConf.create({"model": "ViT-H-14"}), Refused, KEY)
    assert str(no_weights) in str(exc.value) and f"{KEY}.weights=<file>" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(Refused, match=rf"^{KEY}: missing weight file ViT-H-14/"):
        ClipImageEncoder.validate_config(None, Refused, KEY)  # the default model
    with pytest.raises(Refused, match=rf"^{KEY}: {KEY}\.tiny=true has no published weights"):
        ClipImageEncoder.validate_config({"tiny": True}, Refused, KEY, random_backbone=True)
    with pytest.raises(Refused, match="not a built-in open_clip architecture"):
        ClipImageEncoder.validate_config({"model": "hf-hub:someone/some-clip"}, Refused, KEY)

    (no_weights / "ViT-H-14").mkdir(parents=True)
    (no_weights / "ViT-H-14" / WEIGHT_FILES[0]).write_bytes(b"x")  # found (not loaded by the check)
    ClipImageEncoder.validate_config(OmegaConf.create({"model": "ViT-H-14", "weights": None}), Refused, KEY)
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"x")
    ClipImageEncoder.validate_config({"model": "ViT-H-14", "weights": str(own)}, Refused, KEY)

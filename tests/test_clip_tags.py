"""prompt=clip_tags: CLIP zero-shot tag prompts (sr_lab/models/tagging.py), on the tiny random CLIP."""
from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_train, random_images
from sr_lab.models.tagging import (
    WEIGHT_FILES,
    ClipTags,
    check_clip_tag_weights,
    default_vocabulary,
    load_vocabulary,
    resolve_clip_weights,
)
from sr_lab.utils.weights import MissingWeights



@pytest.fixture(scope="module")
def tagger():
    return ClipTags(tiny=True, allow_random_init=True, min_score=0.0, top_k=5)




def _split(row: str) -> list[str]:
    return row.split(", ") if row else []


@pytest.mark.parametrize("batch", [1, 3])
def test_one_tag_string_per_row(tagger, batch):
    rows = tagger(random_images(batch))
    assert isinstance(rows, list) and len(rows) == batch
    vocab = set(tagger.vocabulary)
    for row in rows:
        assert isinstance(row, str)
        tags = _split(row)
        assert len(tags) == 5 and len(set(tags)) == 5  # min_score=0: exactly top_k
        assert set(tags) <= vocab


def test_deterministic(tagger):
    x = random_images(3, seed=1)
    assert tagger(x) == tagger(x)
    assert ClipTags(tiny=True, allow_random_init=True, min_score=0.0)(x) == tagger(x)  # same seed, same model


def test_top_k_and_min_score():
    vocab = ["dog", "cat", "tree", "car", "sky", "grass"]
    x = random_images(2, seed=2)
    two = ClipTags(tiny=True, allow_random_init=True, vocabulary=vocab, top_k=2, min_score=0.0)
    rows = two(x)
    assert all(len(_split(r)) == 2 and set(_split(r)) <= set(vocab) for r in rows)
    # the kept tags are the best-scored ones, in score order
    s = two.scores(x)
    for b, r in enumerate(rows):
        order = [vocab[j] for j in torch.argsort(s[b], descending=True).tolist()]
        assert _split(r) == order[:2]
    # nothing reaches a probability of 1: the empty prompt
    assert ClipTags(tiny=True, allow_random_init=True, vocabulary=vocab, min_score=1.0)(x) == ["", ""]


def test_matching_image_embedding_is_the_first_tag(monkeypatch):
    vocab = ["dog", "cat", "tree", "car", "sky", "grass", "building", "water"]
    tags = ClipTags(tiny=True, allow_random_init=True, vocabulary=vocab, top_k=3, min_score=0.0)
    text = tags.text_features()
    assert text.shape == (len(vocab), 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(vocab)))
    wanted = [3, 0, 6]  # one vocabulary index per row

    def encode_image(pixels, normalize=False):
        assert pixels.shape[-2:] == tags.image_size
        return 7.0 * text[wanted[: pixels.shape[0]]]  # any scale: cosine 1 with the wanted tag

    monkeypatch.setattr(tags.model, "encode_image", encode_image)
    rows = tags(random_images(3))
    assert [_split(r)[0] for r in rows] == [vocab[j] for j in wanted]
    cos = ClipTags(tiny=True, allow_random_init=True, vocabulary=vocab, score="cosine", min_score=0.999)
    monkeypatch.setattr(cos.model, "encode_image", encode_image)
    assert cos(random_images(3)) == [vocab[j] for j in wanted]


def test_image_hr_tags_the_hr(monkeypatch):
    vocab = ["dog", "cat", "tree", "car"]
    made = {}
    for image in ("lr", "hr"):
        t = ClipTags(tiny=True, allow_random_init=True, vocabulary=vocab, top_k=1, min_score=0.0, image=image)
        text = t.text_features()
        # dark image -> "cat", bright image -> "car" (pixels are normalised: sign of the mean)
        monkeypatch.setattr(t.model, "encode_image", lambda p, normalize=False, text=text: torch.stack(
            [text[3] if float(row.mean()) > 0 else text[1] for row in p]))
        made[image] = t
    lr, hr = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 64, 64)
    assert made["lr"](lr, hr) == ["cat", "cat"]
    assert made["hr"](lr, hr) == ["car", "car"]
    assert made["hr"](lr) == ["cat", "cat"]  # no HR (inference): the LR
    with pytest.raises(ValueError, match="rows"):
        made["hr"](lr, hr[:1])


def test_text_features_computed_once(monkeypatch):
    t = ClipTags(tiny=True, allow_random_init=True, vocabulary=["dog", "cat"], min_score=0.0)
    calls = []
    encode_text = t.model.encode_text
    monkeypatch.setattr(t.model, "encode_text", lambda *a, **k: calls.append(1) or encode_text(*a, **k))
    t(random_images(1))
    t(random_images(2))
    assert len(calls) == 1


def test_frozen(tagger):
    assert not any(p.requires_grad for p in tagger.model.parameters())
    assert not tagger.model.training
    tagger.model.train()  # e.g. a caller switching everything to train mode
    tagger(random_images(1))
    assert not tagger.model.training
    assert not isinstance(tagger, torch.nn.Module)  # never enters a stage's state dict


def test_missing_weights_fail_fast(no_weights):
    with pytest.raises(MissingWeights, match=r"ViT-B-16/open_clip_model\.safetensors") as exc:
        ClipTags()
    assert str(no_weights) in str(exc.value)
    with pytest.raises(MissingWeights, match=r"ViT-B-16/open_clip_model\.safetensors"):
        check_clip_tag_weights(compose_train(["prompt=clip_tags"]).prompt)
    with pytest.raises(MissingWeights, match=r"clip\.bin.*put it in " + str(no_weights.parent / "nowhere")):
        ClipTags(weights=str(no_weights.parent / "nowhere" / "clip.bin"))


def test_random_init_refused_without_allow_random_init(no_weights):
    with pytest.raises(ValueError, match="allow_random_init"):
        ClipTags(tiny=True)
    with pytest.raises(ValueError, match="allow_random_init"):
        check_clip_tag_weights({"tiny": True})
    with pytest.raises(MissingWeights):
        ClipTags(model="ViT-B-16", allow_random_init=False)
    check_clip_tag_weights({"model": "ViT-B-16", "allow_random_init": True})  # allowed: no error
    with pytest.raises(ValueError, match="not a built-in open_clip architecture"):
        check_clip_tag_weights({"model": "hf-hub:someone/some-clip"})


def test_weights_are_loaded_from_local_files(tmp_path, tagger):
    from safetensors.torch import save_file

    other = ClipTags(tiny=True, allow_random_init=True, seed=7)
    state = {k: v.contiguous() for k, v in other.model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    torch.save(state, tmp_path / "tiny.bin")
    for f in ("tiny.safetensors", "tiny.bin"):
        loaded = ClipTags(tiny=True, weights=str(tmp_path / f))
        assert not loaded.random_weights
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, state[k]), (f, k)
    assert not torch.equal(tagger.model.logit_scale, torch.zeros(())) and any(
        not torch.equal(v, state[k]) for k, v in tagger.model.state_dict().items())  # seed 0 != seed 7


def test_weight_file_search_order(tmp_path, no_weights):
    flat, sub = no_weights, no_weights / "ViT-B-16"
    sub.mkdir(parents=True)
    (flat / WEIGHT_FILES[1]).write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-16") == flat / WEIGHT_FILES[1]
    (sub / WEIGHT_FILES[1]).write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-16") == sub / WEIGHT_FILES[1]
    (sub / WEIGHT_FILES[0]).write_bytes(b"x")  # safetensors preferred
    assert resolve_clip_weights("ViT-B-16") == sub / WEIGHT_FILES[0]
    check_clip_tag_weights({"model": "ViT-B-16"})
    own = tmp_path / "mine"
    own.mkdir()
    (own / WEIGHT_FILES[1]).write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-16", own) == own / WEIGHT_FILES[1]  # an explicit folder only
    assert resolve_clip_weights("ViT-B-16", own / WEIGHT_FILES[1]) == own / WEIGHT_FILES[1]


def test_vocabulary(tmp_path):
    vocab = default_vocabulary()
    assert 200 <= len(vocab) <= 400 and len(set(vocab)) == len(vocab)
    assert all(t and "," not in t and t == t.strip() for t in vocab)
    f = tmp_path / "tags.txt"
    f.write_text("# mine\ndog\n\n cat  # pet\ndog\n")
    assert load_vocabulary(str(f)) == ["dog", "cat"]
    assert load_vocabulary(OmegaConf.create(["a", "b"])) == ["a", "b"]
    with pytest.raises(ValueError, match="comma"):
        load_vocabulary(["a, b"])
    with pytest.raises(ValueError, match="not a file"):
        load_vocabulary(str(tmp_path / "missing.txt"))


def test_hydra_prompt_clip_tags_tiny_feeds_the_backbone(tiny_backbone):
    from sr_lab.config.safe_instantiate import check_targets
    from sr_lab.config.validation import ConfigError

    cfg = compose_train(["prompt=clip_tags_tiny"])
    assert cfg.module.prompt.tiny and cfg.module.prompt.allow_random_init
    check_targets(cfg.module.prompt, key="module.prompt")  # a stored stage config may name it
    ClipTags.validate_config(cfg, ConfigError)
    source = hydra.utils.instantiate(cfg.module.prompt)
    assert isinstance(source, ClipTags)
    lr = random_images(3, size=(16, 16))
    rows = source(lr)
    assert len(rows) == 3 and all(_split(r) for r in rows)
    ctx = tiny_backbone.prompt_embedding(rows, 3)
    assert ctx.shape[0] == 3 and ctx.shape[-1] == 32 and torch.isfinite(ctx).all()
    for b, row in enumerate(rows):
        torch.testing.assert_close(ctx[b:b + 1], tiny_backbone.prompt_embedding(row, 1))
    # a random tagger only with a random (tiny) backbone
    with pytest.raises(ConfigError, match="prompt.tiny=true is only for smoke runs"):
        ClipTags.validate_config(compose_train(["prompt=clip_tags_tiny", "backbone=sd21_base"]), ConfigError)


def test_validate_config_reports_missing_weights(no_weights):
    from sr_lab.config.validation import ConfigError

    with pytest.raises(ConfigError, match=r"^prompt: missing weight file ViT-B-16/open_clip_model\.safetensors"):
        ClipTags.validate_config(compose_train(["prompt=clip_tags"]), ConfigError)
    ClipTags.validate_config(compose_train(["prompt=clip_tags", "prompt.allow_random_init=true"]), ConfigError)

"""The trained tiny prior shipped in the package (``sr_lab/assets/tiny_prior``, ``backbone=tiny``): its files match
the card, the card's recipe rebuilds the same first training step, the held-out VAE PSNR is what the card says,
and ``backbone=tiny`` / ``backbone=tiny_random`` build what they name."""
from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch

from sr_lab.models.backbone import BackboneUnavailable, build_tiny, build_tiny_trained
from sr_lab.pretrain import load_tiny_prior
from sr_lab.pretrain.prior import CARD_FORMAT, DEFAULT_PRIOR_DIR, WEIGHT_FILES, file_sha256
from sr_lab.pretrain.tiny import HELD_OUT, Recipe, center_crop_multiple, load_photos, train_vae, vae_psnr

#: margin under the card's held-out VAE PSNR: the same CPU and torch reproduce it to ~1e-6 dB; another CPU kind
#: or torch build changes the last bits of the float32 convolutions, far below this
PSNR_MARGIN_DB = 0.05


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((DEFAULT_PRIOR_DIR / "card.json").read_text(encoding="utf-8"))


def recipe_of(card: dict) -> Recipe:
    kinds = {f.name for f in fields(Recipe)}
    return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["recipe"].items() if k in kinds})


def test_shipped_files_match_the_card_and_the_size_budget(card):
    assert card["format"] == CARD_FORMAT
    assert set(WEIGHT_FILES) <= set(card["files"]) and "samples.png" in card["files"]
    total = 0
    for name, entry in card["files"].items():
        path = DEFAULT_PRIOR_DIR / name
        assert path.stat().st_size == entry["bytes"], name
        assert file_sha256(path) == entry["sha256"], name
        total += entry["bytes"]
    total += (DEFAULT_PRIOR_DIR / "card.json").stat().st_size
    assert total <= 20 * 2 ** 20  # the budget: <= 20 MB in all
    assert card["data"]["held_out_photos"] == list(HELD_OUT)
    assert card["scaling_factor"] == pytest.approx(1 / card["latent_std"], rel=1e-12)
    recipe_of(card).check()  # a valid recipe of this version of sr_lab.pretrain.tiny


def test_the_cards_recipe_rebuilds_the_recorded_first_step(card):
    """build_tiny(card seed)'s VAE, the card's recipe and generators: the first VAE training step's loss equals the
    one recorded while the shipped weights were trained (same init, crops, posterior noise and loss)."""
    recipe = replace(recipe_of(card), vae_steps=1)
    vae = build_tiny(seed=card["seed"]).vae
    photos = list(load_photos().train.values())
    assert sorted(load_photos().train) == sorted(card["data"]["train_photos"])
    summary = train_vae(vae, photos, recipe, torch.device("cpu"), log_every=10 ** 9)
    assert summary["first_loss"] == pytest.approx(card["training"]["vae"]["first_loss"], rel=1e-4)


def test_held_out_vae_psnr_matches_the_card(card):
    bb = build_tiny_trained()
    held = {name: center_crop_multiple(img) for name, img in load_photos().held_out.items()}
    psnr = vae_psnr(bb, held)
    for name in (*HELD_OUT, "mean"):
        assert psnr[name] >= card["quality"]["vae_psnr_rgb"][name] - PSNR_MARGIN_DB, name
    # a real autoencoder of photos, far from the random one
    assert psnr["mean"] > 24.0
    assert vae_psnr(build_tiny(seed=0), held)["mean"] < 15.0


def test_backbone_tiny_is_the_trained_prior_and_tiny_random_is_not(card):
    trained, rand = build_tiny_trained(), build_tiny(seed=0)
    assert trained.name == "tiny" and rand.name == "tiny_random"
    assert trained.latent_scale == pytest.approx(card["scaling_factor"]) and rand.latent_scale == 0.18215
    unet_state, vae_state, _ = load_tiny_prior()
    for key in ("conv_in.weight", "conv_out.bias"):
        assert torch.equal(trained.unet.state_dict()[key], unet_state[key])
        assert not torch.equal(rand.unet.state_dict()[key], unet_state[key])
    assert torch.equal(trained.vae.state_dict()["decoder.conv_out.weight"], vae_state["decoder.conv_out.weight"])
    # the frozen text encoder is build_tiny(card seed)'s (the empty-prompt context the UNet was trained with)
    assert torch.equal(trained.prompt_embedding("", 1), rand.prompt_embedding("", 1))
    assert torch.equal(trained.alphas_cumprod, rand.alphas_cumprod)


def test_a_missing_or_altered_prior_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneUnavailable, match="no card.json"):
        build_tiny_trained(path=str(tmp_path))
    for name in ("card.json", *WEIGHT_FILES):
        (tmp_path / name).write_bytes((DEFAULT_PRIOR_DIR / name).read_bytes())
    with open(tmp_path / "vae.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BackboneUnavailable, match="vae.safetensors: sha256 mismatch"):
        build_tiny_trained(path=str(tmp_path))


def test_config_check_refuses_a_folder_without_a_card(tmp_path):
    from helpers import compose_train

    from sr_lab.config.validation import ConfigError, validate_config

    cfg = compose_train(["experiment=ccsr_stage1", f"backbone.path={tmp_path}"], tmp_path)
    with pytest.raises(ConfigError, match=f"backbone.path={tmp_path} is not a tiny prior folder"):
        validate_config(cfg)

"""backbone=sd21_shape: SD 2.1-base's exact architecture with random weights (issue "performance at the
real model shape", item 1), built on the meta device so the test costs seconds and no memory."""
import pytest

from helpers import compose_train
from sr_lab.config.validation import ConfigError, validate_config


def _millions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


def test_parameter_counts_are_sd21_base():
    from sr_lab.models.backbone import build_sd21_shape

    bb = build_sd21_shape(device="meta")
    assert (_millions(bb.unet), _millions(bb.vae), _millions(bb.prompt_encoder)) == (865.9, 83.7, 340.4)
    assert bb.latent_scale == 0.18215 and bb.vae_factor == 8 and bb.num_timesteps == 1000
    assert bb.unet.config.cross_attention_dim == bb.prompt_encoder.text_model.config.hidden_size == 1024
    assert not any(p.requires_grad for p in bb.parameters())  # frozen like every backbone


def test_training_on_random_sd21_shape_is_refused_without_the_override(tmp_path):
    cfg = compose_train(["experiment=ccsr_stage1", "backbone=sd21_shape"], tmp_path)
    with pytest.raises(ConfigError, match="backbone=sd21_shape has random weights"):
        validate_config(cfg)
    validate_config(compose_train(["experiment=ccsr_stage1", "backbone=sd21_shape",
                                   "backbone.allow_training=true"], tmp_path))
    with pytest.raises(ConfigError, match="backbone.device=meta builds no weights"):
        validate_config(compose_train(["experiment=ccsr_stage1", "backbone=sd21_shape", "backbone.device=meta",
                                       "backbone.allow_training=true"], tmp_path))


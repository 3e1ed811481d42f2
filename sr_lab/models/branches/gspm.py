"""ClearSR's Global Structure Preserving Module (GSPM): a ControlNet with the attention blocks removed
(ClearSR paper 003, Sec. 3.2 "Global Structure Preserving Module", Fig. 3; methods.md "ClearSR").

"GSPM is an independent module that removes the transformer blocks and only retains the ResBlocks from
the ControlNet": a diffusers ``ControlNetModel`` built from the UNet's configuration with every down
block a ``DownBlock2D`` (ResBlocks + downsampler, no transformer) and an attention-free middle block
(``UNetMidBlock2D`` with ``add_attention=False`` and the UNet's two middle ResBlocks), initialised from
the frozen UNet's weights wherever the names match (``conv_in``, time embedding, every ResBlock and
downsampler) — what ``ControlNetModel.from_unet`` does for a full ControlNet. Its zero convolutions
make its residuals zero at initialisation; its multi-scale residuals have the DPM's shapes and the runner
sums both into the frozen UNet (Fig. 3). It reads the same LR latent ``x_lr`` through its own one-level
conditioning embedding, like :class:`~sr_lab.models.branches.controlnet.ControlNetBranch`.
"""
from __future__ import annotations

from torch import nn

from sr_lab.models.branches.controlnet import ControlNetBranch

__all__ = ["GSPMBranch", "resblock_controlnet"]


def resblock_controlnet(unet: nn.Module, conditioning_channels: int, embedding_channels: int) -> nn.Module:
    """A ControlNet of the UNet's shape with ResBlocks only, initialised from the UNet (module doc)."""
    from diffusers import ControlNetModel
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    c = unet.config
    n = len(c.block_out_channels)
    net = ControlNetModel(
        in_channels=c.in_channels, conditioning_channels=int(conditioning_channels),
        flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift, down_block_types=("DownBlock2D",) * n,
        mid_block_type="UNetMidBlock2D", block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block, downsample_padding=c.downsample_padding,
        mid_block_scale_factor=c.mid_block_scale_factor, act_fn=c.act_fn, norm_num_groups=c.norm_num_groups,
        norm_eps=c.norm_eps, cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads, use_linear_projection=c.use_linear_projection,
        resnet_time_scale_shift=c.resnet_time_scale_shift,
        conditioning_embedding_out_channels=(int(embedding_channels),))
    # the UNet's middle block has two ResBlocks around its transformer: keep both, without the transformer
    net.mid_block = UNetMidBlock2D(
        in_channels=c.block_out_channels[-1], temb_channels=net.time_embedding.linear_2.out_features,
        num_layers=1, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
        output_scale_factor=c.mid_block_scale_factor, resnet_groups=c.norm_num_groups,
        resnet_time_scale_shift=c.resnet_time_scale_shift, add_attention=False)
    own = net.state_dict()
    theirs = unet.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    from_unet = [k for k in own if not k.startswith(("controlnet_", "controlnet_cond_embedding"))]
    missing = [k for k in from_unet if k not in copied]
    if missing:
        raise ValueError(f"GSPM: {len(missing)} ResBlock weights have no UNet counterpart, e.g. {missing[:3]}")
    net.load_state_dict(copied, strict=False)
    return net


class GSPMBranch(ControlNetBranch):
    """ResBlock-only ControlNet on ``cond[cond_key]`` (module doc); arguments as ControlNetBranch."""

    def make_controlnet(self, unet: nn.Module, latent_channels: int, embedding_channels: int) -> nn.Module:
        return resblock_controlnet(unet, latent_channels, embedding_channels)

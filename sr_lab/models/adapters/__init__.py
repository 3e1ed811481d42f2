"""Conditioning adapters (config group ``adapter``).

An adapter is an ``nn.Module`` that holds everything trainable about how the LR image steers a frozen
UNet. Its interface:

* ``condition(backbone, lr01, hr_size) -> dict`` — precompute the conditioning (no grad), e.g. the VAE
  latent of the bicubic-upsampled LR;
* ``forward(unet, x, t, context, cond) -> ε̂`` — run the frozen UNet under this conditioning.

A new method plugs in a new adapter class plus a YAML file; the training modules never branch on it.
"""

"""Samplers: pure functions ``sample(model, noise, cond, alphas_cumprod, *, generator, hook, **knobs)``.

``model(x, t, cond) -> ε̂`` is any eps-prediction callable (backbone + control branches), ``noise`` is
the starting latent drawn by the caller, and the result is the predicted clean latent x̂0. Each sampler
is a timestep list (``sample.timesteps(T, **knobs)``, see :mod:`.registry`) plus the shared step rules
of :mod:`.steps`, run by the one loop of :mod:`.loop` with its step hook.
"""
from sr_lab.diffusion.samplers.registry import declares_timesteps, sampler_timesteps

__all__ = ["declares_timesteps", "sampler_timesteps"]

"""Samplers: pure functions ``sample(model, noise, cond, alphas_cumprod, *, generator, **knobs)``.

``model(x, t, cond) -> ε̂`` is any eps-prediction callable (backbone + adapter), ``noise`` is the
starting latent x_T drawn by the caller, and the result is the predicted clean latent x̂0.
"""

"""LightningModule: AddSR's adversarial diffusion distillation — teacher, student, discriminator (AddSR
paper 002, Sec. 3, Eq. 1–4, Sec. 4.1, App. C; methods.md "AddSR").

The third kind of training stage. It *is* a denoising stage (it subclasses
:class:`~sr_lab.modules.diffusion_finetune.DiffusionAdapterFinetune`: the student's ``prepare`` /
``denoise`` / ``decode_latent`` are what ``sr-infer`` uses, and only the student's weights are needed at
inference) with three parts:

* **Teacher** — any trained ControlNet-family stage export (``teacher=<run|export|ckpt>``), rebuilt
  frozen on the shared frozen backbone when training starts (``setup("fit")``), conditioned on the HR
  image and the HR's prompt, never on the LR (paper Sec. 3.1: x̂ψ(x̂_θ,t, t, ρ', x_0)).
* **Student** — the same architecture (this module's ``adapter``, composed from the same YAML as the
  teacher's), initialised from the teacher's trained weights in ``setup("fit")``; which parts train is the
  ``trainable`` list of name patterns (default: every control-branch weight; the authors' code trains only
  the ControlNet's input embedding and attention layers: ``student_trainable=authors`` in
  ``experiments/addsr.yaml``).
* **Discriminator** — a frozen feature network with small trainable heads conditioned on c_img of the LR
  (:class:`sr_lab.models.discriminators.ProjectedDiscriminator`), built in ``setup("fit")``.

One iteration (manual optimisation, :class:`~sr_lab.modules.manual_optimization.ManualOptimization`):

1. draw the graded student step i uniformly from the student timesteps {999, 749, 499, 249} (one per
   batch, from the run's generator); x_s = q(x_0^HR, s_i) (paper Sec. 3.1 (1));
2. **PSR** (Eq. 2): roll out steps 1..i−1 under ``no_grad`` — step k takes x_{s_k} = q(x_0, s_k) with
   the condition refined from x̂0 of step k−1 — to obtain x̂0^{i−1}; the graded step is conditioned on it
   (c_i ∈ {x_LR, x̂0^1, x̂0^2, x̂0^3}). ``rollout=authors`` reproduces the authors' 2-step scheme (one
   no-grad step at s_{i−1} conditioned on the LR, then the graded step at s_i);
3. **generator half**: TA-ADD (Eq. 1) = d(s, t)·‖x̂0 − sg(x̂ψ)‖² over k teacher draws t ~ U[0, T) per sample
   (x̂_θ,t = q(x̂0, t); the teacher predicts x̂ψ with stop-gradient; pixel space, both decoded to [0, 1], as
   the authors, or latent space) + λ·hinge_G(D(x̂0, c_img)), λ = 0.02; only student weights step;
4. **discriminator half**: hinge_D(D(x_HR), D(sg(x̂0))) (+ optional R1); only the heads step.

d(s, t): :mod:`sr_lab.losses.distillation` (Eq. 3 exponential, μ = 0.5, ν = 2.1; Eq. 4 linear).
PSR at training time uses the ``psr_w`` blend (default 1: the condition *is* x̂0^{i−1}, as the paper's
set C) in ``psr_space`` (default latent: no VAE decode + re-encode per rollout step — the authors decode
and re-encode in pixel space; ``psr_space=pixel`` does that). Inference uses ``sampler=addsr``
(re-noise rule + :class:`~sr_lab.diffusion.hooks.PSRHook`, w_psr = 0.5 as the authors' script).

Batch size, device count, gradient accumulation and resume are unconstrained (the authors' code is fixed
to batch 2 per GPU); all randomness comes from generators derived from (seed, micro-batch, rank).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sr_lab.diffusion.schedule import q_sample, randn_like, x0_from_eps
from sr_lab.losses.distillation import ExponentialWeight, distillation_loss
from sr_lab.models.prompts import as_prompt_source
from sr_lab.models.stage_inputs import repeat_rows
from sr_lab.modules.diffusion_finetune import DiffusionAdapterFinetune
from sr_lab.utils.seeding import make_generator

log = logging.getLogger(__name__)

__all__ = ["AdversarialDistillation"]


class AdversarialDistillation(DiffusionAdapterFinetune):
    capabilities = frozenset({"denoise"})
    training_only_prefixes = ("discriminator.", "teacher.")  # built in setup("fit"); not needed to infer

    def __init__(self, backbone: nn.Module, adapter: Callable | nn.Module, sampler: Callable, *,
                 teacher: str | None = None, discriminator: Callable | nn.Module | None = None,
                 distill_weight: Callable | None = None, student_timesteps: Sequence[int] = (999, 749, 499, 249),
                 teacher_draws: int = 4, adv_weight: float = 0.02, distill_space: str = "pixel",
                 rollout: str = "full", psr_w: float = 1.0, psr_space: str = "latent",
                 trainable: Sequence[str] | str = ("*",), teacher_prompt: str | Callable | None = None,
                 optimizer: Callable | None = None, disc_optimizer: Callable | None = None,
                 r1_weight: float = 0.0, accumulate: int = 1, grad_clip: float | None = None,
                 prompt: str | Callable | None = "", start: str = "lr", seed: int = 0, val_seed: int = 1234,
                 crop_border: int = 4, val_grid_images: int = 4, run_config: dict | None = None):
        super().__init__(backbone, adapter, None, sampler, optimizer=optimizer, optimizer_mode="alternate",
                         accumulate=accumulate, grad_clip=grad_clip, prompt=prompt, start=start, seed=seed,
                         val_seed=val_seed, crop_border=crop_border, val_grid_images=val_grid_images,
                         run_config=run_config)
        T = backbone.num_timesteps
        ts = [int(t) for t in student_timesteps]
        if not ts or any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"student_timesteps={ts} must be strictly descending in [0, {T})")
        for name, value, allowed in (("distill_space", distill_space, ("pixel", "latent")),
                                     ("rollout", rollout, ("full", "authors")),
                                     ("psr_space", psr_space, ("latent", "pixel"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {allowed}")
        if teacher_draws < 1 or adv_weight < 0 or r1_weight < 0 or not 0 <= psr_w <= 1:
            raise ValueError("teacher_draws >= 1, adv_weight >= 0, r1_weight >= 0 and psr_w in [0, 1] are required")
        self.student_timesteps = ts
        self.teacher_path = None if teacher in (None, "") else str(teacher)
        self._discriminator_factory = discriminator
        self.discriminator: nn.Module | None = discriminator if isinstance(discriminator, nn.Module) else None
        self.teacher: nn.Module | None = None
        self.distill_weight = distill_weight or ExponentialWeight()
        self.teacher_draws, self.adv_weight, self.r1_weight = int(teacher_draws), float(adv_weight), float(r1_weight)
        self.distill_space, self.rollout, self.psr_w, self.psr_space = distill_space, rollout, float(psr_w), psr_space
        self.teacher_prompt = None if teacher_prompt is None else as_prompt_source(teacher_prompt)
        self._disc_optimizer = disc_optimizer
        self.trainable_patterns = [trainable] if isinstance(trainable, str) else list(trainable)
        self._select_trainable()

    # -- which student weights train ----------------------------------------------------------------
    def _learned(self) -> set[str]:
        """The student's learned tensors (frozen copies a branch rebuilds, e.g. a CLIP tower, excluded)."""
        learned = getattr(self.adapter, "learned_state_keys", None)
        return set(learned()) if learned is not None else set(self.adapter.state_dict())

    def _select_trainable(self) -> None:
        learned = self._learned()
        names = [n for n, _ in self.adapter.named_parameters() if n in learned]
        chosen = {n for n in names if any(fnmatch.fnmatch(n, p) for p in self.trainable_patterns)}
        if not chosen:
            raise ValueError(f"trainable={self.trainable_patterns} matches no student weight (e.g. {names[:3]})")
        for n, p in self.adapter.named_parameters():
            p.requires_grad_(n in chosen)

    def trainable_state_keys(self) -> set[str]:
        """The whole learned student (its frozen part came from the teacher and is needed at inference) plus
        the trainable discriminator heads and their buffers."""
        keys = super().trainable_state_keys()
        keys |= {f"adapter.{n}" for n, _ in self.adapter.named_parameters() if n in self._learned()}
        return {k for k in keys if not k.startswith("teacher.")}

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    # -- training-only parts ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher is None:
            if not self.teacher_path:
                raise ValueError("teacher is required to train AddSR: the export (or run folder / .ckpt) of a "
                                 "trained ControlNet stage, e.g. teacher=outputs/addsr_teacher/<date>")
            from sr_lab.modules.stage_io import load_frozen_stage

            self.teacher = load_frozen_stage(self.teacher_path, self.backbone)
            own = self.adapter.state_dict()
            theirs = self.teacher.adapter.state_dict()
            if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
                diff = sorted(set(own) ^ set(theirs))[:3]
                raise ValueError(f"teacher {self.teacher_path}: its control branches differ from the student's "
                                 f"(adapter=...), e.g. {diff}; compose the student from the teacher's adapter")
            if self._micro == 0:  # a fresh run: the student starts as the teacher (resume overwrites it)
                self.adapter.load_state_dict(theirs)
        if self.discriminator is None:
            if self._discriminator_factory is None:
                raise ValueError("discriminator is required to train AddSR (discriminator=projected_dinov2 ...)")
            self.discriminator = self._discriminator_factory() if callable(self._discriminator_factory) \
                and not isinstance(self._discriminator_factory, nn.Module) else self._discriminator_factory

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return 2  # student, then discriminator heads

    def configure_optimizers(self):
        disc = self._disc_optimizer or self.optimizer_factory
        heads = list(self.discriminator.trainable_parameters())
        return [self.optimizer_factory(self.student_parameters()), disc(heads)]

    # -- one iteration ------------------------------------------------------------------------------
    def _t(self, t: int, b: int, device) -> torch.Tensor:
        return torch.full((b,), int(t), device=device, dtype=torch.long)

    def decode_differentiable(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [0, 1] through the frozen VAE decoder, gradients flowing to the latent
        (not clamped, so they do not vanish outside [0, 1])."""
        bb = self.backbone
        x = bb.vae.decode(latent.to(bb.vae.dtype) / bb.latent_scale).sample
        return (x.float() + 1) / 2

    def student_x0(self, hr: torch.Tensor, lr: torch.Tensor, gen) -> tuple[torch.Tensor, int, dict]:
        """PSR rollout (no grad) + the graded student step: (x̂0 with grad, graded index i, cond used)."""
        ab = self.backbone.alphas_cumprod
        b = hr.shape[0]
        hr_size = tuple(hr.shape[-2:])
        x0_hr = self.backbone.encode(hr, generator=gen, sample=True)
        n = len(self.student_timesteps)
        dev = gen.device if gen is not None else hr.device
        i = int(torch.randint(0, n, (1,), generator=gen, device=dev))
        cond0, _ = self.prepare(lr, hr_size)
        cond = cond0
        first = 0 if self.rollout == "full" else max(0, i - 1)
        with torch.no_grad():
            for k in range(first, i):
                tk = self._t(self.student_timesteps[k], b, hr.device)
                xk = q_sample(ab, x0_hr, tk, randn_like(x0_hr, gen))
                x0k = x0_from_eps(ab, xk, tk, self.denoise(xk, tk, cond))
                cond = cond0["refine"](cond, x0k, self.psr_w, self.psr_space)
        ts = self._t(self.student_timesteps[i], b, hr.device)
        xs = q_sample(ab, x0_hr, ts, randn_like(x0_hr, gen))
        return x0_from_eps(ab, xs, ts, self.denoise(xs, ts, cond)), i, cond

    def teacher_x0(self, x0_student: torch.Tensor, hr: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """k teacher draws per sample: (x̂ψ for the repeated rows, the teacher timesteps t), no grad."""
        ab = self.backbone.alphas_cumprod
        b, k = x0_student.shape[0], self.teacher_draws
        dev = gen.device if gen is not None else hr.device
        t = torch.randint(0, ab.shape[0], (b * k,), generator=gen, device=dev).to(hr.device)
        with torch.no_grad():
            prompts = self.teacher_prompt(hr, hr) if self.teacher_prompt is not None else None
            tcond, _ = self.teacher.prepare(hr, tuple(hr.shape[-2:]), prompts=prompts, hr=hr)
            tcond = repeat_rows(tcond, b, k)
            x_rep = torch.cat([x0_student.detach()] * k) if k > 1 else x0_student.detach()
            x_t = q_sample(ab, x_rep, t, randn_like(x_rep, gen))
            x_psi = x0_from_eps(ab, x_t, t, self.teacher.denoise(x_t, t, tcond))
        return x_psi, t

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.disable_ddp_reducer()
        hr, lr = batch["hr"], batch["lr"]
        b = hr.shape[0]
        gen = make_generator(self.seed, "train", self._micro, self.global_rank, device=hr.device)
        opt_g, opt_d = self.optimizers()
        last_micro = self.is_last_micro()
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        c_img = self.discriminator.embed_condition(lr_up)

        # generator half: TA-ADD (Eq. 1) on the student only
        self.toggle_optimizer(opt_g)
        x0, i, _ = self.student_x0(hr, lr, gen)
        x_psi, t = self.teacher_x0(x0, hr, gen)
        k = self.teacher_draws
        p_s = torch.full((b * k,), float(i + 1), dtype=torch.float64, device=hr.device)
        weight = self.distill_weight(self.backbone.alphas_cumprod.to(hr.device)[t], p_s)
        x_rep = torch.cat([x0] * k) if k > 1 else x0
        fake01 = self.decode_differentiable(x0)
        if self.distill_space == "pixel":
            with torch.no_grad():
                target = self.backbone.decode(x_psi)
            student_img = torch.cat([fake01] * k) if k > 1 else fake01
            loss_dis = distillation_loss(student_img, target, weight)
        else:
            loss_dis = distillation_loss(x_rep, x_psi, weight)
        g_adv = self.discriminator.generator_loss(self.discriminator(fake01, c_img, generator=gen))
        loss_g = loss_dis + self.adv_weight * g_adv
        self.manual_backward(loss_g / self.accumulate)
        if last_micro:
            self.step_optimizer(opt_g)
        self.untoggle_optimizer(opt_g)

        # discriminator half: the heads only
        self.toggle_optimizer(opt_d)
        real = hr.detach().requires_grad_(self.r1_weight > 0)
        logits_real = self.discriminator(real, c_img, generator=gen)
        logits_fake = self.discriminator(fake01.detach().clamp(0, 1), c_img, generator=gen)
        d_loss = self.discriminator.discriminator_loss(logits_real, logits_fake)
        if self.r1_weight > 0:
            d_loss = d_loss + self.r1_weight * self.discriminator.r1(real, logits_real)
        self.manual_backward(d_loss / self.accumulate)
        if last_micro:
            self.step_optimizer(opt_d)
        self.untoggle_optimizer(opt_d)
        self._micro += 1
        logs = {"train/distill": loss_dis.detach(), "train/g_adv": g_adv.detach(), "train/d_loss": d_loss.detach(),
                "train/student_step": float(i + 1)}
        self.log_dict(logs, batch_size=b)
        self.log("train/loss", loss_g.detach(), prog_bar=True, batch_size=b)
        return loss_g.detach()

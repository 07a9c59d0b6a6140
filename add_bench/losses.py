"""Losses, one small named function each.

Teacher pre-training: :func:`denoising_loss` (v-prediction MSE with an optional min-SNR weighting).
"""

from __future__ import annotations

import torch

from add_bench.diffusion import Schedule, add_noise, v_from_x0_eps


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weighting for a v-prediction loss (Hang et al. 2023): min(SNR, γ) / (SNR + 1)."""
    snr = alpha**2 / sigma.clamp(min=1e-8) ** 2
    return snr.clamp(max=gamma) / (snr + 1)


def denoising_loss(
    unet,
    schedule: Schedule,
    x0,
    labels,
    generator: torch.Generator,
    cond_drop_prob: float = 0.1,
    null_label: int = 10,
    weighting: str = "min_snr",
    min_snr_gamma: float = 5.0,
) -> torch.Tensor:
    """E_{t,ε}[ w(t)·||v̂(x_t, t, c) − v||² ] with t ~ U{0..T−1}; labels dropped to ∅ with prob p."""
    n = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(n, generator=generator) < cond_drop_prob
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)
    target = v_from_x0_eps(x0, eps, alpha, sigma)
    per_sample = (unet(x_t, t, class_labels=labels).sample - target).pow(2).flatten(1).mean(1)
    w = min_snr_weight(alpha, sigma, min_snr_gamma).flatten() if weighting == "min_snr" else 1.0
    return (w * per_sample).mean()


TEACHER_WEIGHTINGS = ("v_mse", "min_snr")


# ============================================================================ ADD (paper section 1)
# Notation: x̂θ = student's x0 prediction, x̂ψ = teacher's x0 prediction, D_k = k-th discriminator head
# applied to the k-th feature level F_k of the frozen feature network.


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 2: L_adv^G = −E[ Σ_k D_k(F_k(x̂θ)) ] (each head's logits averaged over tokens and batch)."""
    return -sum(logits.mean() for logits in fake_logits)


def discriminator_hinge_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 3 without R1: E_x0[ Σ_k max(0, 1 − D_k(F_k(x0))) ] + E_x̂θ[ Σ_k max(0, 1 + D_k(F_k(x̂θ))) ]."""
    real = sum(torch.relu(1 - logits).mean() for logits in real_logits)
    fake = sum(torch.relu(1 + logits).mean() for logits in fake_logits)
    return real + fake


def r1_penalty(real_logits: list[torch.Tensor], real_features: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """Eq. 3's γ·R1(φ): γ · E_x0[ Σ_k ||∂D_k/∂F_k(x0)||² ], the gradient taken w.r.t. each head's INPUT
    features (not the pixels, not the head parameters). ``real_features`` must require grad."""
    if gamma == 0:
        return real_logits[0].new_zeros(())
    grads = torch.autograd.grad([logits.sum() for logits in real_logits], real_features, create_graph=True)
    return gamma * sum(g.pow(2).flatten(1).sum(1).mean() for g in grads)


def distillation_loss(
    x_student: torch.Tensor, x_teacher: torch.Tensor, c_t: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 4: E[ c(t)·d(x̂θ, x̂ψ) ], d = squared L2 (``reduction``: mean or sum over pixels), target detached."""
    sq = (x_student - x_teacher.detach()).pow(2).flatten(1)
    d = sq.mean(1) if reduction == "mean" else sq.sum(1)
    return (c_t.flatten() * d).mean()


def noise_anchored_regression(x_student: torch.Tensor, x_teacher_ode: torch.Tensor) -> torch.Tensor:
    """An extension, not the paper's (DMD, Yin et al. 2024): E_ε[ ||x̂θ(ε, τN) − ODE_ψ(ε)||² ] averaged over
    pixels, where ODE_ψ(ε) is the teacher's multi-step sample from the same noise ε (detached). It anchors
    each noise to its own image, which the adversarial term alone does not."""
    return (x_student - x_teacher_ode.detach()).pow(2).flatten(1).mean(1).mean()


def denoising_anchor(x_student: torch.Tensor, x0: torch.Tensor, w_s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """An extension, not the paper's: the student's own diffusion loss on its real inputs, written on x0
    predictions, E[ 1[s < τN]·w(s)·||x̂θ(x_s, s) − x0||² ] (pixel mean), with w(s) from
    :data:`DENOISING_WEIGHTINGS`. ``keep`` masks the rows whose s is below τN (at τN, x_s holds no x0); the
    mean runs over the whole batch, as Eq. 1's terms do."""
    per_sample = (x_student - x0.detach()).pow(2).flatten(1).mean(1)
    return (keep.float() * w_s.flatten() * per_sample).mean()


def v_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """1/σ²: ||x̂0 − x0||²/σ² = ||v̂ − v||², the v-prediction MSE the teachers were trained with."""
    return sigma.pow(-2)


def eps_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """α²/σ²: ||x̂0 − x0||²·α²/σ² = ||ε̂ − ε||², DDPM's ε-prediction MSE (weight ∝ SNR: the low-noise steps)."""
    return (alpha / sigma).pow(2)


DENOISING_WEIGHTINGS = {"v": v_weight, "eps": eps_weight}


# ------------------------------------------------------------------ c(t): the distillation weighting
def c_exp(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exponential weighting c(t) = α_t (the paper's default in the ablations)."""
    return alpha


def sds_w(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DreamFusion's w(t), here w(t) = σ_t² = 1 − ᾱ_t."""
    return sigma**2


def c_sds(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SDS weighting c(t) = α_t/(2σ_t)·w(t): makes Eq. 4's gradient the SDS gradient w(t)(ε̂ − ε) (App. A)."""
    return alpha / (2 * sigma) * sds_w(alpha, sigma)


C_WEIGHTINGS = {"exp": c_exp, "sds": c_sds, "nfsd": c_sds}


# ------------------------------------------------------------------ NFSD (Katzir et al. 2023)
NFSD_T_SWITCH = 200


def nfsd_delta(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eps_negative: torch.Tensor, t: torch.Tensor, scale: float
) -> torch.Tensor:
    """NFSD's replacement of the SDS residual: δ_D + s·δ_C with δ_C = ε(z;y) − ε(z;∅) and
    δ_D = ε(z;∅) for t < 200, else ε(z;∅) − ε(z;negative)."""
    late = (t >= NFSD_T_SWITCH).view(-1, *([1] * (eps_cond.ndim - 1)))
    delta_d = torch.where(late, eps_uncond - eps_negative, eps_uncond)
    return delta_d + scale * (eps_cond - eps_uncond)


def nfsd_target(x_student: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The x0 target whose Eq. 4 gradient, with c = c_sds, is w(t)·(δ_D + s·δ_C):
    x̂ψ = x̂θ − (σ_t/α_t)·δ  (from 2c(t)(x̂θ − x̂ψ) = w(t)·δ with c = α_t w(t)/(2σ_t))."""
    return x_student.detach() - sigma / alpha * delta


# ------------------------------------------------------------------ the teacher's target x̂ψ
@torch.no_grad()
def teacher_target(
    teacher,
    x_student: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    steps: int = 1,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """x̂ψ(sg(x̂θ,t); t): diffuse the student's sample, x̂θ,t = α_t·sg(x̂θ) + σ_t·ε', and let the frozen
    teacher predict x0; with ``steps`` = k > 1, k consecutive DDIM steps t → …→ 0 (timesteps
    t·(k−i)/k) and the last x0 prediction is the target (Table 1f)."""
    from add_bench.diffusion import ddim_step

    schedule = teacher.schedule
    alpha, sigma = schedule.alpha_sigma(t, x_student.ndim)
    x = add_noise(x_student.detach(), eps, alpha, sigma)
    times = [torch.div(t * (steps - i), steps, rounding_mode="floor") for i in range(steps)]
    for i, t_i in enumerate(times):
        pred = teacher(x, t_i, labels, cfg_scale)
        if i + 1 < steps:
            x = ddim_step(pred.x0, pred.eps, *schedule.alpha_sigma(times[i + 1], x.ndim))
    return pred.x0


# ============================================================== progressive distillation (Table 2 baseline)
# Salimans & Ho 2022, Algorithm 2: the student learns to match two DDIM steps of its teacher with one.


def progressive_target(
    z_t: torch.Tensor, z_next: torch.Tensor, alpha_t, sigma_t, alpha_next, sigma_next
) -> torch.Tensor:
    """x̃ = (z̃ − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t): the x0 whose single DDIM step t → s from z_t
    lands on the teacher's two-step result z̃ = z_next (at the last step, s = clean: x̃ = z̃)."""
    ratio = sigma_next / sigma_t
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = α²/σ² ("truncated SNR" weighting of the x-space loss)."""
    return (alpha**2 / sigma.clamp(min=1e-8) ** 2).clamp(min=1.0)


def progressive_loss(x_student: torch.Tensor, x_target: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """E[ max(SNR_t, 1)·||x̂ − x̃||² ] (squared L2 averaged over pixels), target detached."""
    d = (x_student - x_target.detach()).pow(2).flatten(1).mean(1)
    return (truncated_snr_weight(alpha, sigma).flatten() * d).mean()


@torch.no_grad()
def two_teacher_steps(teacher, z_t, labels, t, t_mid, t_next, cfg_scale: float = 1.0) -> torch.Tensor:
    """z̃: two deterministic DDIM steps of the frozen teacher, t → t_mid → t_next (t_next = −1: clean)."""
    from add_bench.diffusion import ddim_step

    schedule = teacher.schedule
    pred = teacher(z_t, t, labels, cfg_scale)
    z_mid = ddim_step(pred.x0, pred.eps, *schedule.alpha_sigma(t_mid, z_t.ndim))
    pred = teacher(z_mid, t_mid, labels, cfg_scale)
    return ddim_step(pred.x0, pred.eps, *schedule.alpha_sigma(t_next, z_t.ndim))

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


def denoising_loss(unet, schedule: Schedule, x0, labels, generator: torch.Generator,
                   cond_drop_prob: float = 0.1, null_label: int = 10, weighting: str = "min_snr",
                   min_snr_gamma: float = 5.0) -> torch.Tensor:
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

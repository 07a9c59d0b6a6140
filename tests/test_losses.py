"""The paper's equations, checked on values that can be computed by hand."""

import pytest
import torch

from add_bench.config import ScheduleConfig
from add_bench.diffusion import Denoiser, Schedule, add_noise, eps_from_x0, sample_ddim
from add_bench.losses import (
    NFSD_T_SWITCH,
    c_exp,
    c_sds,
    discriminator_hinge_loss,
    distillation_loss,
    generator_adversarial_loss,
    nfsd_delta,
    nfsd_target,
    r1_penalty,
    sds_w,
    teacher_target,
)
from add_bench.networks.unets import build_unet


@pytest.fixture(scope="module")
def schedule():  # rescaled to zero terminal SNR: α = 0 at t = 999 for the teacher too
    return Schedule(ScheduleConfig(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True))


@pytest.fixture(scope="module")
def teacher(schedule):
    torch.manual_seed(0)
    return Denoiser(build_unet("tiny").eval().requires_grad_(False), schedule, null_label=10)


def test_generator_hinge_sign_and_value():
    # Eq. 2: −Σ_k mean D_k: two heads with mean logits 0.5 and −2 → −(0.5 − 2) = 1.5
    fake = [torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[-2.0], [-2.0]])]
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.5)


def test_discriminator_hinge_values():
    real = [torch.tensor([[2.0, 0.5, -1.0]])]  # max(0, 1 − r): 0, 0.5, 2 → mean 0.8333
    fake = [torch.tensor([[-3.0, 0.0, 1.0]])]  # max(0, 1 + f): 0, 1, 2 → mean 1
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    # a perfect discriminator (real ≥ 1, fake ≤ −1) has zero hinge loss
    assert discriminator_hinge_loss([torch.tensor([[1.0, 5.0]])], [torch.tensor([[-1.0, -4.0]])]).item() == 0


def test_r1_is_gamma_times_squared_input_gradient_per_head():
    """Tiny linear heads D_k(f) = Σ_tokens w_k·f: ∂D_k/∂f = w_k at every token, so R1 = γ·L·||w_k||² per head."""
    gamma, n, L = 1e-5, 4, 3
    w = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5, 3.0])]
    feats = [torch.randn(n, len(wk), L, requires_grad=True) for wk in w]
    logits = [torch.einsum("c,ncl->nl", wk, f) for wk, f in zip(w, feats)]
    expected = gamma * sum(L * (wk**2).sum() for wk in w)
    assert r1_penalty(logits, feats, gamma).item() == pytest.approx(expected.item(), rel=1e-6)
    # it is a function of the head INPUTS: head parameters are not differentiated, pixels are not involved
    head_param = torch.tensor(2.0, requires_grad=True)
    logits2 = [head_param * torch.einsum("c,ncl->nl", w[0], feats[0])]
    assert r1_penalty(logits2, feats[:1], gamma).item() == pytest.approx(gamma * 4 * L * 5.0, rel=1e-6)


def test_r1_on_a_real_discriminator_head_matches_autograd():
    from add_bench.networks.discriminator import Discriminator

    torch.manual_seed(0)
    disc = Discriminator([8, 8], c_text_dim=4, c_img_dim=0, use_c_text=True, use_c_img=False)
    feats = [torch.randn(8, 8, 5, requires_grad=True) for _ in range(2)]
    c = torch.randn(8, 4)
    logits = disc(feats, c_text=c)
    r1 = r1_penalty(logits, feats, 1.0)
    manual = sum(torch.autograd.grad(l.sum(), f, retain_graph=True)[0].pow(2).sum() / 8 for l, f in zip(logits, feats))
    assert r1.item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distillation_gradient_is_2c_times_residual(reduction):
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    target = torch.randn(3, 1, 4, 4)
    c = torch.tensor([0.3, 1.0, 2.0])
    distillation_loss(x, target, c, reduction).backward()
    d = 16 if reduction == "mean" else 1
    expected = 2 * c.view(-1, 1, 1, 1) * (x.detach() - target) / d / 3  # /3: batch mean
    torch.testing.assert_close(x.grad, expected)


def test_distillation_target_is_detached():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    target = x * 2  # depends on x, but Eq. 4 stops its gradient
    distillation_loss(x, target, torch.ones(2), "sum").backward()
    torch.testing.assert_close(x.grad, 2 * (x.detach() - 2 * x.detach()) / 2)


def test_sds_weighting_gives_the_sds_gradient(schedule, teacher):
    """App. A: with c(t) = α_t/(2σ_t)·w(t), ∇_x̂θ Eq. 4 = w(t)·(ε̂ψ(x_t, t) − ε) (sum reduction, per sample)."""
    g = torch.Generator().manual_seed(0)
    x_student = torch.randn(4, 1, 28, 28, generator=g, requires_grad=True)
    labels, t = torch.tensor([1, 2, 3, 4]), torch.tensor([100, 300, 600, 900])
    eps = torch.randn(4, 1, 28, 28, generator=g)
    alpha, sigma = schedule.alpha_sigma(t)
    x_teacher = teacher_target(teacher, x_student, labels, t, eps)
    distillation_loss(x_student, x_teacher, c_sds(alpha, sigma), "sum").backward()
    eps_hat = eps_from_x0(add_noise(x_student.detach(), eps, alpha, sigma), x_teacher, alpha, sigma)
    sds_grad = sds_w(alpha, sigma) * (eps_hat - eps) / 4  # /4: batch mean
    torch.testing.assert_close(x_student.grad, sds_grad, atol=1e-5, rtol=1e-4)


def test_exp_weighting_is_alpha(schedule):
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0, 500, 999]))
    torch.testing.assert_close(c_exp(alpha, sigma), alpha)
    assert c_sds(alpha, sigma).flatten()[-1] == 0  # α = 0 at t = 999


def test_nfsd_delta_switches_at_t_200():
    cond, unc, neg = torch.full((4, 1, 2, 2), 3.0), torch.full((4, 1, 2, 2), 1.0), torch.full((4, 1, 2, 2), 0.25)
    t = torch.tensor([0, NFSD_T_SWITCH - 1, NFSD_T_SWITCH, 900])
    d = nfsd_delta(cond, unc, neg, t, scale=2.0)
    # δ_C = 2; t < 200: δ_D = ε(∅) = 1 → 1 + 2·2 = 5 ; t ≥ 200: δ_D = 1 − 0.25 → 0.75 + 4 = 4.75
    assert d[:, 0, 0, 0].tolist() == [5.0, 5.0, 4.75, 4.75]


def test_nfsd_target_gives_w_times_delta_gradient(schedule):
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    delta = torch.randn(3, 1, 4, 4)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([150, 400, 800]))
    distillation_loss(x, nfsd_target(x, delta, alpha, sigma), c_sds(alpha, sigma), "sum").backward()
    torch.testing.assert_close(x.grad, sds_w(alpha, sigma) * delta / 3, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_teacher_steps_reproduce_k_ddim_steps(schedule, teacher, k):
    """From t = 999, k teacher steps at 999·(k−i)/k are diffusers' trailing k-step DDIM (checked there)."""
    g = torch.Generator().manual_seed(k)
    x_student, eps = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)
    labels, t = torch.tensor([3, 10]), torch.tensor([999, 999])
    ours = teacher_target(teacher, x_student, labels, t, eps, steps=k)
    # at t = 999 (α = 0) the diffused student sample is exactly ε'
    ref = sample_ddim(teacher, eps, labels, k)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_teacher_target_uses_the_diffused_student_sample(schedule):
    """The teacher sees α_t·sg(x̂θ) + σ_t·ε' (not a noised real image), at the drawn t."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            seen["x"], seen["t"] = x.clone(), t.clone()
            return type("O", (), {"sample": torch.zeros_like(x)})()

    d = Denoiser(Spy(), schedule, 10)
    x_student = torch.randn(2, 1, 4, 4, requires_grad=True)
    eps, t = torch.randn(2, 1, 4, 4), torch.tensor([250, 700])
    teacher_target(d, x_student, torch.tensor([0, 1]), t, eps)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(seen["x"], alpha * x_student.detach() + sigma * eps)
    assert seen["t"].tolist() == [250, 700] and not seen["x"].requires_grad

import pytest
import torch

from add_bench.config import ScheduleConfig
from add_bench.diffusion import (
    Denoiser,
    Schedule,
    add_noise,
    ddim_step,
    eps_from_v,
    eps_from_x0,
    make_scheduler,
    sample_add,
    sample_ddim,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from add_bench.errors import ConfigError
from add_bench.networks.unets import build_unet

# the whole-schedule rescale to zero terminal SNR (the option the shipped teachers before SD2.1's
# schedule used): α = 0 at t = 999 for the teacher and for diffusers' samplers alike
ZERO_SNR = ScheduleConfig(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)


@pytest.fixture(scope="module")
def schedule():
    return Schedule(ZERO_SNR)


def test_default_schedule_is_sd21s_and_the_student_top_step_is_pure_noise():
    """Default: SD2.1's scaled-linear betas (ᾱ_999 ≈ 0.0047, trained at t = 999). The student's schedule
    (force_zero_terminal_snr) differs from it at t = 999 only, where α = 0 and σ = 1."""
    teacher = Schedule(ScheduleConfig())
    student = Schedule(ScheduleConfig(force_zero_terminal_snr=True))
    assert abs(teacher.alphas_cumprod[999].item() - 0.0047) < 1e-4
    assert abs(teacher.alphas_cumprod[0].item() - (1 - 0.00085)) < 1e-7  # float32 betas in diffusers
    torch.testing.assert_close(student.alphas_cumprod[:999], teacher.alphas_cumprod[:999], rtol=0, atol=0)
    alpha, sigma = student.alpha_sigma(999, ndim=0)
    assert alpha == 0 and sigma == 1
    # diffusers' own scheduler on the default config has the same betas (the teacher's DDIM sampler)
    torch.testing.assert_close(make_scheduler(ScheduleConfig()).alphas_cumprod.double(), teacher.alphas_cumprod)


@pytest.fixture(scope="module")
def denoiser(schedule):
    torch.manual_seed(0)
    return Denoiser(build_unet("tiny").eval(), schedule, null_label=10)


def test_zero_terminal_snr(schedule):
    abar = schedule.alphas_cumprod
    assert abar[999] == 0.0  # exactly zero at t = 999
    assert abar[0] > 0.999 and torch.all(abar[1:] < abar[:-1])  # monotone
    alpha, sigma = schedule.alpha_sigma(999, ndim=0)
    assert alpha == 0 and sigma == 1


def test_trailing_timesteps(schedule):
    assert schedule.timesteps(4) == [999, 749, 499, 249]
    assert schedule.timesteps(1) == [999]
    assert schedule.timesteps(2) == [999, 499]
    assert len(schedule.timesteps(50)) == 50 and schedule.timesteps(50)[-1] == 19


@pytest.mark.parametrize("bad", [0, -1, -50])
def test_step_count_must_be_positive(schedule, denoiser, bad):
    with pytest.raises(ConfigError, match=f"steps={bad}: must be a positive integer"):
        schedule.timesteps(bad)
    with pytest.raises(ConfigError, match="steps"):
        sample_ddim(denoiser, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), bad)


def test_conversions_roundtrip(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 998])
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = add_noise(x0, eps, alpha, sigma)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps, atol=1e-3, rtol=1e-3)
    # α² + σ² = 1 (variance preserving)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))


def test_v_prediction_at_terminal_step(schedule):
    """At t = 999 (α = 0) x_t is pure noise and x0 = −v: v-prediction stays defined."""
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([999, 999]))
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(add_noise(x0, eps, alpha, sigma), v, alpha, sigma), x0)


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_ddim_step_matches_diffusers_step_by_step(schedule, denoiser, steps):
    """Our ddim_step (x_{t'} = α_{t'} x̂0 + σ_{t'} ε̂) equals DDIMScheduler.step at every step."""
    sched = make_scheduler(schedule.cfg)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(3, 1, 28, 28, generator=g)
    labels = torch.tensor([0, 5, 10])
    for t in sched.timesteps:
        out = denoiser.model_output(x, t, labels)
        ref = sched.step(out, t, x, eta=0.0).prev_sample
        pred = denoiser.to_prediction(x, t, out)
        a_next, s_next = schedule.alpha_sigma(schedule.previous(int(t), steps))
        ours = ddim_step(pred.x0, pred.eps, a_next, s_next)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
        x = ref
    torch.testing.assert_close(
        sample_ddim(denoiser, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(steps)), labels, steps),
        x,
    )


def test_cfg_combines_cond_and_uncond(schedule, denoiser):
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor(500), torch.tensor([3, 4])
    cond = denoiser.model_output(x, t, y)
    unc = denoiser.model_output(x, t, torch.tensor([10, 10]))
    torch.testing.assert_close(
        denoiser.model_output(x, t, y, cfg_scale=3.0), unc + 3.0 * (cond - unc), atol=1e-5, rtol=1e-5
    )


def test_add_sampler_renoises_at_student_timesteps(schedule):
    """The ADD sampler evaluates the network at exactly 999, 749, 499, 249 and re-noises with fresh noise."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            seen.append(t.tolist())
            return type("O", (), {"sample": torch.zeros_like(x)})()  # v = 0 → x̂0 = α x_t

    d = Denoiser(Recorder(), schedule, 10)
    out = sample_add(d, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), 4, generator=torch.Generator().manual_seed(0))
    assert [s[0] for s in seen] == [999, 749, 499, 249]
    assert out.shape == (2, 1, 4, 4)
    # with v = 0: x0(999) = 0, then x_749 = σ·ε', x0 = α·x_749 …: the result is non-zero (fresh noise entered)
    assert out.abs().sum() > 0


class GaussianData(torch.nn.Module):
    """The exact denoiser of data x0 ~ N(μ, s²) per pixel: E[x0 | x_t] = μ + α s²/(α² s² + σ²)·(x_t − α μ),
    returned as the v-prediction a trained UNet would give. Its probability-flow ODE maps the noise z at
    t = 999 (α = 0) to μ + s·z, so a sampler's error is measurable exactly."""

    def __init__(self, schedule: Schedule, mu: float, s: float):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x_t, t, class_labels=None):
        alpha, sigma = self.schedule.alpha_sigma(t, x_t.ndim)
        x0 = self.mu + alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2) * (x_t - alpha * self.mu)
        eps = (x_t - alpha * x0) / sigma
        return type("Out", (), {"sample": v_from_x0_eps(x0, eps, alpha, sigma)})()


@pytest.mark.parametrize("mu, s", [(0.3, 0.5), (0.0, 1.0)])
def test_samplers_solve_the_probability_flow_ode_of_gaussian_data(schedule, mu, s):
    from add_bench.diffusion import get_sampler

    den = Denoiser(GaussianData(schedule, mu, s), schedule, null_label=10)
    z = torch.linspace(-3, 3, 61).view(-1, 1, 1, 1)
    labels = torch.zeros(61, dtype=torch.long)

    def error(sampler, steps):
        return (get_sampler(sampler)(den, z, labels, steps) - (mu + s * z)).abs().max().item()

    ddim = {n: error("ddim", n) for n in (4, 8, 25, 100)}
    dpm = {n: error("dpm_solver", n) for n in (4, 8, 25, 100)}
    assert ddim[100] < ddim[25] < ddim[8] < ddim[4] and ddim[100] < 0.05, ddim  # first order: error ∝ 1/steps
    assert ddim[25] / ddim[100] > 3, ddim
    assert dpm[25] < 0.01 and dpm[100] < 2e-3, dpm  # second order: far closer at the same step count
    assert dpm[25] < 0.1 * ddim[25] and dpm[8] < ddim[8], (dpm, ddim)


def test_dpm_solver_uses_the_teachers_schedule(schedule):
    from add_bench.diffusion import make_dpm_solver

    sched = make_dpm_solver(schedule.cfg)
    sched.set_timesteps(4)
    assert [int(t) for t in sched.timesteps] == schedule.timesteps(4) == [999, 749, 499, 249]
    # same betas; only ᾱ at t = 999 differs (2⁻²⁴ instead of 0: DPM-Solver needs a finite log-SNR)
    torch.testing.assert_close(sched.alphas_cumprod[:-1].double(), schedule.alphas_cumprod[:-1], atol=1e-6, rtol=1e-5)
    assert sched.alphas_cumprod[-1] == 2**-24 and schedule.alphas_cumprod[-1] == 0


def test_add_sampler_uses_the_students_timesteps(schedule):
    from add_bench.diffusion import add_timesteps

    assert add_timesteps(schedule, 4, [999, 749, 499, 249]) == [999, 749, 499, 249]  # the default: trailing
    assert add_timesteps(schedule, 2, None) == [999, 499]
    top = [960, 700, 400, 100]  # a T_student whose top timestep keeps a little signal (α ≈ 0.06)
    assert add_timesteps(schedule, 4, top) == [960, 700, 400, 100]
    assert add_timesteps(schedule, 1, top) == [960] and add_timesteps(schedule, 2, top) == [960, 499]

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            seen.append(int(t[0]))
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    den = Denoiser(Recorder(), schedule, null_label=10, student_timesteps=top)
    sample_add(den, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), 4, generator=torch.Generator().manual_seed(0))
    assert seen == top

"""The diffusion core: schedule, x0/ε/v conversions, a denoiser wrapper and samplers.

Built on diffusers' DDIMScheduler (zero terminal SNR, v-prediction, trailing spacing); DPM-Solver++
through diffusers' DPMSolverMultistepScheduler on the same betas. Notation as
in the paper: x_t = α_t·x0 + σ_t·ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), v = α_t·ε − σ_t·x0.

Samplers share one signature (k-diffusion style) and are chosen by name from ``SAMPLERS``:
    sampler(denoiser, noise, labels, steps, cfg_scale=1.0, generator=None) -> x0 images
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from add_bench.config import ScheduleConfig, check_positive, choose


# ------------------------------------------------------------------------------------- schedule
def schedule_kwargs(cfg: ScheduleConfig) -> dict:
    """The noise schedule as diffusers scheduler arguments (the same betas for every sampler;
    ``force_zero_terminal_snr`` is applied by :class:`Schedule`, diffusers has no such argument)."""
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
    )


def make_scheduler(cfg: ScheduleConfig) -> DDIMScheduler:
    return DDIMScheduler(**schedule_kwargs(cfg), clip_sample=False, set_alpha_to_one=True)


def make_dpm_solver(cfg: ScheduleConfig, order: int = 2) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (multistep, data prediction; Lu et al. 2022) on the same betas and spacing. With zero
    terminal SNR diffusers sets ᾱ at t = T−1 to 2⁻²⁴ (its log-SNR must be finite); sampling ends at σ = 0."""
    return DPMSolverMultistepScheduler(
        **schedule_kwargs(cfg),
        algorithm_type="dpmsolver++",
        solver_order=order,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


class Schedule:
    """α_t, σ_t lookup for integer timesteps, plus the scheduler's timestep spacing."""

    def __init__(self, cfg: ScheduleConfig | None = None):
        self.cfg = cfg or ScheduleConfig()
        self.scheduler = make_scheduler(self.cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        if self.cfg.force_zero_terminal_snr:
            self.alphas_cumprod[-1] = 0.0  # x_{T−1} is pure noise; every other ᾱ_t is the schedule's
        self.num_train_timesteps = self.cfg.num_train_timesteps
        self.prediction_type = self.cfg.prediction_type

    def alpha_sigma(self, t: torch.Tensor | int, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t and σ_t, shaped to broadcast against a batch of ``ndim``-dimensional images.

        t = -1 means "the end of sampling": α = 1, σ = 0 (diffusers' final_alpha_cumprod). The lookup
        runs in float64 on the CPU; the result lives on t's device.
        """
        t = torch.as_tensor(t)
        device, t = t.device, t.long().cpu()
        abar = torch.where(t < 0, torch.ones((), dtype=torch.float64), self.alphas_cumprod[t.clamp(min=0)])
        shape = (-1,) + (1,) * (ndim - 1) if t.ndim else ()
        return abar.sqrt().float().reshape(shape).to(device), (1 - abar).sqrt().float().reshape(shape).to(device)

    def timesteps(self, steps: int) -> list[int]:
        """The sampler's timesteps for a step count: trailing spacing, 4 → [999, 749, 499, 249]."""
        check_positive(steps, "steps")
        if steps > self.num_train_timesteps:
            from add_bench.errors import ConfigError

            raise ConfigError(f"steps={steps}: must be at most num_train_timesteps={self.num_train_timesteps}")
        sched = make_scheduler(self.cfg)
        sched.set_timesteps(steps)
        return [int(t) for t in sched.timesteps]

    def previous(self, t: int, steps: int) -> int:
        """The timestep DDIM goes to from t with ``steps`` total steps (−1 = clean image)."""
        return t - self.num_train_timesteps // steps


def schedule_from_card(card: dict) -> Schedule:
    """The schedule a weights card records (keys it leaves out take :class:`ScheduleConfig`'s defaults)."""
    from omegaconf import OmegaConf

    return Schedule(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), card["schedule"])))


# ----------------------------------------------------------------------------------- conversions
def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) drawn from a CPU generator and moved to ``like``'s device and dtype: the same numbers on
    every device, so a seed means one run whatever the hardware (and CPU runs are unchanged). One row per
    sample: in a training step over several processes, this process's rows of the global batch's draw
    (distributed.rows)."""
    from add_bench.distributed import rows

    noise = rows(lambda m: torch.randn((m, *shape[1:]), generator=generator), shape[0])
    return noise.to(like.device, like.dtype)


def add_noise(x0, eps, alpha, sigma):
    """x_t = α_t·x0 + σ_t·ε (forward process)."""
    return alpha * x0 + sigma * eps


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
    return sigma * x_t + alpha * v


def eps_from_x0(x_t, x0, alpha, sigma):
    """ε = (x_t − α·x0)/σ; undefined at σ = 0."""
    return (x_t - alpha * x0) / sigma


def x0_from_eps(x_t, eps, alpha, sigma):
    """x0 = (x_t − σ·ε)/α; undefined at α = 0 (zero terminal SNR): use v- or x-prediction there."""
    return (x_t - sigma * eps) / alpha


def ddim_step(x0_hat, eps_hat, alpha_next, sigma_next):
    """Deterministic DDIM (η = 0): x_{t'} = α_{t'}·x̂0 + σ_{t'}·ε̂."""
    return alpha_next * x0_hat + sigma_next * eps_hat


# ------------------------------------------------------------------------------------- denoiser
@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor


class Denoiser:
    """Wraps a class-conditional diffusers UNet: (x_t, t, labels) → x̂0 and ε̂, with optional CFG.

    ``null_label`` is the unconditional class used for classifier-free guidance. Other conditionings
    (prompt embeddings: ``add_bench.networks.sd.TextDenoiser``) override ``raw`` and ``null_condition``.
    """

    def __init__(
        self, unet: torch.nn.Module, schedule: Schedule, null_label: int, student_timesteps: list[int] | None = None
    ):
        self.unet, self.schedule, self.null_label = unet, schedule, null_label
        self.student_timesteps = student_timesteps  # an ADD student's T_student (the ADD sampler's timesteps)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=labels).sample

    def to(self, device: torch.device) -> Denoiser:
        self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def null_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """∅ for a batch of conditions: the null class."""
        return torch.full_like(labels, self.null_label)

    def model_output(self, x_t, t, labels, cfg_scale: float = 1.0, uncond_labels=None) -> torch.Tensor:
        """The network's output (v, ε or x0 by prediction_type), guided when cfg_scale ≠ 1.

        guided = out(∅) + s·(out(c) − out(∅)); ``uncond_labels`` replaces ∅ (e.g. a negative prompt).
        """
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        if cfg_scale == 1.0:
            return self.raw(x_t, t, labels)
        uncond = self.null_condition(labels) if uncond_labels is None else uncond_labels
        out = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, uncond]))
        cond, unc = out.chunk(2)
        return unc + cfg_scale * (cond - unc)

    def to_prediction(self, x_t, t, out) -> Prediction:
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]), x_t.ndim)
        kind = self.schedule.prediction_type
        if kind == "v_prediction":
            return Prediction(x0_from_v(x_t, out, alpha, sigma), eps_from_v(x_t, out, alpha, sigma))
        if kind == "epsilon":
            return Prediction(x0_from_eps(x_t, out, alpha, sigma), out)
        return Prediction(out, eps_from_x0(x_t, out, alpha, sigma))

    def __call__(self, x_t, t, labels, cfg_scale: float = 1.0, uncond_labels=None) -> Prediction:
        return self.to_prediction(x_t, t, self.model_output(x_t, t, labels, cfg_scale, uncond_labels))


# ------------------------------------------------------------------------------------- samplers
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, noise, labels, steps: int, cfg_scale: float = 1.0, generator=None):
    """Deterministic DDIM through diffusers' DDIMScheduler (η = 0), ``steps`` network evaluations."""
    check_positive(steps, "steps")
    sched = make_scheduler(denoiser.schedule.cfg)
    sched.set_timesteps(steps)
    x = noise
    for t in sched.timesteps:
        out = denoiser.model_output(x, t, labels, cfg_scale)
        x = sched.step(out, t, x, eta=0.0).prev_sample
    return x


def add_timesteps(schedule: Schedule, steps: int, student_timesteps: list[int] | None = None) -> list[int]:
    """The ADD sampler's timesteps: T_student itself when ``steps`` = |T_student|, else the trailing ones
    (4 → 999, 749, 499, 249) with none above the student's top timestep max(T_student)."""
    taus = schedule.timesteps(steps)
    if not student_timesteps:
        return taus
    if steps == len(student_timesteps):
        return sorted(student_timesteps, reverse=True)
    return [min(t, max(student_timesteps)) for t in taus]


@torch.no_grad()
def sample_add(denoiser: Denoiser, noise, labels, steps: int, cfg_scale: float = 1.0, generator=None):
    """ADD multi-step sampling: predict x0 at the top student timestep τ_N, re-noise to the next τ with
    fresh noise, repeat (:func:`add_timesteps`; T_student = 999, 749, 499, 249 → the trailing ones)."""
    taus = add_timesteps(denoiser.schedule, steps, denoiser.student_timesteps)
    return sample_add_chain([(denoiser, cfg_scale)] * len(taus), noise, labels, taus, generator)


@torch.no_grad()
def sample_add_chain(models: list[tuple[Denoiser, float]], noise, labels, taus: list[int], generator=None):
    """ADD's sampling chain with a (denoiser, CFG scale) per timestep: ``models[i]`` predicts x0 at ``taus[i]``,
    which is re-noised with fresh noise to ``taus[i + 1]`` on the next model's schedule (a student and its
    teacher share every schedule value below the student's top timestep)."""
    x = noise
    for i, (tau, (denoiser, cfg_scale)) in enumerate(zip(taus, models, strict=True)):
        x0 = denoiser(x, tau, labels, cfg_scale).x0
        if i + 1 < len(taus):
            alpha, sigma = models[i + 1][0].schedule.alpha_sigma(taus[i + 1])
            x = add_noise(x0, randn(x0.shape, generator, x0), alpha, sigma)
    return x0


@torch.no_grad()
def sample_dpm_solver(denoiser: Denoiser, noise, labels, steps: int, cfg_scale: float = 1.0, generator=None):
    """DPM-Solver++(2M) through diffusers' DPMSolverMultistepScheduler, ``steps`` network evaluations
    (the paper's Table 2 baseline at 25 and 8 steps)."""
    check_positive(steps, "steps")
    sched = make_dpm_solver(denoiser.schedule.cfg)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = denoiser.model_output(x, t, labels, cfg_scale)
        x = sched.step(out, t, x).prev_sample
    return x


Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {"ddim": sample_ddim, "dpm_solver": sample_dpm_solver, "add": sample_add}


def get_sampler(name: str) -> Sampler:
    return choose(SAMPLERS, name, "sampler")


@torch.no_grad()
def sample_grid(
    denoiser: Denoiser, sampler: Sampler, steps: int, shape: tuple[int, ...], classes: int, per_class: int = 4
) -> torch.Tensor:
    """``per_class`` samples of each of ``classes`` classes (``sampler`` in ``steps`` steps, unguided) from
    fixed noise, so that grids at different checkpoints compare; one row per class, as a
    (C, classes·H, per_class·W) image in [0, 1] (a TensorBoard image). Draws nothing from the global RNG."""
    device = denoiser.device
    labels = torch.arange(classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((len(labels), *shape), generator=gen).to(device)
    x = sampler(denoiser, noise, labels, steps, generator=gen).clamp(-1, 1).add(1).div(2).float().cpu()
    _, c, h, w = x.shape
    return x.reshape(classes, per_class, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, classes * h, per_class * w)

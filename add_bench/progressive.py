"""Progressive distillation (Salimans & Ho 2022), guided as in Meng et al. 2023: the Table 2 baseline.

One run in a work folder, in stages (``progressive.*`` in the config):

  stage 0 (guided, "CFG-aware distillation"): the student, a copy of the teacher, learns the teacher's
      classifier-free-guided x0 prediction (``teacher.cfg_scale``) in one evaluation, at the timesteps of
      ``start_steps``-step DDIM → ``students/<start_steps>steps``.
  halvings: the student (initialised from its teacher, the previous stage's student) learns to match
      two DDIM steps of its teacher with one (``losses.two_teacher_steps``, ``losses.progressive_target``,
      ``losses.progressive_loss``) → ``students/<N/2>steps``, down to ``students/1steps``.

The student is always a copy of ``teacher.network`` (the method's definition; ``student.*`` is ADD's).
Each stage exports its student's EMA weights (a weights folder ``add_bench.evaluate`` samples with
DDIM at that step count); the next stage's teacher is read back from that folder, so a run resumes
exactly from ``checkpoint.pt`` at any step, inside a stage or at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from add_bench import checkpoint
from add_bench.config import TrainConfig, check_positive
from add_bench.data import NUM_CLASSES
from add_bench.diffusion import Denoiser, add_noise, randn, sample_ddim, sample_grid
from add_bench.errors import ConfigError
from add_bench.loop import Run, drive, set_threads
from add_bench.losses import progressive_loss, progressive_target, two_teacher_steps
from add_bench.networks.unets import build_unet, load_into, read_card, save_weights
from add_bench.provenance import provenance, resolve_weights


@dataclass(frozen=True)
class Stage:
    name: str  # guided | halving
    student_steps: int  # DDIM steps the stage's student is sampled with
    start: int  # first global iteration of the stage
    iterations: int

    @property
    def end(self) -> int:
        return self.start + self.iterations


def stages(cfg: TrainConfig) -> list[Stage]:
    """The stage plan: [guided at start_steps], then halvings start_steps/2, …, 1."""
    p = cfg.progressive
    check_positive(p.start_steps, "progressive.start_steps")
    check_positive(p.steps_per_stage, "progressive.steps_per_stage")
    if p.start_steps & (p.start_steps - 1):
        raise ConfigError(f"progressive.start_steps={p.start_steps}: must be a power of two (each stage halves it)")
    if p.guided_steps < 0:
        raise ConfigError(f"progressive.guided_steps={p.guided_steps}: must be ≥ 0 (0 = no guided stage)")
    out, at = [], 0
    if p.guided_steps > 0:
        out.append(Stage("guided", p.start_steps, 0, p.guided_steps))
        at = p.guided_steps
    n = p.start_steps
    while n > 1:
        n //= 2
        out.append(Stage("halving", n, at, p.steps_per_stage))
        at += p.steps_per_stage
    if not out:
        raise ConfigError("progressive.start_steps=1 and guided_steps=0: nothing to distil")
    return out


def stage_steps(cfg: TrainConfig) -> list[int]:
    """The step counts with a student at the end of a run (what ``eval_steps`` may ask for)."""
    return [s.student_steps for s in stages(cfg)]


def student_folder(workdir: Path, steps: int) -> Path:
    return Path(workdir) / "students" / f"{steps}steps"


def validate(cfg: TrainConfig) -> None:
    check_positive(cfg.batch_size, "batch_size")
    if (resolve_weights(cfg.teacher.network) / "model_index.json").is_file():  # a diffusers pipeline folder
        raise ConfigError(
            f"method=progressive, teacher.network={cfg.teacher.network}: progressive distillation runs on "
            "class-conditional teachers (the embedded benchmark) only; a Stable Diffusion teacher is not supported yet"
        )
    available = stage_steps(cfg)
    bad = [s for s in cfg.eval_steps if s not in available]
    if bad:
        raise ConfigError(
            f"eval_steps={list(cfg.eval_steps)}: method=progressive has students for "
            f"{sorted(available)} steps (progressive.start_steps={cfg.progressive.start_steps}, "
            f"guided_steps={cfg.progressive.guided_steps}); {bad} is not among them"
        )


def stage_timesteps(schedule, stage: Stage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_mid, t_next) per student step: the student goes t → t_next in one DDIM step, its teacher in
    two through t_mid (the teacher's grid has twice the steps and contains the student's). Guided stage:
    t_mid = t_next = t (one teacher evaluation at the student's own timesteps)."""
    if stage.name == "guided":
        t = torch.tensor(schedule.timesteps(stage.student_steps))
        return t, t, t
    coarse, fine = schedule.timesteps(stage.student_steps), schedule.timesteps(2 * stage.student_steps)
    if fine[::2] != coarse:
        raise ConfigError(
            f"timestep spacing {schedule.cfg.timestep_spacing!r}: the {2 * stage.student_steps}-step grid "
            f"does not contain the {stage.student_steps}-step grid; progressive distillation needs nested grids"
        )
    nxt = fine[2::2] + [-1]
    return torch.tensor(coarse), torch.tensor(fine[1::2]), torch.tensor(nxt)


def progressive_step(
    student: Denoiser, teacher: Denoiser, stage: Stage, grid, x0, labels, gen, cfg_scale: float
) -> torch.Tensor:
    """The stage's loss on one batch: z_t from real x0 at a student timestep, the teacher's target x̃."""
    t_all, mid_all, next_all = grid
    i = torch.randint(0, len(t_all), (x0.shape[0],), generator=gen)
    t, t_mid, t_next = t_all[i], mid_all[i], next_all[i]
    alpha, sigma = student.schedule.alpha_sigma(t, x0.ndim)
    z_t = add_noise(x0, randn(x0.shape, gen, x0), alpha, sigma)
    if stage.name == "guided":
        with torch.no_grad():
            target = teacher(z_t, t, labels, cfg_scale).x0
    else:
        z_next = two_teacher_steps(teacher, z_t, labels, t, t_mid, t_next, cfg_scale)
        target = progressive_target(z_t, z_next, alpha, sigma, *student.schedule.alpha_sigma(t_next, x0.ndim))
    return progressive_loss(student(z_t, t, labels).x0, target, alpha, sigma)


def lr_in_stage(step: int, stage: Stage, base: float, warmup: int) -> float:
    """Linear warm-up, then linear decay to 0 at the stage's end."""
    k = step - stage.start
    if k < warmup:
        return base * (k + 1) / warmup
    return base * max(0.0, 1 - (k - warmup) / max(1, stage.iterations - warmup))


def train_progressive(
    cfg: TrainConfig, workdir: Path, budget_minutes: float = 0, progress: bool = True
) -> dict[int, Path] | None:
    """Train (or resume) every stage in ``workdir``; return {student steps: weights folder}, or None when
    ``budget_minutes`` ran out first (a checkpoint is written; call again to resume)."""

    from add_bench.diffusion import schedule_from_card
    from add_bench.train import FashionMnistBatches, check_finite, clip

    validate(cfg)
    set_threads(cfg.threads)
    plan = stages(cfg)
    folder = resolve_weights(cfg.teacher.network)
    card = read_card(folder)
    schedule = schedule_from_card(card)
    base_teacher = frozen_denoiser(folder, card, schedule)
    unet = load_into(build_unet(card["unet"]), folder).train()
    student = Denoiser(unet, schedule, NUM_CLASSES)
    ema = checkpoint.EMA(unet, cfg.optim.ema_decay)
    p = cfg.progressive

    def adam() -> torch.optim.Adam:
        return torch.optim.Adam(unet.parameters(), lr=p.lr, betas=tuple(float(b) for b in p.betas))

    gen = torch.Generator().manual_seed(cfg.seed)
    objects = {"student": unet, "ema": ema, "opt_student": adam()}
    run = Run(
        workdir,
        objects,
        gen,
        plan[-1].end,
        cfg.ckpt_every,
        budget_minutes,
        tensorboard=cfg.tensorboard,
        keep_checkpoints=cfg.keep_checkpoints,
    )
    data = FashionMnistBatches(cfg)
    state: dict = {"stage": None}  # the current stage, its teacher, grid, CFG scale and optimiser

    def step_fn(step: int) -> dict:
        stage = next(s for s in plan if s.start <= step < s.end)
        if stage is not state["stage"]:  # entering a stage (or resuming inside one): its teacher, fresh optimiser
            index = plan.index(stage)
            previous = plan[index - 1] if index else None
            teacher = base_teacher if previous is None else load_stage_teacher(workdir, previous, schedule, card)
            if step == stage.start and previous is not None:  # the student starts as its teacher
                unet.load_state_dict(teacher.unet.state_dict())
                ema.module.load_state_dict(teacher.unet.state_dict())
                objects["opt_student"] = adam()
            # the first teacher is guided (teacher.cfg_scale); later teachers are students that learnt the guidance
            state.update(
                stage=stage,
                teacher=teacher,
                grid=stage_timesteps(schedule, stage),
                cfg_scale=cfg.teacher.cfg_scale if previous is None else 1.0,
            )
        opt = objects["opt_student"]
        for g in opt.param_groups:
            g["lr"] = lr_in_stage(step, stage, p.lr, p.warmup_steps)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0, labels, _ = data.batch(idx, gen)
        loss = progressive_step(student, state["teacher"], stage, state["grid"], x0, labels, gen, state["cfg_scale"])
        check_finite(loss, "progressive distillation loss", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip(unet, cfg.optim.student_grad_clip)
        opt.step()
        ema.update(unet, step - stage.start)
        return {
            "stage": stage.name,
            "student_steps": stage.student_steps,
            "loss": loss.item(),
            "grad_norm_student": grad_norm,
            "lr_student": opt.param_groups[0]["lr"],
        }

    def stage_end(completed: int) -> bool:
        return any(completed == s.end for s in plan)

    def after_step(completed: int) -> None:
        stage = state["stage"]
        if completed == stage.end:  # before the checkpoint: a run resumed at the boundary finds it
            export(ema.module, card, cfg, student_folder(workdir, stage.student_steps), stage, run)
        if run.checkpoint_due(completed) or completed == stage.end:  # the stage's EMA student at its step count
            n, shape = stage.student_steps, tuple(data.x.shape[1:])
            ema_student = Denoiser(ema.module, schedule, NUM_CLASSES)
            run.log_samples(
                f"samples/ema_ddim_{n}_step",
                lambda: sample_grid(ema_student, sample_ddim, n, shape, NUM_CLASSES),
                completed,
            )

    finished = drive(
        run,
        step_fn,
        "progressive",
        cfg.log_every,
        progress=progress,
        postfix=("stage", "loss"),
        log_at=stage_end,
        after_step=after_step,
    )
    if not finished:
        return None
    return {s.student_steps: student_folder(workdir, s.student_steps) for s in plan}


def frozen_denoiser(folder: Path, card: dict, schedule) -> Denoiser:
    """A teacher: the weights in ``folder`` (architecture from ``card``), eval mode, no gradients."""
    return Denoiser(load_into(build_unet(card["unet"]), folder).eval().requires_grad_(False), schedule, NUM_CLASSES)


def load_stage_teacher(workdir: Path, stage: Stage, schedule, card: dict) -> Denoiser:
    """The next stage's teacher: the student ``stage`` exported."""
    return frozen_denoiser(student_folder(workdir, stage.student_steps), card, schedule)


def export(module: torch.nn.Module, teacher_card: dict, cfg: TrainConfig, out: Path, stage: Stage, run: Run) -> None:
    card = {
        "kind": "student",
        "method": "progressive",
        "stage": stage.name,
        "sampling_steps": stage.student_steps,
        "name": f"{Path(run.workdir).name}/{out.name}",
        "unet": teacher_card["unet"],
        "schedule": teacher_card["schedule"],
        "null_label": NUM_CLASSES,
        "weights": "EMA, fp32",
        "steps": run.step,
        "train_wall_time_s": round(run.wall_time_s, 1),
        "provenance": provenance(cfg, cfg.seed, run.wall_time_s, command="progressive distillation"),
    }
    save_weights(out, module, card, fp16=False)

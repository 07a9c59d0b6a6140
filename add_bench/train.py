"""Train one ADD cell: the student x̂θ against a frozen teacher x̂ψ and a discriminator on a frozen
feature network (paper section 1).

    python -m add_bench.train [config.yaml] [key=value ...] [--workdir runs/<name>] [--evaluate]
    torchrun --nproc_per_node=N -m add_bench.train ...     (data parallel: one process per GPU)

Each step: draw x0, s ∈ T_student, ε; x_s = α_s·x0 + σ_s·ε; the student predicts x̂θ(x_s, s).
  generator:      L = L_adv^G (Eq. 2) + λ·L_distill (Eq. 4)       → student update, EMA
  discriminator:  L_adv^D (Eq. 3, hinge + γ·R1 on head inputs)      → heads update
The work folder keeps checkpoint.pt (exact resume), log.jsonl (every loss term, the discriminator's
real/fake logits, the latest lazy R1 term, the student's gradient norm from each term of Eq. 1) and, when
done, ``student/`` (EMA weights + card.json) for ``add_bench.evaluate`` and training.png
(``add_bench.plots``).

Cluster scale: when ``teacher.network`` is a Stable Diffusion folder (``add_bench.networks.sd``), x0 is
the VAE latent of a COCO image (``coco``), the condition is the caption's prompt embedding, the feature
network and c_img see decoded pixels, c_text is an open_clip text embedding of the caption, and the
distillation loss is taken on decoded pixels (``loss.space``, as the paper); ``student/`` is then a
Stable Diffusion folder with the student's UNet. A student and a teacher from different folders (Table
1e: SD2.1 student, SDXL teacher) meet in pixel space: the teacher encodes the student's decoded sample
with its own VAE, is conditioned by its own text encoder(s), and its x0 prediction is decoded again.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from add_bench import checkpoint, distributed, execution
from add_bench.augment import apply_augment, draw_augment, slice_draws
from add_bench.config import TrainConfig, add_cfg_option, check_positive, choose, load, print_job, to_dict
from add_bench.data import NUM_CLASSES, load_split
from add_bench.diffusion import Denoiser, Schedule, add_noise, randn, sample_add, sample_grid, schedule_from_card
from add_bench.errors import ConfigError, TrainingDiverged, command_line
from add_bench.loop import LR_SCHEDULES, Run, drive, lr_at, set_threads
from add_bench.losses import (
    C_WEIGHTINGS,
    DENOISING_WEIGHTINGS,
    denoising_anchor,
    discriminator_hinge_loss,
    distillation_loss,
    generator_adversarial_loss,
    nfsd_delta,
    nfsd_target,
    noise_anchored_regression,
    r1_penalty,
    teacher_target,
)
from add_bench.networks.discriminator import Discriminator
from add_bench.networks.featnets import build_feature_network, prompt_embeddings
from add_bench.networks.unets import build_unet, load_into, read_card, save_weights
from add_bench.provenance import REPO_ROOT, provenance, resolve_weights

TEACHER_SAMPLING = ("uniform", "student")
NFSD_NEGATIVES = ("other_class", "null")


# ------------------------------------------------------------------------------------ networks
@dataclass
class Networks:
    student: Denoiser  # trainable x̂θ (its .unet is optimised)
    ema: checkpoint.EMA  # EMA of the student's weights: what is evaluated
    teacher: Denoiser  # frozen x̂ψ
    feature_network: torch.nn.Module  # frozen F
    c_img_network: torch.nn.Module | None  # frozen; CLS embedding of x0 = c_img
    c_text: torch.Tensor | None  # embedded: (num_classes, E) fixed prompt embeddings
    discriminator: Discriminator  # trainable heads D_φ,k
    sd: Any = None  # latent models: the student's StableDiffusion (VAE, text encoder); None = pixel space
    text_encoder: Any = None  # latent models: captions → c_text (an open_clip text tower)
    teacher_sd: Any = None  # a teacher from another folder (own VAE, text encoders); None = shares ``sd``
    pairs: Any = None  # loss.regression_weight > 0: the teacher's (ε, c) → sample pairs (TeacherPairs)
    data_shape: tuple[int, ...] = (1, 28, 28)  # one x0 (pixel models: the embedded images)
    vae_chunk: int = 0  # VAE passes at most this many samples at a time (``vae_decode_chunk``; 0 = all)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's space → images in [−1, 1]: the identity, or the VAE decoder (differentiable)."""
        return x if self.sd is None else self.sd.to_pixels(x, self.vae_chunk)

    def to(self, device: torch.device) -> Networks:
        """Every network (trainable and frozen) and fixed tensor on ``device``."""
        self.student.to(device)
        self.teacher.to(device)
        for m in (self.ema.module, self.feature_network, self.c_img_network, self.discriminator, self.text_encoder):
            if m is not None:
                m.to(device)
        for sd in (self.sd, self.teacher_sd):
            if sd is not None:
                sd.to(device)
        if self.c_text is not None:
            self.c_text = self.c_text.to(device)
        return self


def validate(cfg: TrainConfig) -> None:
    check_positive(cfg.steps, "steps")
    check_positive(cfg.batch_size, "batch_size")
    execution.check(cfg.precision, cfg.micro_batch_size, cfg.batch_size, cfg.vae_decode_chunk)
    choose(C_WEIGHTINGS, cfg.loss.weighting, "loss.weighting")
    choose(DENOISING_WEIGHTINGS, cfg.loss.denoising_weighting, "loss.denoising_weighting")
    choose(dict.fromkeys(TEACHER_SAMPLING), cfg.teacher.timestep_sampling, "teacher.timestep_sampling")
    choose(dict.fromkeys(NFSD_NEGATIVES), cfg.loss.nfsd_negative, "loss.nfsd_negative")
    choose(dict.fromkeys(("pretrained", "random")), cfg.student.init, "student.init")
    choose(dict.fromkeys(("mean", "sum")), cfg.loss.reduction, "loss.reduction")
    choose(dict.fromkeys(LR_SCHEDULES), cfg.optim.lr_schedule, "optim.lr_schedule")
    choose(dict.fromkeys(("pixel", "latent")), cfg.loss.space, "loss.space")
    check_positive(cfg.teacher.steps, "teacher.steps")
    if cfg.data_workers < 0:
        raise ConfigError(f"data_workers={cfg.data_workers}: threads decoding a batch's images; need ≥ 0 (0 = none)")
    check_positive(cfg.discriminator.r1_every, "discriminator.r1_every")
    check_positive(cfg.discriminator.steps, "discriminator.steps")
    choose(dict.fromkeys(("uniform", "stratified")), cfg.student.timestep_draw, "student.timestep_draw")
    if cfg.student.timestep_draw == "stratified" and cfg.batch_size % len(cfg.student.timesteps):
        raise ConfigError(
            f"student.timestep_draw=stratified with batch_size={cfg.batch_size} and "
            f"{len(cfg.student.timesteps)} student timesteps: batch_size must be a multiple of the timestep count"
        )
    if cfg.discriminator.minibatch_std < 0:
        raise ConfigError(f"discriminator.minibatch_std={cfg.discriminator.minibatch_std}: a group size ≥ 0 (0 = off)")
    for key in ("regression_weight", "denoising_weight"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"loss.{key}={getattr(cfg.loss, key)}: must be ≥ 0 (0 = off)")
    if cfg.loss.regression_weight > 0:
        check_positive(cfg.loss.regression_pairs, "loss.regression_pairs")
        check_positive(cfg.loss.regression_steps, "loss.regression_steps")
    lc = cfg.loss
    if not lc.adversarial and not lc.distillation and lc.regression_weight == 0 and lc.denoising_weight == 0:
        raise ConfigError(
            "loss.adversarial=false, loss.distillation=false, loss.regression_weight=0 and loss.denoising_weight=0: "
            "at least one loss term is needed"
        )
    if not 0 <= cfg.teacher.t_min < cfg.teacher.t_max <= 999:
        raise ConfigError(
            f"teacher.t_min={cfg.teacher.t_min}, teacher.t_max={cfg.teacher.t_max}: need 0 ≤ t_min < t_max ≤ 999"
        )
    bad = [t for t in cfg.student.timesteps if not 0 <= t <= 999]
    if bad or not cfg.student.timesteps:
        raise ConfigError(f"student.timesteps={list(cfg.student.timesteps)}: need a non-empty list of values in 0..999")
    if cfg.loss.weighting == "nfsd" and cfg.teacher.steps != 1:
        raise ConfigError(
            f"teacher.steps={cfg.teacher.steps} with loss.weighting=nfsd: NFSD is a one-evaluation score; use teacher.steps=1"
        )
    for s in cfg.eval_steps:
        check_positive(s, "eval_steps")


def build_networks(cfg: TrainConfig) -> Networks:
    validate(cfg)
    t_folder, s_folder = resolve_weights(cfg.teacher.network), resolve_weights(cfg.student.network)
    from add_bench.evaluate import is_stable_diffusion

    if is_stable_diffusion(t_folder) or is_stable_diffusion(s_folder):
        return with_execution(build_sd_networks(cfg, t_folder, s_folder), cfg)
    t_card, s_card = read_card(t_folder), read_card(s_folder)
    # each network keeps the schedule it was trained on (Table 1e may pair teachers of different schedules):
    # the student's x_s and x̂θ use the student's, the teacher's diffused sample and x̂ψ the teacher's
    schedule = schedule_from_card(t_card)
    teacher = load_into(build_unet(t_card["unet"]), t_folder).eval().requires_grad_(False)
    student = build_unet(s_card["unet"])  # seeded by torch.manual_seed: random init is reproducible
    if cfg.student.init == "pretrained":
        load_into(student, s_folder)
    student.train()
    feature_network, c_img_network, c_text, disc = class_discriminator_side(cfg)
    nets = Networks(
        Denoiser(student, student_schedule(schedule_from_card(s_card), cfg), NUM_CLASSES),
        checkpoint.EMA(student, cfg.optim.ema_decay),
        Denoiser(teacher, schedule, NUM_CLASSES),
        feature_network,
        c_img_network,
        c_text,
        disc,
    )
    return with_execution(nets, cfg)


def with_execution(nets: Networks, cfg: TrainConfig) -> Networks:
    """``nets`` set up for the execution keys: gradient checkpointing in the student UNet and in the VAE
    decoder x̂θ is decoded through (a decoder with gradient); chunked VAE passes (``vae_decode_chunk``)."""
    nets.vae_chunk = cfg.vae_decode_chunk
    if cfg.gradient_checkpointing:
        execution.enable_gradient_checkpointing(nets.student.unet, "the student UNet")
        if nets.sd is not None:  # only the passes that keep a graph (the student's decode) checkpoint
            execution.enable_gradient_checkpointing(nets.sd.vae, "the VAE")
    return nets


def student_schedule(own: Schedule, cfg: TrainConfig) -> Schedule:
    """The student's schedule: the one its weights were trained on (``own``, from its card), with ᾱ at
    t = T−1 forced to 0 when ``student.zero_terminal_snr`` (x_s at the top student step is pure noise, as
    at inference)."""
    force = cfg.student.zero_terminal_snr or own.cfg.force_zero_terminal_snr
    if force and own.prediction_type == "epsilon":
        raise ConfigError(
            f"student.zero_terminal_snr=true with an ε-prediction student ({cfg.student.network}): "
            "x0 is undefined at α = 0; accepted: student.zero_terminal_snr=false, or a "
            "v_prediction / sample network"
        )
    return Schedule(dataclasses.replace(own.cfg, force_zero_terminal_snr=force))


def class_discriminator_side(cfg: TrainConfig):
    """``discriminator_side`` of a class-conditional model: c_text is the (classes, E) table of the class
    prompts' embeddings from ``discriminator.c_text_network``."""
    dcfg = cfg.discriminator
    return discriminator_side(
        cfg, (lambda: prompt_embeddings(dcfg.c_text_network, dcfg.c_text_weights)) if dcfg.c_text else None
    )


def discriminator_side(cfg: TrainConfig, make_c_text):
    """The frozen feature network F, the c_img network, c_text (``make_c_text()``: a (classes, E) table
    or an (N, E) probe of a text tower) and the trainable heads D_φ,k."""
    fn = cfg.feature_network
    feature_network = build_feature_network(fn.name, fn.weights, fn.layers)
    dcfg = cfg.discriminator
    c_img_network = None
    if dcfg.c_img:
        same = (dcfg.c_img_network, dcfg.c_img_weights) == (fn.name, fn.weights)
        c_img_network = feature_network if same else build_feature_network(dcfg.c_img_network, dcfg.c_img_weights)
    c_text = make_c_text() if make_c_text is not None else None
    c_img_dim = c_img_network.cls_embedding(torch.zeros(1, 1, 28, 28)).shape[1] if c_img_network is not None else 0
    disc = Discriminator(
        feature_network.dims,
        c_text.shape[1] if c_text is not None else 0,
        c_img_dim,
        dcfg.c_text,
        dcfg.c_img,
        dcfg.cmap_dim,
        dcfg.minibatch_std,
    )
    return feature_network, c_img_network, c_text, disc


def build_sd_networks(cfg: TrainConfig, t_folder: Path, s_folder: Path) -> Networks:
    """Stable Diffusion teacher and student in latent space. The same folder: one VAE, text encoder and
    schedule. Different folders (Table 1e): each keeps its own, and they meet in pixel space."""
    import copy

    from add_bench.networks.featnets import build_text_encoder
    from add_bench.networks.sd import load_stable_diffusion

    if cfg.loss.regression_weight > 0:
        raise ConfigError(
            f"loss.regression_weight={cfg.loss.regression_weight} with a Stable Diffusion teacher: the noise-anchored "
            "regression is implemented for the embedded class-conditional models; accepted: loss.regression_weight=0"
        )
    if cfg.loss.weighting == "nfsd" and cfg.loss.nfsd_negative != "null":
        raise ConfigError(
            f"loss.nfsd_negative={cfg.loss.nfsd_negative!r} needs class labels; with a Stable "
            "Diffusion teacher accepted: null"
        )
    t_sd = load_stable_diffusion(t_folder)
    s_sd, teacher_sd = t_sd, None
    if s_folder.resolve() != t_folder.resolve():
        if cfg.loss.distillation and cfg.loss.space != "pixel":
            raise ConfigError(
                f"student.network={s_folder} and teacher.network={t_folder} are different models: "
                f"they meet in pixel space, so loss.space={cfg.loss.space!r} is not possible; "
                "accepted: loss.space=pixel"
            )
        s_sd, teacher_sd = load_stable_diffusion(s_folder), t_sd
    base = s_sd.unet
    student = copy.deepcopy(base) if cfg.student.init == "pretrained" else type(base).from_config(base.config)
    student.train().requires_grad_(True)
    dcfg = cfg.discriminator
    text_encoder = build_text_encoder(dcfg.c_text_network, dcfg.c_text_weights) if dcfg.c_text else None
    feature_network, c_img_network, _, disc = discriminator_side(
        cfg, (lambda: text_encoder(["a photo"])) if text_encoder is not None else None
    )
    return Networks(
        s_sd.denoiser(student),
        checkpoint.EMA(student, cfg.optim.ema_decay),
        t_sd.denoiser(),
        feature_network,
        c_img_network,
        None,
        disc,
        sd=s_sd,
        text_encoder=text_encoder,
        teacher_sd=teacher_sd,
    )


# ------------------------------------------------------------------------------------ one step
def sample_teacher_t(cfg: TrainConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    tc = cfg.teacher
    if tc.timestep_sampling == "student":
        grid = torch.tensor(list(cfg.student.timesteps))
        return grid[distributed.rows(lambda m: torch.randint(0, len(grid), (m,), generator=gen), n)]
    return distributed.rows(lambda m: torch.randint(tc.t_min, tc.t_max + 1, (m,), generator=gen), n)


@dataclass
class TeacherDraws:
    """The distillation term's random draws for a batch: the teacher's t, its noise ε' and, for NFSD with
    another class as the negative prompt, that class's offset from the label."""

    t: torch.Tensor
    eps: torch.Tensor
    negative_offset: torch.Tensor | None = None

    def rows(self, rows: slice) -> TeacherDraws:
        return TeacherDraws(self.t[rows], self.eps[rows], execution.rows_of(self.negative_offset, rows))


def draw_teacher(cfg: TrainConfig, shape, gen: torch.Generator, like: torch.Tensor) -> TeacherDraws:
    """t, ε' (of ``shape``: the teacher's input) and NFSD's negative class offset, in this order, for a batch."""
    n = shape[0]
    t = sample_teacher_t(cfg, n, gen).to(like.device)
    eps = randn(shape, gen, like)
    offset = None
    if cfg.loss.weighting == "nfsd" and cfg.loss.nfsd_negative == "other_class":
        offset = distributed.rows(lambda m: torch.randint(1, NUM_CLASSES, (m,), generator=gen), n).to(like.device)
    return TeacherDraws(t, eps, offset)


def teacher_input_shape(nets: Networks, x_student_shape, pixel_shape) -> tuple[int, ...]:
    """The shape of the teacher's input: x̂θ's, or x̂θ decoded and re-encoded by a teacher with its own VAE."""
    if nets.teacher_sd is None:
        return tuple(x_student_shape)
    vs = nets.teacher_sd.vae_scale
    return (pixel_shape[0], nets.teacher_sd.unet.config.in_channels, pixel_shape[-2] // vs, pixel_shape[-1] // vs)


def distillation_term(
    nets: Networks,
    cfg: TrainConfig,
    x_student,
    labels,
    gen,
    img_student=None,
    teacher_cond=None,
    draws: TeacherDraws | None = None,
) -> torch.Tensor:
    """λ-free Eq. 4 for the configured c(t): the teacher sees the diffused student sample. For a latent
    model with ``loss.space=pixel`` both x̂θ and x̂ψ are decoded first (``img_student``: x̂θ decoded).
    A teacher with its own VAE (``nets.teacher_sd``) sees sg(x̂θ) re-encoded into its latent space, is
    conditioned by ``teacher_cond`` (its own prompt embeddings) and its x̂ψ is decoded by its own VAE.
    ``draws``: t and ε' drawn beforehand (a micro-batch's rows of the batch's draws); None: drawn from ``gen``."""
    bridge = nets.teacher_sd is not None
    if bridge:
        img_student = img_student if img_student is not None else nets.to_pixels(x_student).float()
        with torch.no_grad():
            x_teacher_in = nets.teacher_sd.to_latents(img_student.detach(), mode=True, chunk=nets.vae_chunk).float()
        labels = teacher_cond
    else:
        x_teacher_in = x_student
    draws = draws if draws is not None else draw_teacher(cfg, x_teacher_in.shape, gen, x_teacher_in)
    t, eps = draws.t, draws.eps
    alpha, sigma = nets.teacher.schedule.alpha_sigma(t, x_teacher_in.ndim)
    c_t = C_WEIGHTINGS[cfg.loss.weighting](alpha, sigma)
    if cfg.loss.weighting == "nfsd":
        target = nfsd_x0_target(nets, cfg, x_teacher_in, labels, t, eps, alpha, sigma, draws.negative_offset)
    else:
        target = teacher_target(nets.teacher, x_teacher_in, labels, t, eps, cfg.teacher.steps, cfg.teacher.cfg_scale)
    if nets.sd is not None and cfg.loss.space == "pixel":
        with torch.no_grad():  # x̂ψ decoded by the teacher's own VAE
            target = (nets.teacher_sd or nets.sd).to_pixels(target, nets.vae_chunk)
        x_student = img_student if img_student is not None else nets.to_pixels(x_student).float()
    return distillation_loss(x_student, target.float(), c_t, cfg.loss.reduction)


@torch.no_grad()
def nfsd_x0_target(nets: Networks, cfg: TrainConfig, x_student, labels, t, eps, alpha, sigma, negative_offset):
    """NFSD: ε(z;y), ε(z;∅), ε(z;negative) in one batched teacher pass, then the equivalent x0 target."""
    null = nets.teacher.null_condition(labels)
    if cfg.loss.nfsd_negative == "other_class":  # a random different class plays the negative prompt
        negative = (labels + negative_offset) % NUM_CLASSES
    else:
        negative = null
    z = add_noise(x_student.detach(), eps, alpha, sigma)
    tt = t.repeat(3)
    eps_all = nets.teacher(z.repeat(3, 1, 1, 1), tt, torch.cat([labels, null, negative])).eps
    eps_cond, eps_uncond, eps_neg = eps_all.chunk(3)
    delta = nfsd_delta(eps_cond, eps_uncond, eps_neg, t, cfg.teacher.cfg_scale)
    return nfsd_target(x_student, delta, alpha, sigma)


def conditioning(nets: Networks, pixels: torch.Tensor, labels: torch.Tensor, c_text: torch.Tensor | None = None):
    """The discriminator's c_text (the class prompt's row of the table, unless given per sample) and
    c_img (CLS embedding of the real image x0)."""
    with torch.no_grad():
        if c_text is None and nets.c_text is not None:
            c_text = nets.c_text[labels]
        c_img = nets.c_img_network.cls_embedding(pixels) if nets.c_img_network is not None else None
    return c_text, c_img


def add_step(
    nets: Networks,
    cfg: TrainConfig,
    x0,
    labels,
    gen,
    opt_s,
    opt_d,
    step: int,
    pixels: torch.Tensor | None = None,
    c_text: torch.Tensor | None = None,
    teacher_cond: torch.Tensor | None = None,
    log_step: bool = False,
) -> dict[str, float]:
    """One ADD iteration: a generator (student) update, then a discriminator update.

    ``log_step``: this step's row is written to the log, so it also carries the student's gradient norm
    from each term of Eq. 1 alone (:class:`TermGradients`; the update is the same either way).

    ``labels`` is the denoisers' condition (class labels, or prompt embeddings of a text model). A latent
    model also passes ``pixels`` (the real images whose latents are x0) and ``c_text`` (per-sample text
    embeddings); for a pixel model both default to x0 and the class prompt's c_text. ``teacher_cond``:
    the teacher's own condition when it comes from another folder (``nets.teacher_sd``).

    ``precision`` and ``micro_batch_size``: :mod:`add_bench.execution` (every draw is made for the whole batch,
    then each micro-batch's losses, scaled by its share, are back-propagated in turn)."""
    pixels = x0 if pixels is None else pixels
    n = x0.shape[0]
    s = draw_student_timesteps(cfg, n, gen).to(x0.device)
    eps = randn(x0.shape, gen, x0)
    alpha_s, sigma_s = nets.student.schedule.alpha_sigma(s, x0.ndim)
    x_s = add_noise(x0, eps, alpha_s, sigma_s)
    aug = cfg.discriminator.augment
    fake_aug = draw_augment(aug, pixels.shape, gen, pixels.dtype) if cfg.loss.adversarial else None
    teacher_draws = None
    if cfg.loss.distillation:
        teacher_draws = draw_teacher(cfg, teacher_input_shape(nets, x0.shape, pixels.shape), gen, x0)
    regression_idx = (
        distributed.rows(lambda m: torch.randint(0, len(nets.pairs.noise), (m,), generator=gen), n)
        if cfg.loss.regression_weight
        else None
    )
    with execution.autocast(cfg.precision, x0.device):
        c_text, c_img = (c if c is None else c.float() for c in conditioning(nets, pixels, labels, c_text))
    log: dict[str, float] = {}

    # ---- generator (student) update: Eq. 1, accumulated over the micro-batches
    terms = TermGradients(nets.student.unet) if log_step else None
    fake_parts: list[list[torch.Tensor]] = []
    opt_s.zero_grad(set_to_none=True)
    parts = execution.micro_batches(n, cfg.micro_batch_size, cfg.batch_size)
    replay = execution.SpectralNormReplay(nets.discriminator)
    for rows, share in parts:
        with execution.autocast(cfg.precision, x0.device), replay("generator", rows, len(parts) == 1):
            g = generator_losses(
                nets,
                cfg,
                x0[rows],
                x_s[rows],
                s[rows],
                labels[rows],
                execution.rows_of(c_text, rows),
                execution.rows_of(c_img, rows),
                execution.rows_of(teacher_cond, rows),
                Draws(fake_aug, teacher_draws, regression_idx, rows),
                gen,
            )
        for key, value in g.values.items():
            add_share(log, key, value, share)
        check_finite(g.total, "generator loss", step)
        if terms is not None:
            terms.add(execution.scaled(g.adv, share), execution.scaled(g.weighted_distill, share))
        execution.scaled(g.total, share).backward()
        add_share(log, "loss_g", g.total, share)
        if g.fake_features is not None:
            fake_parts.append([f.detach() for f in g.fake_features])
    if terms is not None:
        log.update(terms.norms())
    distributed.average_gradients(nets.student.unet)
    log["grad_norm_student"] = clip(nets.student.unet, cfg.optim.student_grad_clip)
    opt_s.step()
    nets.ema.update(nets.student.unet, step)
    log["loss_g"] = log.pop("loss_g")

    # ---- discriminator update: Eq. 3 (the fake features are those of this step's x̂θ, detached)
    if cfg.loss.adversarial:
        fake_features = [execution.joined(level) for level in zip(*fake_parts)]
        _, fake_logits, d_log = discriminator_step(
            nets.feature_network, nets.discriminator, cfg, pixels, fake_features, c_text, c_img, gen, opt_d, step
        )
        log.update(d_log)
        # how well D spots x̂θ per student timestep: at s = 999 the student sees no x0, at small s it
        # mostly copies x0, so the pooled d_acc alone hides whether the 1-step samples are caught
        fake_ok = torch.cat([f.detach().lt(0).float() for f in fake_logits], dim=1).mean(1)  # (N,)
        for tau in sorted(set(s.tolist())):
            log[f"d_fake_acc_s{tau}"] = fake_ok[s == tau].mean().item()
        for _ in range(cfg.discriminator.steps - 1):  # extra discriminator updates, each on fresh fakes
            features = fresh_fake_features(nets, cfg, x0, labels, gen, pixels.shape)
            discriminator_step(
                nets.feature_network, nets.discriminator, cfg, pixels, features, c_text, c_img, gen, opt_d, step
            )
    return log


@dataclass
class Draws:
    """The generator update's draws, made for the whole batch, and the rows of the micro-batch at hand."""

    fake_augment: list | None  # DiffAugment parameters of x̂θ
    teacher: TeacherDraws | None  # the teacher's t, ε' (and NFSD's negative class)
    regression_idx: torch.Tensor | None  # the stored (ε, class, sample) pairs of the regression term
    rows: slice  # the micro-batch's rows of the batch


@dataclass
class GeneratorLosses:
    total: torch.Tensor  # Eq. 1 (+ the extensions' terms, when on) of the micro-batch
    adv: torch.Tensor | None  # L_adv^G
    weighted_distill: torch.Tensor | None  # λ·L_distill
    fake_features: list[torch.Tensor] | None  # F(aug(x̂θ)), for the discriminator update
    values: dict[str, torch.Tensor]  # the log's loss terms


def generator_losses(
    nets: Networks, cfg: TrainConfig, x0, x_s, s, labels, c_text, c_img, teacher_cond, draws: Draws, gen
) -> GeneratorLosses:
    """The student's x̂θ(x_s, s) on one micro-batch and its losses (fp32), with the draws made beforehand."""
    x_student = nets.student(x_s, s, labels).x0.float()  # x̂θ(x_s, s)
    decode = cfg.loss.adversarial or (cfg.loss.distillation and cfg.loss.space == "pixel")
    img_student = nets.to_pixels(x_student).float() if decode else None  # the identity for pixel models
    total = x_s.new_zeros((), dtype=torch.float32)
    values: dict[str, torch.Tensor] = {}
    fake_features = loss_adv = weighted_distill = None
    if cfg.loss.adversarial:
        nets.discriminator.requires_grad_(False)
        augmented = apply_augment(img_student, cfg.discriminator.augment, slice_draws(draws.fake_augment, draws.rows))
        fake_features = nets.feature_network(augmented)
        with execution.full_precision(cfg.precision, x_s.device):
            logits = nets.discriminator([f.float() for f in fake_features], c_text, c_img)
            loss_adv = values["loss_g_adv"] = generator_adversarial_loss(logits)
        nets.discriminator.requires_grad_(True)
        total = total + loss_adv
    if cfg.loss.distillation:
        teacher = draws.teacher.rows(draws.rows)
        loss_distill = distillation_term(nets, cfg, x_student, labels, gen, img_student, teacher_cond, teacher)
        weighted_distill = cfg.loss.lambda_distill * loss_distill
        total = total + weighted_distill
        values["loss_distill"] = loss_distill
    if cfg.loss.regression_weight > 0:
        loss_regression = regression_term(nets, cfg, len(s), gen, draws.regression_idx[draws.rows])
        total = total + cfg.loss.regression_weight * loss_regression
        values["loss_regression"] = loss_regression
    if cfg.loss.denoising_weight > 0:
        w_s = DENOISING_WEIGHTINGS[cfg.loss.denoising_weighting](*nets.student.schedule.alpha_sigma(s, x_s.ndim))
        loss_denoising = denoising_anchor(x_student, x0.float(), w_s, s < max(cfg.student.timesteps))
        total = total + cfg.loss.denoising_weight * loss_denoising
        values["loss_denoising"] = loss_denoising
    return GeneratorLosses(total, loss_adv, weighted_distill, fake_features, values)


def add_share(log: dict[str, float], key: str, loss: torch.Tensor, share: float) -> None:
    """log[key] += share·loss: a micro-batch's part of the batch's value (the value itself for one batch)."""
    log[key] = log.get(key, 0.0) + share * loss.item()


def draw_student_timesteps(cfg: TrainConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """s for a batch of n: uniform over T_student (the paper), or ``stratified``: each τ equally often, in
    contiguous blocks (the discriminator's BatchNormLocal groups of fakes then hold one timestep each)."""
    grid = torch.tensor(list(cfg.student.timesteps))
    if cfg.student.timestep_draw == "stratified":
        return distributed.rows(lambda m: grid.repeat_interleave(m // len(grid)), n)
    return grid[distributed.rows(lambda m: torch.randint(0, len(grid), (m,), generator=gen), n)]


@torch.no_grad()
def fresh_fake_features(nets: Networks, cfg: TrainConfig, x0, labels, gen, pixel_shape=None) -> list[torch.Tensor]:
    """F(aug(x̂θ)) of the (just updated) student on new noise and timesteps, for an extra discriminator update
    (``pixel_shape``: the decoded images' shape; None: x0's, a pixel model)."""
    s = draw_student_timesteps(cfg, x0.shape[0], gen).to(x0.device)
    alpha_s, sigma_s = nets.student.schedule.alpha_sigma(s, x0.ndim)
    x_s = add_noise(x0, randn(x0.shape, gen, x0), alpha_s, sigma_s)
    aug = draw_augment(cfg.discriminator.augment, pixel_shape or x0.shape, gen, x0.dtype)
    parts = []
    for rows, _ in execution.micro_batches(x0.shape[0], cfg.micro_batch_size, cfg.batch_size):
        with execution.autocast(cfg.precision, x0.device):
            images = nets.to_pixels(nets.student(x_s[rows], s[rows], labels[rows]).x0.float()).float()
            features = nets.feature_network(apply_augment(images, cfg.discriminator.augment, slice_draws(aug, rows)))
        parts.append([f.float() for f in features])
    return [execution.joined(level) for level in zip(*parts)]


@dataclass
class TeacherPairs:
    """Noise, class and the teacher's multi-step sample from that noise (:func:`teacher_pairs`)."""

    noise: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor


def teacher_pairs(nets: Networks, cfg: TrainConfig, workdir: Path) -> TeacherPairs:
    """``loss.regression_pairs`` pairs (ε, c) → the teacher's DPM-Solver++ sample in ``loss.regression_steps``
    steps with CFG ``teacher.cfg_scale``, from their own seeded generator (the training draws are unchanged);
    kept in the work folder so that a resumed cell reuses them."""
    from add_bench.diffusion import get_sampler
    from add_bench.provenance import atomic_path

    path = workdir / "regression_pairs.pt"
    if path.is_file():
        return TeacherPairs(**torch.load(path))
    lc, device = cfg.loss, nets.student.device
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    noise = torch.randn((lc.regression_pairs, *nets.data_shape), generator=gen)
    labels = torch.arange(lc.regression_pairs) % NUM_CLASSES
    sampler = get_sampler("dpm_solver")
    chunks = []
    for n, c in zip(noise.split(256), labels.split(256)):
        chunks.append(sampler(nets.teacher, n.to(device), c.to(device), lc.regression_steps, cfg.teacher.cfg_scale))
    pairs = {"noise": noise, "labels": labels, "target": torch.cat(chunks).cpu()}
    with atomic_path(path) as tmp:
        torch.save(pairs, tmp)
    return TeacherPairs(**pairs)


def regression_term(
    nets: Networks, cfg: TrainConfig, n: int, gen: torch.Generator, idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The noise-anchored regression (an extension): the student's x̂θ(ε, τN) from n stored pairs' noise at the
    top student timestep τN, against the teacher's sample from the same noise (``idx``: the pairs, drawn
    beforehand; None: n drawn from ``gen``)."""
    pairs = nets.pairs
    idx = (
        idx
        if idx is not None
        else distributed.rows(lambda m: torch.randint(0, len(pairs.noise), (m,), generator=gen), n)
    )
    n = len(idx)
    device = nets.student.device
    noise, labels = pairs.noise[idx].to(device), pairs.labels[idx].to(device)
    top = torch.full((n,), max(cfg.student.timesteps), device=device)
    return noise_anchored_regression(nets.student(noise, top, labels).x0.float(), pairs.target[idx].to(device))


def discriminator_step(
    feature_network,
    discriminator: Discriminator,
    cfg: TrainConfig,
    pixels,
    fake_features,
    c_text,
    c_img,
    gen,
    opt_d,
    step: int,
):
    """One update of the heads D_φ,k by Eq. 3: hinge on F(aug(x0)) against ``fake_features`` (detached here),
    plus γ·R1 on the real features every ``discriminator.r1_every`` steps (lazy R1: γ scaled by the interval).
    Real and fake share the conditioning (c_text, c_img). Returns (real logits, fake logits, log entries).

    Over ``micro_batch_size`` micro-batches: the DiffAugment draws are made for the whole batch, each
    micro-batch's hinge and R1 terms (means over its samples) are scaled by its share of the batch, so their
    sum is the whole batch's; the heads see each micro-batch alone (:mod:`add_bench.execution` on their
    BatchNormLocal groups). The heads, the hinge loss and R1 run in fp32 under any ``precision``."""
    device, n = pixels.device, pixels.shape[0]
    aug = draw_augment(cfg.discriminator.augment, pixels.shape, gen, pixels.dtype)
    gamma = cfg.discriminator.r1_gamma * cfg.discriminator.r1_every if r1_due(cfg, step) else 0.0
    opt_d.zero_grad(set_to_none=True)
    log: dict[str, float] = {}
    real_parts, fake_parts = [], []
    parts = execution.micro_batches(n, cfg.micro_batch_size, cfg.batch_size)
    replay = execution.SpectralNormReplay(discriminator)
    for rows, share in parts:
        with torch.no_grad(), execution.autocast(cfg.precision, device):
            real_features = feature_network(
                apply_augment(pixels[rows], cfg.discriminator.augment, slice_draws(aug, rows))
            )
        real_features = [f.float().requires_grad_(gamma > 0) for f in real_features]
        cond = execution.rows_of(c_text, rows), execution.rows_of(c_img, rows)
        with execution.full_precision(cfg.precision, device):
            with replay("real", rows, len(parts) == 1):
                real_logits = discriminator(real_features, *cond)
            with replay("fake", rows, len(parts) == 1):
                fake_logits = discriminator([f[rows].detach().float() for f in fake_features], *cond)
            loss_hinge = discriminator_hinge_loss(real_logits, fake_logits)
            loss_r1 = r1_penalty(real_logits, real_features, gamma)
            loss_d = loss_hinge + loss_r1
        check_finite(loss_d, "discriminator loss", step)
        execution.scaled(loss_d, share).backward()
        add_share(log, "loss_d", loss_hinge, share)
        add_share(log, "loss_r1", loss_r1, share)
        real_parts.append([r.detach() for r in real_logits])
        fake_parts.append([f.detach() for f in fake_logits])
    real_logits, fake_logits = (
        [execution.joined(level) for level in zip(*parts)] for parts in (real_parts, fake_parts)
    )
    distributed.average_gradients(discriminator)
    log = {"grad_norm_discriminator": clip(discriminator, cfg.optim.discriminator_grad_clip)} | log
    opt_d.step()
    real_mean = torch.stack([r.mean() for r in real_logits]).mean().item()
    fake_mean = torch.stack([f.mean() for f in fake_logits]).mean().item()
    log.update(
        d_real=real_mean,
        d_fake=fake_mean,
        d_acc=0.5
        * (
            torch.cat([r.flatten() for r in real_logits]).gt(0).float().mean().item()
            + torch.cat([f.flatten() for f in fake_logits]).lt(0).float().mean().item()
        ),
    )
    return real_logits, fake_logits, log


def r1_due(cfg: TrainConfig, step: int) -> bool:
    """Lazy R1: the discriminator update of step ``step`` (counted from 0) carries the R1 penalty."""
    return step % cfg.discriminator.r1_every == 0


class TermGradients:
    """The student's gradient from L_adv^G alone and from λ·L_distill alone, summed over the micro-batches
    (:meth:`add`), and their norms (:meth:`norms`). Each gradient is taken with the graph kept and without
    touching ``.grad``, so the combined backward that follows, and the update, are unchanged."""

    def __init__(self, student: torch.nn.Module):
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.adv: list | None = None
        self.distill: list | None = None

    def add(self, loss_adv: torch.Tensor | None, weighted_distill: torch.Tensor | None) -> None:
        """A micro-batch's terms (each scaled by its share of the batch; None for an absent term)."""
        self.adv = summed(self.adv, term_gradient(loss_adv, self.params))
        self.distill = summed(self.distill, term_gradient(weighted_distill, self.params))

    def norms(self) -> dict[str, float]:
        """Each term's gradient norm (0 for an absent term) and their ratio adv/distill (left out when the
        distillation gradient is 0: λ = 0 or no L_distill)."""
        adv, distill = gradient_norm(self.adv), gradient_norm(self.distill)
        norms = {"grad_norm_student_adv": adv, "grad_norm_student_distill": distill}
        if distill > 0:
            norms["grad_ratio_adv_distill"] = adv / distill
        return norms


def term_gradient(loss: torch.Tensor | None, params: list[torch.Tensor]) -> list | None:
    """∂loss/∂params (None where a parameter is unused), the graph kept; None for no loss."""
    return None if loss is None else list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def summed(total: list | None, grads: list | None) -> list | None:
    """Gradient lists added parameter by parameter (None entries are zeros)."""
    if total is None or grads is None:
        return grads if total is None else total
    return [b if a is None else a if b is None else a + b for a, b in zip(total, grads)]


def gradient_norm(grads: list | None) -> float:
    """‖grads‖₂ of the gradient averaged over the processes (the one the update uses); 0 for None."""
    if grads is None:
        return 0.0
    grads = distributed.mean_tensors([g for g in grads if g is not None])
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def clip(module: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"{what} is {loss.item()} at step {step}; the last good checkpoint is kept; "
            "lower optim.student_lr / optim.discriminator_lr or enable gradient clipping"
        )


# ------------------------------------------------------------------------------------ the loop
def optimisers(nets: Networks, cfg: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the student and for the discriminator heads, from ``cfg.optim``."""
    return (
        adam(nets.student.unet.parameters(), cfg.optim.student_lr, cfg),
        adam(nets.discriminator.parameters(), cfg.optim.discriminator_lr, cfg),
    )


def adam(params, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with ``cfg.optim``'s betas and weight decay, at this network's learning rate."""
    return torch.optim.Adam(
        params, lr=lr, betas=tuple(float(b) for b in cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )


def train(cfg: TrainConfig, workdir: Path, budget_minutes: float = 0, progress: bool = True) -> Path | None:
    """Train (or resume) the cell in ``workdir``; return the student weights folder when finished.

    On ``cfg.device``; started as several processes (torchrun, a sweep's --procs-per-cell or SLURM tasks:
    :mod:`add_bench.distributed`) each takes its rows of the global batch_size per step, drawn as one
    process would, and the gradients are averaged."""
    set_threads(cfg.threads)
    procs = distributed.processes()
    device = distributed.resolve_device(cfg.device, procs.local_rank)
    distributed.init(device)
    batch = distributed.local_batch(cfg, procs)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    gen = torch.Generator().manual_seed(cfg.seed)  # the same draws in every process: distributed.rows
    nets = build_networks(cfg).to(device)
    if cfg.loss.regression_weight > 0:
        nets.pairs = teacher_pairs(nets, cfg, workdir)
    data = training_data(cfg, nets)
    opt_s, opt_d = optimisers(nets, cfg)
    objects = {
        "student": nets.student.unet,
        "ema": nets.ema,
        "discriminator": nets.discriminator,
        "opt_student": opt_s,
        "opt_discriminator": opt_d,
    }
    run = Run(
        workdir, objects, gen, cfg.steps, cfg.ckpt_every, budget_minutes, procs, cfg.tensorboard, cfg.keep_checkpoints
    )
    o = cfg.optim
    last_r1: dict[str, float] = {}

    def step_fn(step: int) -> dict[str, float]:
        for opt, lr in ((opt_s, o.student_lr), (opt_d, o.discriminator_lr)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr, o.warmup_steps, cfg.steps, o.min_lr_ratio, o.lr_schedule)
        with distributed.global_batch(procs):  # every draw is the global batch's, this process's rows kept
            idx = distributed.rows(lambda m: torch.randint(0, len(data), (m,), generator=gen), batch)
            x0, cond, extra = to_device(data.batch(idx, gen), device)
            row = add_step(nets, cfg, x0, cond, gen, opt_s, opt_d, step, log_step=is_log_step(cfg, step + 1), **extra)
        row["lr_student"], row["lr_discriminator"] = opt_s.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
        if "loss_r1" in row and r1_due(cfg, step):
            last_r1.clear()
            last_r1.update(loss_r1=row["loss_r1"], r1_step=step + 1)
        return row

    def at_checkpoints(completed: int) -> None:
        if run.checkpoint_due(completed):
            if procs.world > 1:
                distributed.check_in_sync(completed, student=nets.student.unet, discriminator=nets.discriminator)
            if nets.sd is None:
                run.log_samples("samples/ema_1_step", lambda: sample_grid_image(nets), completed)

    finished = drive(
        run,
        step_fn,
        "ADD",
        cfg.log_every,
        progress=progress,
        postfix=("loss_g_adv", "loss_distill", "loss_d", "d_real", "d_fake"),
        log_row=lambda row: distributed.mean_over_processes(with_last_r1(row, last_r1)),
        after_step=at_checkpoints,
    )
    if not finished:
        return None
    wall, step = run.wall_time_s, run.step
    out = workdir / "student"
    if procs.is_writer:
        export_student(nets, cfg, out, wall, step)
        from add_bench.plots import write_training_plot

        write_training_plot(workdir)
    distributed.barrier()  # the student exists for every process from here
    return out


def sample_grid_image(nets: Networks) -> torch.Tensor:
    """The EMA student's 1-step samples from fixed noise, one row per class (:func:`diffusion.sample_grid`)."""
    ema = Denoiser(nets.ema.module, nets.student.schedule, nets.student.null_label)
    return sample_grid(ema, sample_add, 1, nets.data_shape, NUM_CLASSES)


def is_log_step(cfg: TrainConfig, completed: int) -> bool:
    """Whether the row of the step that completes ``completed`` steps is written to log.jsonl."""
    return completed % cfg.log_every == 0 or completed >= cfg.steps


def with_last_r1(row: dict[str, float], last_r1: dict[str, float]) -> dict[str, float]:
    """The log row with ``loss_r1`` = the most recent lazy R1 term (r1_every·γ·R1) and ``r1_step`` = the
    ``step`` of the row whose update computed it: R1 runs every ``discriminator.r1_every`` steps, which
    the logged steps need not hit. Neither key before R1 has run in this process (after a resume)."""
    return {k: v for k, v in row.items() if k != "loss_r1"} | last_r1


def to_device(obj, device: torch.device):
    """Tensors (also inside tuples, lists and dicts) moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class FashionMnistBatches:
    """The embedded training split in memory: batch(idx) → (x0, labels, {})."""

    def __init__(self, cfg: TrainConfig):
        data = cfg.data
        self.x, self.y = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, gen: torch.Generator):
        return self.x[idx], self.y[idx], {}


class CocoBatches:
    """COCO image–caption pairs for a latent model: batch(idx) → (x0 = VAE latents, prompt embeddings,
    {pixels, c_text[, teacher_cond]}). Images are read and decoded by ``data_workers`` threads (the pixels feed
    the discriminator) and encoded by the VAE on the fly, or read pre-encoded from ``coco_latents``."""

    def __init__(self, cfg: TrainConfig, nets: Networks):
        from add_bench.data.coco import load_captions

        self.coco, self.res, self.nets = load_captions(cfg.coco.root, cfg.coco.split), cfg.coco.resolution, nets
        self.workers = cfg.data_workers
        nets.sd.latent_shape(self.res)  # a resolution the VAE cannot take fails here, not mid-run
        self.latents = None
        if cfg.coco_latents:  # the VAE posterior's parameters, pre-encoded (python -m add_bench.data.coco encode)
            from add_bench.data.coco import CocoLatents

            self.latents = CocoLatents(cfg.coco_latents, nets.sd, self.coco, self.res)

    def __len__(self) -> int:
        return len(self.coco)

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, gen: torch.Generator):
        from add_bench.data.coco import to_model_range

        images = self.coco.load_images(idx.tolist(), self.res, self.workers)
        pixels = to_model_range(images).to(self.nets.sd.vae.device)
        prompts = [self.coco.captions[i] for i in idx.tolist()]
        c_text = self.nets.text_encoder(prompts) if self.nets.text_encoder is not None else None
        extra = {"pixels": pixels, "c_text": c_text}
        if self.nets.teacher_sd is not None:
            extra["teacher_cond"] = self.nets.teacher_sd.encode_prompts(prompts)
        if self.latents is not None:
            moments = self.latents.moments(idx.tolist()).to(pixels.device)
            latents = self.nets.sd.latents_from_moments(moments, gen)
        else:
            latents = self.nets.sd.to_latents(pixels, gen, chunk=self.nets.vae_chunk)
        return latents, self.nets.sd.encode_prompts(prompts), extra


def training_data(cfg: TrainConfig, nets: Networks):
    return FashionMnistBatches(cfg) if nets.sd is None else CocoBatches(cfg, nets)


def export_student(nets: Networks, cfg: TrainConfig, out: Path, wall: float, step: int) -> Path:
    if nets.sd is not None:
        return export_sd_student(nets, cfg, out, wall, step)
    s_card = read_card(resolve_weights(cfg.student.network))
    card = {
        "kind": "student",
        "name": out.parent.name,
        "unet": s_card["unet"],
        "schedule": to_dict(nets.student.schedule.cfg),
        "null_label": NUM_CLASSES,
        "student_timesteps": list(cfg.student.timesteps),  # the ADD sampler's τ
        "weights": "EMA, fp32",
        "steps": step,
        "train_wall_time_s": round(wall, 1),
        "provenance": provenance(cfg, cfg.seed, wall, command="python -m add_bench.train"),
    }
    save_weights(out, nets.ema.module, card, fp16=False)
    return out


def export_sd_student(nets: Networks, cfg: TrainConfig, out: Path, wall: float, step: int) -> Path:
    """A Stable Diffusion folder: the student's EMA UNet in ``unet/``, the small components of the folder
    it came from copied, its VAE and text encoder(s) linked (frozen and large), card.json (kind student)."""
    import os
    import shutil

    from add_bench.provenance import atomic_write_json

    src = nets.sd.folder.resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    nets.ema.module.save_pretrained(tmp / "unet")
    for item in sorted(src.iterdir()):
        if item.name in ("unet", "card.json", "metrics.json"):
            continue
        if item.name in nets.sd.frozen_parts:
            os.symlink(item.resolve(), tmp / item.name, target_is_directory=True)
        elif item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    atomic_write_json(
        tmp / "card.json",
        {
            "kind": "student",
            "name": out.parent.name,
            "teacher": str((nets.teacher_sd or nets.sd).folder.resolve()),
            "student_base": str(src),
            "weights": "EMA, fp32",
            "steps": step,
            "train_wall_time_s": round(wall, 1),
            "provenance": provenance(cfg, cfg.seed, wall, command="python -m add_bench.train"),
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("args", nargs="*", help="an optional YAML config, then key=value overrides")
    p.add_argument("--workdir", default=None, help="work folder (default runs/train)")
    p.add_argument("--budget-minutes", type=float, default=0)
    p.add_argument("--evaluate", action="store_true", help="score the student at eval_steps when done")
    add_cfg_option(p)
    a = p.parse_args(argv)
    path = a.args[0] if a.args and a.args[0].endswith((".yaml", ".yml")) else None
    overrides = a.args[1:] if path else a.args
    try:
        cfg = load(TrainConfig, path, overrides)
        if a.cfg:
            print_job(cfg)
            return 0
        workdir = Path(a.workdir) if a.workdir else REPO_ROOT / "runs" / "train"
        print(f"ADD cell → {workdir}", file=sys.stderr)
        student = train(cfg, workdir, a.budget_minutes)
        if student is None:
            return 3
        if not distributed.processes().is_writer:
            return 0  # process 0 reports and evaluates
        print(f"student weights: {student}", file=sys.stderr)
        if a.evaluate:
            from add_bench.evaluate import evaluate
            from add_bench.provenance import atomic_write_json

            result = evaluate(student, list(cfg.eval_steps), cfg.eval, device=cfg.device)
            result["provenance"] = provenance(cfg, cfg.seed, None, command="python -m add_bench.train --evaluate")
            atomic_write_json(workdir / "metrics.json", result)
            print(f"wrote {workdir / 'metrics.json'}", file=sys.stderr)
    finally:
        distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

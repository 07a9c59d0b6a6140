"""Typed config schema (dataclasses + OmegaConf) and loading with clear errors.

Every field is typed and documented here; a YAML file or a ``key=value`` override that names an
unknown key or gives a wrong type fails with the key's dotted path and what is accepted.
Named options (network presets, weightings, samplers, ...) live in small registries next to the
code that implements them; :func:`choose` looks a name up and reports the accepted names.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from add_bench.errors import ConfigError

T = TypeVar("T")


# ------------------------------------------------------------------------------ schema versions
# Version 1 is the schema of the first computed cells; a field added later is declared with
# ``added(version, ...)``, and SCHEMA_VERSION is the highest version in use. Bump it when adding a field:
# ``field_name: int = added(SCHEMA_VERSION + 1, default)`` and SCHEMA_VERSION = that version.
SCHEMA_VERSION = 9


class Added(NamedTuple):
    version: int  # the schema version the field entered
    reproduces: Any  # its value that reproduces what cells computed before it did (a dict for a sub-config)


def added(
    version: int,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    reproduces: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that entered the schema at ``version``, with ``default`` or ``default_factory``.
    ``reproduces`` is its value that reproduces older cells (when not given: the default): a cell's id leaves
    the field out at that value (add_bench.sweep.cell_id), so adding it changes no finished cell's id."""
    if reproduces is dataclasses.MISSING:
        reproduces = default if default_factory is dataclasses.MISSING else default_factory()
    if dataclasses.is_dataclass(reproduces):
        reproduces = dataclasses.asdict(reproduces)
    meta = {"added": Added(version, reproduces)}
    if default_factory is dataclasses.MISSING:
        return dataclasses.field(default=default, metadata=meta)
    return dataclasses.field(default_factory=default_factory, metadata=meta)


@functools.cache
def added_fields(schema: type) -> dict[str, Added]:
    """Dotted key → :class:`Added` of every field of ``schema`` (and its sub-configs) declared with
    :func:`added`, a sub-config's own fields before it; a sub-config's ``reproduces`` leaves out its added
    fields that hold their own ``reproduces``, as a cell's id does."""
    out: dict[str, Added] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        inner = added_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {}
        out |= {f"{f.name}.{key}": a for key, a in inner.items()}
        if "added" in f.metadata:
            version, reproduces = f.metadata["added"]
            out[f.name] = Added(version, without(reproduces, inner))
    return out


def without(values: Any, fields: Mapping[str, Added]) -> Any:
    """``values`` (nested dicts) with each dotted key of ``fields`` left out where it holds its
    ``reproduces`` value (or is absent)."""
    if not isinstance(values, dict):
        return values
    values = copy.deepcopy(values)
    for dotted_key, a in fields.items():
        *parents, leaf = dotted_key.split(".")
        node = values
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf, a.reproduces) == a.reproduces:
            node.pop(leaf, None)
    return values


# --------------------------------------------------------------------------------------- pieces
@dataclass
class DataConfig:
    root: str | None = None  # folder with the 4 IDX .gz files; None = env var, Debian path, download
    val_size: int = 5000  # fixed class-stratified validation carve-out of the 60k train split
    split_seed: int = 0
    download: bool = True  # try torchvision's downloader when no local copy is found


@dataclass
class ScheduleConfig:
    """The noise schedule (diffusers DDPM/DDIM scheduler arguments). The defaults are SD2.1's: the
    paper's teacher and student init (scaled-linear betas 0.00085–0.012, v-prediction, α_999 ≈ 0.068)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # diffusers names: linear, scaled_linear, squaredcos_cap_v2
    beta_start: float = 0.00085  # linear / scaled_linear only
    beta_end: float = 0.012  # linear / scaled_linear only
    prediction_type: str = "v_prediction"  # v_prediction | epsilon | sample
    # rescale the whole schedule to zero terminal SNR (Lin et al. 2023): every ᾱ_t changes. The paper
    # asks only that the student start from pure noise, which force_zero_terminal_snr gives on its own.
    rescale_betas_zero_snr: bool = False
    # ᾱ at t = T−1 set to 0 and nothing else changed: the ADD student's top step τN is pure noise
    # (set on the student's schedule from ``student.zero_terminal_snr``, never on a teacher's)
    force_zero_terminal_snr: bool = False
    timestep_spacing: str = "trailing"  # 4 steps → 999, 749, 499, 249


@dataclass
class TeacherPretrainConfig:
    """``python -m add_bench.pretrain teacher``: a class-conditional diffusion UNet."""

    size: str = "small"  # UNet preset: see add_bench.networks.unets.UNET_PRESETS
    steps: int = 9000  # one recipe for both sizes (Table 1e compares capacity)
    batch_size: int = 128
    lr: float = 6e-4  # AdamW, linear warm-up then cosine decay
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05  # cosine decay to lr·min_lr_ratio at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA of the weights; the EMA is what ships
    ema_warmup_steps: int = 1000  # EMA decay ramps as min(decay, (1+step)/(10+step)) until here
    cond_drop_prob: float = 0.1  # labels replaced by the null class → CFG / NFSD possible
    # v_mse (plain v-prediction MSE, SD2.1's: every t trained) | min_snr (Hang et al. 2023)
    loss_weighting: str = "v_mse"
    min_snr_gamma: float = 5.0
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 50
    threads: int = 0  # torch threads; 0 = all cores
    # TensorBoard events beside log.jsonl (<workdir>/tensorboard; sample grids at checkpoints): how the run is
    # logged, not what it computes
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class EvalNetPretrainConfig:
    """``python -m add_bench.pretrain evalnet``: the evaluation classifier (never used in training)."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    max_shift: int = 2  # random translation augmentation, pixels
    seed: int = 0
    threads: int = 0
    # TensorBoard events beside log.jsonl (<workdir>/tensorboard): how the run is logged, not what it computes
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class EmbedNetPretrainConfig:
    """``python -m add_bench.pretrain evalnet_ssl``: the self-supervised evaluation embedding (never used in
    training). SimCLR-style: two augmented views of each image, NT-Xent over the batch."""

    steps: int = 3000
    batch_size: int = 256  # images per step (2 views each)
    lr: float = 2e-3  # AdamW, linear warm-up then cosine decay
    weight_decay: float = 1e-4
    temperature: float = 0.2  # NT-Xent τ
    width: int = 16  # channels of the first conv (EmbedNet)
    min_scale: float = 0.8  # random crop: side between min_scale and 1 of the image, resized back
    max_shift: float = 2.0  # random translation, pixels
    contrast: float = 0.2  # intensity scaled by U(1 - contrast, 1 + contrast)
    cutout: int = 8  # side of a black square erased with probability 0.5 (0 = off)
    seed: int = 0
    threads: int = 0
    # TensorBoard events beside log.jsonl (<workdir>/tensorboard): how the run is logged, not what it computes
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class CocoConfig:
    """COCO 2017 captions (cluster scale): prompts and FID reference images (add_bench.data.coco)."""

    root: str | None = None  # folder with annotations/ and the image folders; None = $ADD_BENCH_COCO
    split: str = "val2017"  # train2017 | val2017 (the paper's zero-shot evaluation: val2017)
    resolution: int = 512  # generated and reference images are resolution² (the paper: 512)


@dataclass
class ClusterMetricsConfig:
    """Weights of the cluster metrics, read from local paths (model hubs are offline)."""

    inception: str | None = None  # folder holding clean-fid's inception-2015-12-05.pt; None = $ADD_BENCH_INCEPTION
    clip_model: str = "ViT-g-14"  # open_clip architecture of the CLIP score (the paper's)
    clip_weights: str | None = None  # its open_clip weights file; None = $ADD_BENCH_CLIP


@dataclass
class EvalConfig:
    """Sampling + scoring of a generator (teacher or student)."""

    num_samples: int = 5000  # embedded: balanced classes; cluster: COCO captions of distinct images
    seed: int = 0
    batch_size: int = 500
    metrics: str = "embedded"  # metric suite: embedded | cluster (add_bench.metrics.METRIC_SUITES)
    evalnet: str = "evalnet"  # shipped evaluation classifier (name or folder): FID, alignment
    # shipped self-supervised embedding (name or folder): recall, coverage, intra-FID
    evalnet_ssl: str = added(5, "evalnet_ssl")
    data: DataConfig = field(default_factory=DataConfig)
    coco: CocoConfig = added(2, default_factory=CocoConfig)  # cluster scale only
    cluster: ClusterMetricsConfig = added(2, default_factory=ClusterMetricsConfig)  # cluster scale only


# ------------------------------------------------------------------------ ADD training (one cell)
@dataclass
class StudentConfig:
    """The ADD-student x̂θ. Its architecture is the ``network`` weights folder's UNet."""

    network: str = "teacher_small_sl27k"  # shipped weights name or folder: architecture, and weights if pretrained
    init: str = "pretrained"  # pretrained (copy of ``network``) | random (Table 1c)
    # T_student; the ADD sampler starts at the top one (diffusion.add_timesteps)
    timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    # α forced to 0 at t = T−1 on the student's schedule only: x_s at s = 999 is pure noise, as at
    # inference (the paper's zero terminal SNR for the student; the teacher keeps its own schedule)
    zero_terminal_snr: bool = added(6, True)
    # how s is drawn for a batch: uniform over T_student (the paper) | stratified (each τ equally often,
    # in contiguous blocks: the discriminator's BatchNormLocal groups of fakes hold one timestep each)
    timestep_draw: str = added(7, "uniform")


@dataclass
class TeacherConfig:
    """The frozen DM-teacher x̂ψ that produces the distillation target (Eq. 4)."""

    # shipped weights name or folder (Table 1e: teacher_small_sl27k | teacher_large_sl; both on SD2.1's schedule)
    network: str = "teacher_small_sl27k"
    steps: int = 1  # k consecutive DDIM teacher steps from t produce the target (Table 1f: 1, 2, 4)
    # classifier-free guidance when making targets (1 = none; 1.5 = the default teacher's best on val:
    # results/teacher); NFSD's s
    cfg_scale: float = 1.5
    timestep_sampling: str = "uniform"  # t ~ U{t_min..t_max} | student (t drawn from T_student)
    t_min: int = 20
    t_max: int = 980


@dataclass
class FeatureNetworkConfig:
    """The frozen feature network F of the discriminator (Table 1a)."""

    name: str = "dino_s"  # see add_bench.networks.featnets.FEATURE_NETWORKS
    weights: str | None = None  # local weights path (cluster) or None for the shipped/hub default
    layers: list[int] | None = None  # feature depths (0 = patch embedding); None = the preset's


@dataclass
class DiscriminatorConfig:
    """Trainable heads D_φ,k on F_k (StyleGAN-T), conditioning and augmentation (Table 1b)."""

    c_text: bool = True  # project on the prompt's text embedding
    c_img: bool = True  # project on the CLS embedding of x0 from ``c_img_network``
    c_text_network: str = "clip_s"  # text tower giving c_text (embedded: the contrastive ViT's)
    c_text_weights: str | None = None  # its weights folder (None = the shipped one)
    c_img_network: str = "dino_s"  # feature network whose CLS embedding of x0 is c_img
    c_img_weights: str | None = None  # its weights (None = the shipped / hub default)
    cmap_dim: int = 64
    augment: str = "color,translation,cutout"  # DiffAugment policy ("" = none)
    r1_gamma: float = 1e-5  # γ of Eq. 3, R1 on each head's input features
    # lazy R1 (StyleGAN2): the penalty on every k-th step only, weighted by k (1 = every step, as the paper)
    r1_every: int = 16
    steps: int = added(7, 1)  # discriminator updates per student update (the paper: 1); extra ones see fresh fakes
    # group size of a minibatch-standard-deviation channel appended in every head (StyleGAN; lets a
    # head see that a batch of fakes is too alike); 0 = off (the paper)
    minibatch_std: int = added(7, 0)


@dataclass
class LossConfig:
    """Eq. 1: L = L_adv^G + λ·L_distill, each term switchable (Table 1d)."""

    adversarial: bool = True
    distillation: bool = True
    lambda_distill: float = 2.5  # λ
    weighting: str = "exp"  # c(t): exp | sds | nfsd (see add_bench.losses.C_WEIGHTINGS)
    reduction: str = "mean"  # d(x, y) = squared L2 averaged (mean) or summed (sum) over pixels
    # NFSD's negative prompt on the embedded benchmark: other_class | null (text models: null)
    nfsd_negative: str = "other_class"
    # latent models: d(x̂θ, x̂ψ) on decoded pixels (the paper) | latent; pixel models: the same
    space: str = added(3, "pixel")
    # an extension, not the paper's: weight of a noise-anchored regression (DMD; the public LADD
    # re-implementation) of the student's 1-step output from ε at the top student timestep onto the
    # teacher's multi-step output from the same ε (losses.noise_anchored_regression); 0 = off
    regression_weight: float = added(7, 0.0)
    regression_pairs: int = added(7, 2048)  # (ε, class, teacher output) pairs, made once per cell in its work folder
    regression_steps: int = added(7, 10)  # DPM-Solver++ steps of the teacher (guided by teacher.cfg_scale) per pair
    # an extension, not the paper's: weight of the student's own diffusion loss on its real inputs at every
    # student timestep below τN (losses.denoising_anchor); 0 = off
    denoising_weight: float = added(9, 0.0)
    # its w(s): v (1/σ², the teachers' v-prediction MSE) | eps (α²/σ², the ε-prediction MSE); losses.DENOISING_WEIGHTINGS
    denoising_weighting: str = added(9, "v")


@dataclass
class OptimConfig:
    student_lr: float = 1e-4
    discriminator_lr: float = 2e-3  # spectral-norm heads learn slowly: at 2e-4 the hinge loss stayed at chance
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])  # Adam, as in GAN training
    weight_decay: float = 0.0
    student_grad_clip: float = 1.0  # clip the student's gradient norm (0 = off)
    discriminator_grad_clip: float = 0.0  # clip the discriminator heads' gradient norm (0 = off)
    ema_decay: float = 0.99  # EMA of the student (the weights that are evaluated)
    warmup_steps: int = 20  # linear learning-rate warm-up of both optimisers
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (decay to lr·min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0


@dataclass
class SamplingConfig:
    """How a cell's generator is sampled when it is evaluated."""

    sampler: str | None = None  # ddim | dpm_solver | add (add_bench.diffusion.SAMPLERS); None = the method's own
    cfg_scale: float = 1.0  # classifier-free guidance at sampling time (teacher rows; ADD samples without it)


@dataclass
class ProgressiveConfig:
    """``method: progressive``: progressive distillation (Salimans & Ho 2022), guided as in Meng et al. 2023.

    Stage 0 (``guided_steps`` > 0, "CFG-aware distillation"): a student learns the teacher's guided x0
    prediction (``teacher.cfg_scale``) in one evaluation at each of the ``start_steps`` DDIM timesteps.
    Then each halving trains a student (initialised from its teacher) to match two DDIM steps of its
    teacher (the previous stage's student) with one: ``start_steps`` → start_steps/2 → … → 1."""

    start_steps: int = 8  # DDIM steps of the first stage (a power of two); halved per stage down to 1
    guided_steps: int = 1000  # stage-0 iterations; 0 = none (the first halving then uses the guided teacher)
    steps_per_stage: int = 1000  # iterations per halving
    lr: float = 1e-4  # Adam per stage, linear warm-up then linear decay to 0 (Salimans & Ho anneal each halving)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50


# how any run is carried out (threads, device, checkpoints, logs), never what it computes
RUN_KEYS = ("threads", "device", "ckpt_every", "keep_checkpoints", "log_every", "tensorboard", "data_workers")


@dataclass
class TrainConfig:
    """``python -m add_bench.train``: one ADD cell, on the embedded benchmark or, when ``teacher.network``
    is a Stable Diffusion folder, on COCO (``coco``) in the teacher's latent space. A sweep cell of
    another ``method`` (Table 2: the teacher sampled as is, progressive distillation) reads its part of the
    same schema, declared in ``add_bench.methods.READS`` (an ablation row that sets a key its method does not
    read is refused); the schema stays one because a cell's id hashes all of it."""

    # how the cell's generator is made: add | teacher (no training) | progressive (add_bench.methods)
    method: str = added(4, "add")
    seed: int = 0
    # ADD iterations per cell: the knee of the quality-against-length curve (python -m add_bench.curve)
    steps: int = 600
    batch_size: int = 32
    # forward passes (student, teacher, VAE, feature and text networks) in fp32, or under bf16 autocast (CUDA
    # and CPU); master weights, optimiser states, the losses, the discriminator heads (GAN hinge, R1) stay fp32
    precision: str = added(8, "fp32")
    # gradient accumulation: each update over batch_size / micro_batch_size micro-batches (0 = the whole batch at
    # once). Every random draw is made for the whole batch first, so it equals one batch within float tolerance,
    # except the discriminator's batch statistics, taken within each micro-batch: BatchNormLocal's groups of 8
    # are the whole batch's when micro_batch_size is a multiple of 8; minibatch-std groups never are
    micro_batch_size: int = added(8, 0)
    ckpt_every: int = 200
    # training checkpoints kept in the work folder: 1 = the newest only (checkpoint.pt, replaced at each save);
    # K > 1 = the K newest (checkpoint-<step>.pt, checkpoint.pt a link to the newest); 0 = every one
    keep_checkpoints: int = 1
    log_every: int = 10
    threads: int = 0
    device: str = "auto"  # auto (this process's GPU if one is visible, else the CPU) | cpu | cuda | cuda:N
    data_workers: int = 0  # threads reading and decoding a batch's COCO images (0 = the training thread): same images
    # a folder of the COCO split's VAE posteriors (python -m add_bench.data.coco encode), read instead of encoding
    # each batch: the same latents within float tolerance (an execution key, like data_workers)
    coco_latents: str | None = None
    # execution only (sweep.EXECUTION_KEYS; the same numbers within float tolerance, less memory, more time):
    # torch.utils.checkpoint in the student UNet and, for a latent model, the VAE decoder that x̂θ is
    # decoded through (diffusers' enable_gradient_checkpointing): activations recomputed in the backward pass
    gradient_checkpointing: bool = False
    vae_decode_chunk: int = 0  # decode x̂θ (and x̂ψ) at most this many samples at a time; 0 = all at once
    # TensorBoard events (the log's numbers, sample grids at checkpoints) in <workdir>/tensorboard
    tensorboard: bool = True
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    feature_network: FeatureNetworkConfig = field(default_factory=FeatureNetworkConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # training data of a Stable Diffusion teacher
    coco: CocoConfig = added(3, default_factory=lambda: CocoConfig(split="train2017"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    sampling: SamplingConfig = added(4, default_factory=SamplingConfig)
    progressive: ProgressiveConfig = added(4, default_factory=ProgressiveConfig)


# ------------------------------------------------------------------------ Hydra's ConfigStore
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
SCHEMA_NODE = "add_bench_schema"  # TrainConfig
PRIMARY_NODE = "add_bench"  # the schema, then a preset of the ``base`` group (embedded unless overridden)
LAUNCH_NODE = "add_bench_launch"  # a launch profile of the ``launch`` group (LaunchProfile's defaults unless chosen)


@functools.cache
def config_store() -> Any:
    """Hydra's ConfigStore holding the suite's configs: ``add_bench_schema`` (TrainConfig), the group ``base``
    with one option per ``add_bench/presets/<name>.yaml`` (merged at the top level), ``add_bench``: the
    schema under ``base=embedded``, and the group ``launch`` of launch profiles under ``add_bench_launch``.

    The store registers the configs; it does not build a cell's. The sweep takes its preset from the ``base``
    group (:func:`preset`) and layers the preset, the ablation file's sets and the command line's overrides
    itself (:func:`load`, :func:`apply_overrides`); only the overrides' syntax is Hydra's
    (:func:`parse_overrides`). Hydra's own ``compose(config_name="add_bench", overrides=["base=sd21",
    "steps=500"])`` (after ``config_store()``) gives the same config as that layering of the same preset and
    keys (tests/test_config_store.py), so Hydra's tools can inspect it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NODE, node=TrainConfig, provider="add_bench")
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        cs.store(group="base", name=path.stem, node=load_yaml(path), package="_global_", provider="add_bench")
    defaults = [SCHEMA_NODE, {"base": "embedded"}, "_self_"]
    cs.store(name=PRIMARY_NODE, node={"defaults": defaults}, provider="add_bench")
    from add_bench.launchers import LaunchProfile

    # launch profiles (add_bench/presets/launch/<preset>.yaml): compose(config_name="add_bench_launch",
    # overrides=["launch=sd21"]); the group's option ``default`` is LaunchProfile's defaults
    cs.store(group="launch", name="default", node=LaunchProfile, package="_global_", provider="add_bench")
    for path in sorted((PRESETS_DIR / "launch").glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(LaunchProfile), load_yaml(path))
        cs.store(group="launch", name=path.stem, node=node, package="_global_", provider="add_bench")
    cs.store(name=LAUNCH_NODE, node={"defaults": [{"launch": "default"}, "_self_"]}, provider="add_bench")
    return cs


def preset(name: str, key: str = "base") -> DictConfig:
    """The option ``name`` of the ConfigStore's ``base`` group (a preset); an unknown name fails with ``key``
    and the accepted names."""
    cs = config_store()
    options = {option.removesuffix(".yaml"): option for option in cs.list("base")}
    return copy.deepcopy(cs.load(f"base/{choose(options, name, key)}").node)


# --------------------------------------------------------------------------------------- loading
def load(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    preset: tuple[str, DictConfig] | None = None,
) -> T:
    """Schema defaults ← ``preset`` (its name in messages, its config) ← YAML file ← ``extra`` dict ←
    ``key=value`` overrides, validated.

    Returns an OmegaConf object typed as the schema (attribute access, type-checked assignment).
    """
    cfg = open_mappings(OmegaConf.structured(schema), schema)
    layers: list[tuple[str, Any]] = [preset] if preset is not None else []
    if path is not None:
        layers.append((str(path), load_yaml(path)))
    if extra:
        layers.append(("config", dotted(extra)))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise config_error(e, source, schema) from None
    return apply_overrides(cfg, list(overrides or []), schema)  # type: ignore[return-value]


def open_mappings(cfg: DictConfig, schema: type) -> DictConfig:
    """``cfg`` (of the dataclass ``schema``) closed to keys the schema does not name, except fields typed as
    a mapping (``dict[str, ...]``, e.g. ``slurm.additional_parameters``): those take any key."""
    import dataclasses
    import typing

    OmegaConf.set_struct(cfg, True)
    for name, hint in typing.get_type_hints(schema).items():
        node = cfg.get(name)
        if typing.get_origin(hint) is dict and node is not None:
            OmegaConf.set_struct(node, False)
        elif dataclasses.is_dataclass(hint) and node is not None:
            open_mappings(node, hint)
    return cfg


def parse_overrides(overrides: list[str]) -> list:
    """Command-line overrides in Hydra's grammar (hydra-core's OverridesParser): ``key=value``, ``~key``,
    ``+key=value``, sweeps ``key=a,b,c`` / ``range(0,3)`` / ``choice(...)``. A value with a comma that is
    one value is quoted: ``discriminator.augment='color,cutout'``.

    The schema is structured (a dataclass): every key exists from the start and none can be deleted, so
    :func:`apply_overrides` gives two of Hydra's forms their only meaning here. ``~key`` (and ``~key=value``,
    whose value is not compared) resets the key, a leaf or a whole sub-config, to the schema's default, undoing
    a preset, a YAML file or an ablation row; an entry of a mapping field (``additional_parameters.<flag>``),
    which the schema's default does not hold, is removed; a key the config lacks is an error naming it.
    ``+key=value`` is refused with an error naming the key: every key is in the schema already (set it with
    ``key=value``), an entry of a mapping field is added with ``key=value`` too, and any other key is unknown
    (the error lists the accepted ones). ``++key=value`` is ``key=value``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"override {line!r}: {first} (expected key=value, e.g. steps=1000)") from None
        if not parsed[-1].key_or_group:
            raise ConfigError(f"override {line!r}: no key (expected key=value, e.g. steps=1000)")
    return parsed


def apply_overrides(cfg: Any, overrides: list[str], schema: type | None = None, source: str = "overrides") -> Any:
    """``cfg`` with command-line overrides applied: ``key=value`` sets, ``~key`` resets a key to the schema's
    default, ``+key=value`` is refused (:func:`parse_overrides` says why), and a sweep is for
    ``python -m add_bench.sweep``."""
    from hydra.core.override_parser.types import OverrideType

    for o in parse_overrides(overrides):
        key, line = o.key_or_group, o.input_line
        if o.is_sweep_override():
            raise ConfigError(
                f"override {line!r}: several values are a sweep (python -m add_bench.sweep {line}); here give one "
                f"value, quoted if it holds a comma: {key}='...'"
            )
        if o.type == OverrideType.ADD:
            raise ConfigError(f"override {line!r}: +{key} adds a key; {no_added_key(cfg, key, schema)}")
        try:
            if o.type == OverrideType.DEL:
                if OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
                    raise ConfigError(f"override {line!r}: no key '{key}' to reset")
                default = OmegaConf.select(OmegaConf.structured(schema), key, default=ABSENT) if schema else None
                if default is ABSENT:  # an entry of a mapping field: absent from the schema's default
                    parent, _, leaf = key.rpartition(".")
                    del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
                else:
                    OmegaConf.update(cfg, key, default, merge=False)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={o.get_value_element_as_str()}"]))
        except OmegaConfBaseException as e:
            raise config_error(e, source, schema, key) from None
    return cfg


ABSENT = object()  # OmegaConf.select's default: the key is not there


def no_added_key(cfg: Any, key: str, schema: type | None) -> str:
    """Why ``+key`` adds nothing to a structured config, naming ``key``: it is in the schema already, it is an entry
    of a mapping field (set with ``key=...``), or it is unknown (with the keys accepted where it would be)."""
    name = schema.__name__ if schema else "the config"
    if schema is not None and OmegaConf.select(OmegaConf.structured(schema), key, default=ABSENT) is not ABSENT:
        return f"every key of {name} is in its schema already (nothing is added or deleted); set it with {key}=..."
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if isinstance(node, DictConfig) and not OmegaConf.is_struct(node):
        return f"{parent} is a mapping whose entries are set without '+': {key}=..."
    accepted = _keys_at(schema, parent) if schema else []
    where = f" under {parent}" if parent else ""
    return f"{name} has no key '{key}' and takes no new one" + (
        f"; accepted keys{where}: {', '.join(accepted)}" if accepted else ""
    )


def print_job(cfg: Any, **cell: Any) -> None:
    """``--cfg job`` (Hydra's flag) of train, sweep, pretrain and evaluate: the config they would run, as YAML. With
    ``cell`` (a sweep's cell: ablation, name, seed, id) one YAML document: ``---``, those keys, then ``config:``,
    so that a sweep's cells read as one stream (``yaml.safe_load_all``)."""
    doc = OmegaConf.create({**cell, "config": cfg}) if cell else cfg
    print(("---\n" if cell else "") + OmegaConf.to_yaml(doc), end="")


def add_cfg_option(parser: Any) -> None:
    """A command's ``--cfg job`` option (argparse): :func:`print_job` and exit 0, nothing else run."""
    parser.add_argument(
        "--cfg", choices=["job"], help="print the resolved config (YAML) and exit, nothing run: Hydra's --cfg job"
    )


def check_keys(values: Any, schema: type, where: str) -> None:
    """``values`` is a mapping whose keys are fields of the dataclass ``schema``; else an error naming ``where``,
    the unknown keys and the accepted ones."""
    accepted = sorted(f.name for f in dataclasses.fields(schema))
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(accepted)}, got {type(values).__name__}")
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")


def typed(schema: type, values: Any, where: str) -> dict[str, Any]:
    """``values`` checked against the dataclass ``schema`` (keys, then types as OmegaConf converts them) → a
    plain dict of every field, the schema's defaults filled in and interpolations kept as written."""
    check_keys(values, schema, where)
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: key '{e.full_key}': {str(e).splitlines()[0]}") from None


def dotted(values: Mapping[str, Any]) -> DictConfig:
    """{"loss.weighting": "sds", "seed": 1} → a nested config layer (values kept as typed)."""
    layer = OmegaConf.create({})
    for key, value in values.items():
        OmegaConf.update(layer, key, value, force_add=True)
    return layer


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top, got {type(data).__name__}")
    return OmegaConf.create(data)


def config_error(
    e: OmegaConfBaseException, source: str, schema: type | None = None, key: str | None = None
) -> ConfigError:
    key = getattr(e, "full_key", None) or key or "?"
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        accepted = _keys_at(schema, parent) if schema else []
        hint = f"; accepted keys{' under ' + parent if parent else ''}: {', '.join(accepted)}" if accepted else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: config key '{key}': {msg}")


def _keys_at(schema: type, dotted: str) -> list[str]:
    node = OmegaConf.structured(schema)
    for part in [p for p in dotted.split(".") if p]:
        try:
            node = node[part]
        except Exception:  # noqa: BLE001
            return []
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def choose(registry: Mapping[str, T], name: str, key: str) -> T:
    """Look a named option up in a registry; unknown names fail with the key and accepted names."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"{key}={name!r}: unknown; accepted: {', '.join(sorted(registry))}") from None


def check_positive(value: int, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")
    return value


def to_dict(cfg: Any) -> dict:
    """A plain dict of an OmegaConf config, a dataclass instance or a mapping."""
    import dataclasses

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)

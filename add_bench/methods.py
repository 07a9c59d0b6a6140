"""How a sweep cell's generator is made: a small registry of methods (the paper's Table 2 compares them).

    add          train an ADD student (add_bench.train); sampled with the ADD multi-step sampler
    teacher      no training: the teacher itself, sampled by ``sampling.sampler`` (ddim | dpm_solver)
                 with ``sampling.cfg_scale``
    progressive  progressive distillation (add_bench.progressive); each step count has its own student,
                 sampled with DDIM

Each method is ``make(cfg, workdir) -> Generators``: which weights folder answers which step count, with
which sampler and guidance, and what the training cost. ``add_bench.sweep`` evaluates them all alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from add_bench.config import RUN_KEYS, TrainConfig, check_positive, choose
from add_bench.errors import ConfigError


@dataclass
class Generators:
    checkpoints: dict[int, Path]  # eval step count → weights folder
    sampler: str
    cfg_scale: float
    train_steps: int  # training iterations (0: nothing trained)
    train_wall_time_s: float

    def groups(self) -> dict[Path, list[int]]:
        """Weights folder → the step counts it is evaluated at (one evaluation per folder)."""
        out: dict[Path, list[int]] = {}
        for steps, folder in self.checkpoints.items():
            out.setdefault(folder, []).append(steps)
        return out


def card_wall(folder: Path) -> tuple[int, float]:
    """(training iterations, training seconds) from a trained weights folder's card."""
    from add_bench.networks.unets import read_card

    card = read_card(folder)
    return int(card.get("steps", 0)), float(card.get("train_wall_time_s", 0.0))


def trained(result, workdir: Path):
    """What a trainer returned, or TrainingStopped when it stopped early (a stop signal: see loop.StopSignals)."""
    if result is None:
        from add_bench.errors import TrainingStopped

        raise TrainingStopped(f"{workdir}: training stopped before its last step; a re-run resumes from its checkpoint")
    return result


def make_add(cfg: TrainConfig, workdir: Path) -> Generators:
    from add_bench.train import train

    student = trained(train(cfg, workdir), workdir)
    steps, wall = card_wall(student)
    return Generators(
        {s: student for s in cfg.eval_steps}, cfg.sampling.sampler or "add", cfg.sampling.cfg_scale, steps, wall
    )


def make_teacher(cfg: TrainConfig, workdir: Path) -> Generators:
    from add_bench.provenance import resolve_weights

    folder = resolve_weights(cfg.teacher.network)
    return Generators(
        {s: folder for s in cfg.eval_steps}, cfg.sampling.sampler or "ddim", cfg.sampling.cfg_scale, 0, 0.0
    )


def make_progressive(cfg: TrainConfig, workdir: Path) -> Generators:
    from add_bench.progressive import train_progressive

    students = trained(train_progressive(cfg, workdir), workdir)
    folders = {s: students[s] for s in cfg.eval_steps}
    steps, wall = card_wall(students[min(students)])  # the last stage's card holds the whole run's time
    return Generators(folders, cfg.sampling.sampler or "ddim", cfg.sampling.cfg_scale, steps, wall)


def teacher_evaluations(cfg: TrainConfig) -> int:
    """Teacher network evaluations a cell's training makes (per image, summed over batches and iterations):
    the compute both distillation methods spend on their teacher, the measure Table 2 compares them at.

    ADD: ``teacher.steps`` guided predictions per image per step (NFSD: one pass with 3 conditions), plus the
    regression pairs' DPM-Solver++ samples. Progressive: the guided stage one guided prediction per image,
    each halving two predictions of its (unguided) teacher, a first halving without a guided stage two
    guided ones."""
    from add_bench.evaluate import nfe_per_sample
    from add_bench.progressive import stages

    guided = nfe_per_sample(1, cfg.teacher.cfg_scale)  # one guided prediction: conditional + unconditional
    if cfg.method == "teacher":
        return 0
    if cfg.method == "progressive":
        total = 0
        for i, stage in enumerate(stages(cfg)):
            per_image = guided if stage.name == "guided" else 2 * (guided if i == 0 else 1)
            total += (stage.end - stage.start) * cfg.batch_size * per_image
        return total
    loss = cfg.loss
    per_image = 0
    if loss.distillation:
        per_image = 3 if loss.weighting == "nfsd" else cfg.teacher.steps * guided
    pairs = loss.regression_pairs * loss.regression_steps * guided if loss.regression_weight > 0 else 0
    return cfg.steps * cfg.batch_size * per_image + pairs


METHODS = {"add": make_add, "teacher": make_teacher, "progressive": make_progressive}

# The part of the one config schema each method reads (dotted keys; a group name covers the group). ADD reads
# all of it; a cell's id still hashes the whole config, so that committed cells keep their ids. The teacher
# reads no seed (it is sampled from the evaluation noise, ``eval.seed``): the sweep gives its cells seed 0, so
# that one computation serves every seed of its row.
COMMON_KEYS = (
    "method",
    *RUN_KEYS,
    "data",
    "eval",
    "eval_steps",
    "sampling",
    "teacher.network",
)
READS: dict[str, tuple[str, ...] | None] = {
    "add": None,
    "teacher": COMMON_KEYS,
    "progressive": (
        *COMMON_KEYS,
        "seed",
        "batch_size",
        "teacher.cfg_scale",
        "optim.ema_decay",
        "optim.student_grad_clip",
        "progressive",
    ),
}


def reads(method: str, key: str) -> bool:
    """Whether ``method`` reads the config key ``key`` (dotted)."""
    keys = choose(READS, method, "method")
    return keys is None or any(key == k or key.startswith(k + ".") for k in keys)


def check_reads(method: str, keys: list[str]) -> None:
    """A row that sets a key its method never reads would look like an ablation and change nothing."""
    unread = [k for k in keys if not reads(method, k)]
    if unread:
        accepted = ", ".join(READS[method] or ())
        raise ConfigError(
            f"{', '.join(unread)}: not read by method={method}, so setting it changes nothing; the keys "
            f"method={method} reads: {accepted}"
        )


def validate(cfg: TrainConfig) -> None:
    """The method name, its sampler, and the method's own settings; ADD cells: ``train.validate``."""
    from add_bench.checkpoint import check_keep
    from add_bench.diffusion import SAMPLERS

    choose(METHODS, cfg.method, "method")
    check_keep(cfg.keep_checkpoints)
    if cfg.sampling.sampler is not None:
        choose(SAMPLERS, cfg.sampling.sampler, "sampling.sampler")
    if cfg.method == "add":
        from add_bench.train import validate as validate_add

        validate_add(cfg)
    elif cfg.method == "progressive":
        from add_bench.progressive import validate as validate_progressive

        validate_progressive(cfg)
    for s in cfg.eval_steps:
        check_positive(s, "eval_steps")


def make(cfg: TrainConfig, workdir: Path) -> Generators:
    validate(cfg)
    return METHODS[cfg.method](cfg, workdir)


# ------------------------------------------------------------------------------ what a cell reads
def inputs(cfg: TrainConfig) -> dict[str, Path]:
    """The weights folders a cell reads, by role. A cell's id hashes its config, which names these
    folders but not their content, so the sweep records their versions (``provenance.weights_versions``)
    and re-runs a finished cell when one of them has changed since (``changed_inputs``)."""
    from add_bench.networks.featnets import featnet_folder
    from add_bench.provenance import resolve_weights

    roles = {"teacher": resolve_weights(cfg.teacher.network)}
    if cfg.method == "add":
        dcfg = cfg.discriminator
        roles |= {
            "student": resolve_weights(cfg.student.network),
            "feature network": featnet_folder(cfg.feature_network.name, cfg.feature_network.weights),
        }
        if dcfg.c_text:
            roles["c_text network"] = featnet_folder(dcfg.c_text_network, dcfg.c_text_weights)
        if dcfg.c_img:
            roles["c_img network"] = featnet_folder(dcfg.c_img_network, dcfg.c_img_weights)
    if cfg.eval.metrics != "cluster":
        roles["evaluation network"] = resolve_weights(cfg.eval.evalnet)
        roles["evaluation embedding"] = resolve_weights(cfg.eval.evalnet_ssl)
    return roles


# What must be at a path a cell reads, by kind: (is it there?, what is missing otherwise).
PATH_CHECKS = {
    "folder": (Path.is_dir, "no such folder"),
    "file": (Path.is_file, "no such file"),
    "weights folder": (lambda p: (p / "model.safetensors").is_file(), "no model.safetensors in it"),
    "inception": (lambda p: (p / "inception-2015-12-05.pt").is_file(), "no inception-2015-12-05.pt in it"),
    "latents": (lambda p: (p / "card.json").is_file(), "no card.json in it (python -m add_bench.data.coco encode)"),
}


def needed_paths(cfg: TrainConfig) -> list[tuple[str, Path | str, str]]:
    """(config key, path, kind) of every local weights, metric and data path a cell reads (kinds:
    ``PATH_CHECKS``, or ``coco:<split>``); the path is ``$VAR`` when the key is unset and its environment
    variable names the path (empty: nothing to read it from). Hub downloads are not listed."""
    from add_bench.data.coco import ENV_VAR as COCO_ENV
    from add_bench.evaluate import is_stable_diffusion
    from add_bench.provenance import resolve_weights

    teacher = resolve_weights(cfg.teacher.network)
    needs: list[tuple[str, Path | str, str]] = [("teacher.network", teacher, "folder")]
    if cfg.method == "add":
        student, fn, dcfg = resolve_weights(cfg.student.network), cfg.feature_network, cfg.discriminator
        needs.append(("student.network", student, "folder"))
        needs += featnet_paths("feature_network.name", "feature_network.weights", fn.name, fn.weights)
        if dcfg.c_img:
            needs += featnet_paths(
                "discriminator.c_img_network", "discriminator.c_img_weights", dcfg.c_img_network, dcfg.c_img_weights
            )
        if dcfg.c_text:
            needs += text_tower_paths(dcfg.c_text_network, dcfg.c_text_weights)
        if cfg.coco.root is not None or is_stable_diffusion(teacher) or is_stable_diffusion(student):
            needs.append(("coco.root", env_path(cfg.coco.root, COCO_ENV), f"coco:{cfg.coco.split}"))
        if cfg.coco_latents:
            needs.append(("coco_latents", Path(cfg.coco_latents), "latents"))
    if cfg.eval.metrics == "cluster":
        c = cfg.eval.cluster
        needs += [
            ("eval.cluster.inception", env_path(c.inception, "ADD_BENCH_INCEPTION"), "inception"),
            ("eval.cluster.clip_weights", env_path(c.clip_weights, "ADD_BENCH_CLIP"), "file"),
            ("eval.coco.root", env_path(cfg.eval.coco.root, COCO_ENV), f"coco:{cfg.eval.coco.split}"),
        ]
    else:
        needs += [
            ("eval.evalnet", resolve_weights(cfg.eval.evalnet), "folder"),
            ("eval.evalnet_ssl", resolve_weights(cfg.eval.evalnet_ssl), "folder"),
        ]
    return needs


def env_path(value: str | None, var: str) -> Path | str:
    """The path a key names, else its environment variable's; ``$VAR`` when both are empty."""
    import os

    value = value or os.environ.get(var)
    return Path(value) if value else f"${var}"


def featnet_paths(name_key: str, weights_key: str, name: str, weights: str | None) -> list[tuple[str, Path, str]]:
    """A feature network's weights: an embedded one's folder (the shipped ``featnet_<name>`` by default; none
    for the seeded random ViT), a cluster one's local file (none: its hub)."""
    from add_bench.networks.featnets import FEATURE_NETWORKS, featnet_folder

    spec = FEATURE_NETWORKS[name]
    if spec.kind == "embedded":
        if spec.objective == "none" and weights is None:
            return []
        return [(weights_key if weights is not None else name_key, featnet_folder(name, weights), "weights folder")]
    if weights is None or (spec.kind == "open_clip" and is_open_clip_tag(spec.arch, weights)):  # from the hub
        return []
    return [(weights_key, Path(weights), "file")]


def is_open_clip_tag(model_name: str, weights: str) -> bool:
    """Whether ``weights`` names one of open_clip's pretrained tags for ``model_name`` (not a local file)."""
    import open_clip

    return weights in open_clip.list_pretrained_tags_by_model(model_name)


def text_tower_paths(name: str, weights: str | None) -> list[tuple[str, Path, str]]:
    """c_text's weights: clip_s's folder (embedded) or an open_clip file (none: its hub)."""
    from add_bench.networks.featnets import TEXT_ENCODERS

    if TEXT_ENCODERS[name][0] == "embedded":
        return featnet_paths("discriminator.c_text_network", "discriminator.c_text_weights", name, weights)
    return [] if weights is None else [("discriminator.c_text_weights", Path(weights), "file")]


def missing_paths(cfg: TrainConfig) -> list[str]:
    """One line per path of :func:`needed_paths` that is not there: ``key=path: what is missing``. A diffusers
    Stable Diffusion folder (``model_index.json``) must also hold what loading it reads: the UNet, VAE and text
    encoder(s) weights, configs, tokenizer files and scheduler config (``networks.sd.missing_files``; no loading)."""
    from add_bench.evaluate import is_stable_diffusion
    from add_bench.networks.sd import missing_files

    out = []
    for key, path, kind in needed_paths(cfg):
        if isinstance(path, str):
            out.append(f"{key} is unset and {path} is empty")
        elif kind == "folder" and is_stable_diffusion(path) and (missing := missing_files(path)):
            out.append(f"{key}={path}: a diffusers Stable Diffusion folder without {'; '.join(missing)}")
        elif kind.startswith("coco:") and path.is_dir():
            split = kind.split(":")[1]
            for need in (f"annotations/captions_{split}.json", split):
                if not (path / need).exists():
                    out.append(f"{key}={path}: no {need} in it")
        elif kind.startswith("coco:"):
            out.append(f"{key}={path}: {PATH_CHECKS['folder'][1]}")
        elif not PATH_CHECKS[kind][0](path):
            out.append(f"{key}={path}: {PATH_CHECKS[kind][1]}")
    return out


_RECORDS: dict[tuple, tuple[dict[str, Path], dict[str, str | None]]] = {}


def recorded_inputs(cell_folder: Path) -> tuple[dict[str, Path], dict[str, str | None]]:
    """(the cell's input folders by role, the blob id each role had when the cell was computed — None if
    unknown); cached per content of the cell's files."""
    import json

    from add_bench.config import load
    from add_bench.provenance import blob_at_commit, display_path

    text, config = (cell_folder / "metrics.json").read_text(), (cell_folder / "config.yaml").read_text()
    key = (text, config)
    if key not in _RECORDS:
        metrics = json.loads(text)
        roles = inputs(load(TrainConfig, cell_folder / "config.yaml"))
        recorded = metrics.get("inputs")
        if isinstance(recorded, dict):
            blobs = {role: (recorded.get(role) or {}).get("blob") for role in roles}
        else:  # finished before cells recorded their inputs: the versions at the cell's commit
            commit = str((metrics.get("provenance") or {}).get("git_commit") or "")
            blobs = {
                role: blob_at_commit(commit, f"{display_path(folder)}/model.safetensors")
                for role, folder in roles.items()
            }
        _RECORDS[key] = roles, blobs
    return _RECORDS[key]


def changed_inputs(cell_folder: Path) -> list[str]:
    """The inputs (``"teacher (add_bench/weights/teacher_small)"``) whose weights differ from those the
    finished cell in ``cell_folder`` was computed with; [] when none differ or it cannot be told.

    Cells record their inputs' versions in ``metrics.json`` (``inputs``); for cells finished before that,
    the versions are read from git at the cell's recorded commit."""
    from add_bench.provenance import weights_versions

    try:
        roles, then = recorded_inputs(cell_folder)
        now = weights_versions(roles)
    except Exception:  # noqa: BLE001 - an unreadable cell is reported by whoever reads its results
        return []
    return [
        f"{role} ({v['path']})" for role, v in now.items() if then.get(role) not in (None, v["blob"], *v["aliases"])
    ]

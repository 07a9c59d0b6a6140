"""Run an ablation: expand a YAML file into cells (train an ADD student, then evaluate it), run them
locally or as a SLURM job array, and write tables and plots that mirror the paper.

    python -m add_bench.sweep ablations/loss_weighting.yaml [key=value ...] [--out DIR]
        [--launcher local|slurm] [--workers N|auto] [--procs-per-cell N] [--cells NAME,...] [--dry-run] [--status]
        [--collect]
    python -m add_bench.sweep loss.weighting=exp,sds,nfsd [key=a,b ...] [key=value ...] [options]

The second form is an ablation written on the command line (Hydra's sweep syntax): one row per
combination of the comma-separated values, the same cells (same ids) as a YAML file with those rows.

``--launcher slurm`` asks SLURM for what the preset's launch profile says (``presets/launch/<preset>.yaml``
beside the preset; none: launchers.SlurmConfig's defaults), with ``--slurm key=value`` on top; a cell runs
as its ``slurm.nodes`` × ``slurm.tasks_per_node`` data-parallel processes (``--procs-per-cell N`` locally:
gloo processes on the CPU), ``batch_size`` being the global batch (:mod:`add_bench.distributed`). With
``slurm.eval_job`` (set by the sd21 and sdxl launch profiles; ``--slurm eval_job=false``: inline) each cell is
evaluated by its own job once its training job has succeeded (``slurm.eval``: that job's request; :func:`train_cell`,
:func:`evaluate_cell`, ``scripts/README_slurm.md``).

Overrides: ``seeds=[0,1,2]``, ``base=<preset>``, ``eval_steps=[1,2,4]``, ``num_samples=N`` or any
training config key (``steps=500``, ``loss.lambda_distill=1``), applied to every cell.

A cell is identified by a hash of its resolved config, so a cell shared by several ablations (the
default row is in all of them) is trained once. Layout of the results folder (``--out``, default
``<runs>/sweeps`` with ``<runs>`` the preset's launch profile's ``runs``, else ``$ADD_BENCH_RUNS``, else
``runs/``): ``cells/<id>/`` (config.yaml, checkpoint.pt, log.jsonl, student/, trained.json once trained, eval_shards/ until
metrics.json is written, metrics.json or error.json, samples.npz) and ``<ablation>/`` (cells.json manifest, tables, plots). A re-run skips
finished cells, resumes unfinished ones from their checkpoint and retries failed ones; a failing cell
is recorded and the sweep goes on. The id names weights folders, not their content, so a cell also
records the version (git blob id) of each weights folder it read (``methods.inputs``): when one has
changed since (a retrained teacher), the cell is *stale*, the tables leave its numbers out and a re-run
moves its results to ``cells/<id>/stale/<finished_at>/`` and computes it again; a lock keeps a second sweep out of a folder in use. ``--cells``
runs only the named rows (e.g. more seeds of the promising rows of a probe); the tables list every row
with its finished / planned seed count.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from add_bench.config import (
    PRESETS_DIR,
    RUN_KEYS,
    SCHEMA_VERSION,
    TrainConfig,
    add_cfg_option,
    added_fields,
    apply_overrides,
    check_keys,
    choose,
    load,
    load_yaml,
    parse_overrides,
    preset,
    print_job,
    to_dict,
    typed,
    without,
)
from add_bench.errors import ConfigError, command_line
from add_bench.provenance import REPO_ROOT, atomic_write_json, atomic_write_text, provenance, weights_versions

DEFAULT_OUT = REPO_ROOT / "runs" / "sweeps"
PAPER_METRIC_NAMES = {"fid": "FID", "cs": "CLIP score"}  # an ablation file's paper_metric_names unless it gives them
SWEEP_OVERRIDES = {"seeds", "base", "eval_steps", "num_samples"}


# ------------------------------------------------------------------------------ ablation files
@dataclass
class ByBase:
    """A row's differences on one base (``by_base: {sd21: {label: ..., set: {...}}}``)."""

    label: str | None = None  # the row's label on this base
    set: dict[str, Any] = field(default_factory=dict)  # config keys set on this base, over the row's ``set``


@dataclass
class CellSpec:
    """A row of an ablation file (``cells:``): one cell per seed."""

    name: str  # the row's name in tables and for --cells
    label: str | None = None  # its text in tables (None: the name)
    default: bool = False  # the paper's default setting: the row every ablation of a table shares
    paper: dict[str, Any] | None = None  # the paper's numbers for the row, e.g. {fid: 20.6, cs: 0.319}
    # training config keys (dotted) → values, over the file's ``set``; ``eval_steps`` here is the row's own
    set: dict[str, Any] = field(default_factory=dict)
    bases: list[str] | None = None  # the bases the row exists on (None: every base)
    by_base: dict[str, ByBase] = field(default_factory=dict)  # per base: another label, further keys
    steps: int | None = None  # the step count the row reports (among its eval_steps; None: the table's, 1)


@dataclass
class AblationFile:
    """An ablation YAML file (ablations/*.yaml): rows of cells on one base, or ``include`` of other files.
    Sweep overrides on the command line (``base=``, ``seeds=``, ``eval_steps=``, ``num_samples=``) win."""

    name: str  # the results folder <out>/<name>/ (required unless ``include`` is given)
    table: str = ""  # the paper's table ("1d", "2", "probe"), for titles and the paper's numbers
    title: str | None = None  # the table's title (None: the name)
    base: str = "embedded"  # a preset of the ``base`` group (add_bench/presets/) or a YAML file
    seeds: list[int] = field(default_factory=lambda: [0])  # one cell per row and seed
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # sampling steps every cell is scored at
    num_samples: int | None = None  # eval.num_samples of every cell (None: the base's)
    set: dict[str, Any] = field(default_factory=dict)  # training config keys (dotted) set on every row
    cells: list[CellSpec] = field(default_factory=list)  # the rows (required unless ``include`` is given)
    include: list[str] | None = None  # ablation files (relative to this one) loaded in place of this one
    # the paper's metric names by key (None: {fid: FID, cs: CLIP score})
    paper_metric_names: dict[str, str] | None = None
    paper_note: str | None = None  # what the paper's numbers are (None: ADD-M on SD2.1, Table 1)


def ablation_file(path: Path, data: Any) -> AblationFile:
    """An ablation file's YAML content, checked key by key and typed (interpolations kept for the cells)."""
    check_keys(data, AblationFile, str(path))
    for key in ("name", "cells") if "include" not in data else ():
        if key not in data:
            raise ConfigError(f"{path}: missing key '{key}'")
    cells = data.get("cells") or []
    if not isinstance(cells, list):
        raise ConfigError(f"{path}: cells: expected a list of rows, got {type(cells).__name__}")
    specs = [cell_spec(spec, f"{path}: cells[{i}]") for i, spec in enumerate(cells)]
    values = typed(AblationFile, {k: v for k, v in data.items() if k != "cells"}, str(path))
    return AblationFile(**values | {"cells": specs})


def cell_spec(spec: Any, where: str) -> CellSpec:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: each cell needs a 'name' (and optional label, default, paper, set)")
    where = f"{where} ({spec['name']})"
    check_keys(spec, CellSpec, where)
    scales = spec.get("by_base") or {}
    if not isinstance(scales, dict):
        raise ConfigError(f"{where}: by_base: expected a mapping of base → {{label, set}}")
    by_base = {base: ByBase(**typed(ByBase, v, f"{where}: by_base.{base}")) for base, v in scales.items()}
    values = typed(CellSpec, {k: v for k, v in spec.items() if k != "by_base"}, where)
    steps = values["steps"]
    if steps is not None and steps <= 0:
        raise ConfigError(f"{where}: steps={steps!r}: expected a positive integer (the step count this row reports)")
    return CellSpec(**values | {"by_base": by_base})


@dataclass
class Cell:
    ablation: str
    name: str
    label: str
    default: bool
    paper: dict | None
    seed: int
    config: Any  # resolved TrainConfig
    id: str = ""
    steps: int | None = None  # the step count this row reports (None: the table's headline, 1)

    def manifest(self) -> dict[str, Any]:
        row = {
            "name": self.name,
            "label": self.label,
            "default": self.default,
            "seed": self.seed,
            "id": self.id,
            "paper": self.paper,
        }
        return row | ({"steps": self.steps} if self.steps is not None else {})


@dataclass
class Ablation:
    name: str
    table: str
    title: str
    path: Path
    eval_steps: list[int]
    cells: list[Cell] = field(default_factory=list)
    paper_metric_names: dict = field(default_factory=dict)
    paper_note: str | None = None  # what the paper's numbers are (default: ADD-M on SD2.1, Table 1)
    preset: Path | None = None  # the base preset its cells were loaded on


# ------------------------------------------------------------------------------ launch profiles
LAUNCH_DIR = "launch"  # the launch profile of <folder>/<preset>.yaml is <folder>/launch/<preset>.yaml
RUNS_ENV = "ADD_BENCH_RUNS"  # the results root of a sweep without --out (else the profile's runs, else runs/)


@dataclass
class Launch:
    """A preset's launch profile (launchers.LaunchProfile) with the command line's ``--slurm`` applied."""

    profile: Path | None  # None: the preset has none (SlurmConfig's defaults)
    slurm: Any  # launchers.SlurmConfig
    runs: str | None = None  # the profile's results root as written (an ${oc.env:...} is resolved when used)
    overrides: list[str] = field(default_factory=list)
    gpu: str | None = None  # the profile's GPU (add_bench.memory.GPUS): --dry-run's GPU plan

    def describe(self) -> str:
        from add_bench.provenance import display_path

        what = f"launch profile {display_path(self.profile)}" if self.profile else "the default SLURM request"
        return what + (f" with --slurm {' '.join(self.overrides)}" if self.overrides else "")

    def results_root(self) -> Path:
        """Where a sweep on this preset writes without --out: the profile's ``runs``, else $ADD_BENCH_RUNS,
        else runs/ in the repository; ``/sweeps`` below it."""
        if self.runs is None:
            return Path(os.environ.get(RUNS_ENV) or REPO_ROOT / "runs") / "sweeps"
        try:
            root = OmegaConf.create({"runs": self.runs}).runs
        except OmegaConfBaseException as e:
            raise ConfigError(
                f"{self.profile}: runs={self.runs}: {str(e).splitlines()[0]}; set {RUNS_ENV} to a results folder "
                "outside the repository (this preset's checkpoints are large), or give --out"
            ) from None
        return Path(root) / "sweeps"


def launch_profile(preset: Path, overrides: list[str] | None = None) -> Launch:
    """The launch profile beside ``preset`` (``launch/<preset>.yaml``; none: SlurmConfig's defaults), with
    ``--slurm key=value`` overrides on top."""
    from add_bench.launchers import LaunchProfile, check_slurm_config, slurm_request

    overrides = list(overrides or [])
    path = preset.parent / LAUNCH_DIR / preset.name
    if not path.is_file():
        return Launch(None, slurm_request({}, overrides), None, overrides)
    cfg = load(LaunchProfile, path)
    try:
        slurm = OmegaConf.to_container(cfg.slurm, resolve=True)
        check_slurm_config(slurm)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: slurm: {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    values = OmegaConf.to_container(cfg)
    if values["gpu"] is not None:
        from add_bench.memory import gpu

        try:
            gpu(values["gpu"], "gpu")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return Launch(path, slurm_request(slurm, overrides), values["runs"], overrides, values["gpu"])


def launch_profiles(ablations: list[Ablation], overrides: list[str] | None = None) -> dict[str, Launch]:
    """ablation name → the launch of its preset (ablations on one preset share one)."""
    by_preset: dict[Path, Launch] = {}
    for ab in ablations:
        if ab.preset not in by_preset:
            by_preset[ab.preset] = launch_profile(ab.preset or PRESETS_DIR / "embedded.yaml", overrides)
    return {ab.name: by_preset[ab.preset] for ab in ablations}


def default_out(launches: dict[str, Launch]) -> Path:
    """The results folder of a sweep without --out: its presets' results root (they must agree)."""
    roots = {name: launch.results_root() for name, launch in launches.items()}
    if len(set(roots.values())) > 1:
        listed = ", ".join(f"{name}: {root}" for name, root in roots.items())
        raise ConfigError(f"the ablations' presets write to different results roots ({listed}); give --out")
    return next(iter(roots.values()), DEFAULT_OUT)


# How a cell is run, not what it computes (resume is exact at any checkpoint interval; the thread
# count is the launcher's choice): left out of the cell id, so that --workers N or a different
# checkpoint interval finds the same finished cells.
EXECUTION_KEYS = (
    *RUN_KEYS,
    "gradient_checkpointing",  # recomputes activations: the same numbers within float tolerance
    "vae_decode_chunk",  # decodes in chunks: the same numbers within float tolerance
    "coco_latents",  # pre-encoded VAE posteriors: the same latents within float tolerance
)


def cell_id(config: Any) -> str:
    """Hash of the resolved training + evaluation config (seed included, ``EXECUTION_KEYS`` left out, and the
    fields declared with ``config.added`` left out at the value that reproduces older cells): equal configs,
    one cell."""
    values = {k: v for k, v in to_dict(config).items() if k not in EXECUTION_KEYS}
    blob = json.dumps(without(values, added_fields(TrainConfig)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Sweep-level overrides (seeds, base, eval_steps, num_samples) vs training config overrides."""
    sweep, train = {}, []
    for o in parse_overrides(overrides):
        key = o.key_or_group
        if key in SWEEP_OVERRIDES and not o.is_sweep_override() and o.value() is not None:
            sweep[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={o.get_value_element_as_str()}"]))[key]
        else:
            train.append(o.input_line)
    return sweep, train


def load_ablations(path: str | Path, overrides: list[str] | None = None) -> list[Ablation]:
    """One ablation file (or a file that ``include``s others) → ablations with resolved cells."""
    path = Path(path)
    data = ablation_file(path, OmegaConf.to_container(load_yaml(path)))
    sweep_over, train_over = split_overrides(list(overrides or []))
    if data.include is not None:
        out = []
        for inc in data.include:
            out += load_ablations(path.parent / inc, overrides)
        return out
    return [expand(path, data, sweep_over, train_over)]


def command_line_ablation(overrides: list[str]) -> tuple[AblationFile, list[str]]:
    """Sweep overrides in Hydra's grammar (``key=a,b,c``, ``key=range(0,3)``, ``key=choice(a,b)``) → an ablation
    with one row per combination of values, as if written in a YAML file; the other overrides are returned
    to apply to every row."""
    axes, rest = [], []
    for o in parse_overrides(overrides):
        if o.key_or_group in SWEEP_OVERRIDES or not o.is_sweep_override():
            rest.append(o.input_line)
        else:
            axes.append((o.key_or_group, list(o.sweep_string_iterator())))
    if not axes:
        raise ConfigError(
            f"{' '.join(overrides) or '(nothing)'}: no ablation file and no key=a,b,... sweep; give "
            "ablations/<name>.yaml or at least one key with several values (e.g. loss.weighting=exp,sds)"
        )
    combos: list[list[tuple[str, str]]] = [[]]
    for key, values in axes:
        combos = [c + [(key, v)] for c in combos for v in values]
    cells = []
    for combo in combos:
        sets = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in combo]))
        flat = {k: OmegaConf.select(OmegaConf.create(sets), k) for k, _ in combo}
        cells.append(CellSpec(",".join(v for _, v in combo), ", ".join(f"{k}={v}" for k, v in combo), set=flat))
    name = "+".join(k for k, _ in axes)
    return AblationFile(name, title=f"Sweep over {', '.join(k for k, _ in axes)} (command line)", cells=cells), rest


def expand(path: Path, data: AblationFile, sweep_over: dict, train_over: list[str]) -> Ablation:
    base_name, base_layer = base_preset(sweep_over.get("base", data.base), path)
    seeds = sweep_over.get("seeds", data.seeds)
    eval_steps = sweep_over.get("eval_steps", data.eval_steps)
    num_samples = sweep_over.get("num_samples", data.num_samples)
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise ConfigError(f"{path}: seeds={seeds!r}: expected a non-empty list of integers")
    ablation = Ablation(
        data.name,
        data.table,
        data.name if data.title is None else data.title,
        path,
        list(eval_steps),
        paper_metric_names=PAPER_METRIC_NAMES if data.paper_metric_names is None else data.paper_metric_names,
        paper_note=data.paper_note,
        preset=preset_file(sweep_over.get("base", data.base), base_name),
    )
    from add_bench import methods

    for i, spec in enumerate(data.cells):
        where = f"{path}: cells[{i}] ({spec.name})"
        if base_name not in (spec.bases if spec.bases is not None else [base_name]):
            continue  # a row of one scale only (e.g. the embedded random-ViT floor, the cluster DINOv1 row)
        scale = spec.by_base.get(base_name, ByBase())
        sets = {**data.set, **spec.set, **scale.set}
        label = scale.label if scale.label is not None else spec.name if spec.label is None else spec.label
        # a cell's own eval_steps (a method row: DPM-Solver at 8 and 25 steps) unless the command line sets them
        steps_here = sweep_over.get("eval_steps", sets.pop("eval_steps", None) or eval_steps)
        for seed in seeds:
            extra = {**sets, "seed": seed, "eval_steps": list(steps_here)}
            if num_samples is not None:
                extra["eval.num_samples"] = num_samples
            try:
                cfg = load(TrainConfig, extra=extra, preset=base_layer)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            cfg = resolved(load_cli(cfg, train_over), f"{where} on base {base_name}")
            if not methods.reads(cfg.method, "seed"):
                cfg.seed = 0  # the same computation at every seed: one cell, shared by the row's seeds
            validate_names(cfg, where)
            check_row_reads(cfg.method, {**spec.set, **scale.set}, where)
            if spec.steps is not None and spec.steps not in cfg.eval_steps:
                raise ConfigError(
                    f"{where}: steps={spec.steps} is not among the cell's eval_steps={list(cfg.eval_steps)}"
                )
            c = Cell(ablation.name, spec.name, label, spec.default, spec.paper, seed, cfg, steps=spec.steps)
            c.id = cell_id(cfg)
            ablation.cells.append(c)
    return ablation


def preset_file(base: str, name: str) -> Path:
    """The YAML file of a base: the file given, or the ``base`` group option's file in add_bench/presets/
    (beside which its launch profile lives)."""
    return Path(base) if str(base).endswith(".yaml") and Path(base).is_file() else PRESETS_DIR / f"{name}.yaml"


def base_preset(base: str, path: Path) -> tuple[str, tuple[str, Any]]:
    """``base``: a preset of the ConfigStore's ``base`` group (add_bench/presets/) or a YAML file → its name and
    (its name in messages, its config)."""
    if str(base).endswith(".yaml") and Path(base).is_file():
        return Path(base).stem, (str(base), load_yaml(base))
    return base, (f"base={base}", preset(base, f"{path}: base"))


def resolved(cfg: Any, where: str) -> Any:
    """The config with interpolations (``${oc.env:ADD_BENCH_SD21}`` in cluster presets) replaced by their
    values, so that a cell's stored config and id name real paths; an unset variable is a clear error."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{where}: {str(e).splitlines()[0]} (cluster presets read local paths from "
            "ADD_BENCH_* environment variables: see the preset file)"
        ) from None
    out = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
    OmegaConf.set_struct(out, True)
    return out


def load_cli(cfg: Any, overrides: list[str]) -> Any:
    return apply_overrides(cfg, overrides, TrainConfig, "command line") if overrides else cfg


def validate_names(cfg: Any, where: str) -> None:
    """Registry names are checked at expansion time, before anything runs."""
    from add_bench.methods import validate
    from add_bench.networks.featnets import FEATURE_NETWORKS

    try:
        validate(cfg)
        if cfg.method != "add":
            return
        choose(FEATURE_NETWORKS, cfg.feature_network.name, "feature_network.name")
        if cfg.discriminator.c_img:
            choose(FEATURE_NETWORKS, cfg.discriminator.c_img_network, "discriminator.c_img_network")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_row_reads(method: str, row_set: dict, where: str) -> None:
    """A row's own ``set:`` (and its ``by_base`` one) holds only keys its method reads (the file's ``set:`` and
    the command line apply to every row, whatever its method)."""
    from add_bench.methods import check_reads

    try:
        check_reads(method, [k for k in row_set if k not in ("method", "eval_steps")])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------ one cell
def cell_status(workdir: Path) -> str:
    """new | partial | trained (not evaluated yet) | failed | done | stale (done, but a weights folder it read has
    changed since)."""
    if (workdir / "metrics.json").is_file():
        from add_bench.methods import changed_inputs

        return "stale" if changed_inputs(workdir) else "done"
    if (workdir / "error.json").is_file():
        return "failed"
    if (workdir / TRAINED).is_file():
        return "trained"
    if (workdir / "checkpoint.pt").is_file():
        return "partial"
    return "new"


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock`` (released when the process dies). On a
    filesystem without ``flock`` (some parallel filesystems refuse it) the lock is ``<folder>/.lock.excl``,
    created with O_EXCL and removed on exit; one left by a dead process of this host is taken over."""

    def __init__(self, folder: Path, what: str):
        self.path, self.what = folder / ".lock", what
        self.fd: int | None = None
        self.excl: Path | None = None

    def __enter__(self) -> FolderLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.path.parent}: results folder not writable ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            raise ConfigError(
                f"{self.path.parent}: {self.what} in use by {owner}; wait for it or use another --out"
            ) from None
        except OSError:  # no flock on this filesystem
            os.close(self.fd)
            self.fd = None
            self.excl = self.exclusive_file(self.path.with_name(".lock.excl"))
            return self
        os.ftruncate(self.fd, 0)
        os.write(self.fd, owner_text().encode())
        return self

    def exclusive_file(self, path: Path, retry: bool = True) -> Path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = path.read_text().strip()
            if retry and stale_owner(owner):
                path.unlink(missing_ok=True)
                return self.exclusive_file(path, retry=False)
            raise ConfigError(
                f"{self.path.parent}: {self.what} in use by {owner or 'another process'} (lock file {path}: this "
                "filesystem has no flock); wait for it, or delete the file if that process no longer runs"
            ) from None
        os.write(fd, owner_text().encode())
        os.close(fd)
        return path

    def __exit__(self, *exc) -> None:
        if self.excl is not None:
            self.excl.unlink(missing_ok=True)
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def owner_text() -> str:
    return f"pid {os.getpid()} on {os.uname().nodename}"


def stale_owner(owner: str) -> bool:
    """A lock owner ("pid N on HOST") that is a process of this host which no longer runs."""
    parts = owner.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != os.uname().nodename:
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def run_cell(cell: str, workdir: str) -> dict[str, Any]:
    """Train (or resume) and evaluate one cell from ``<workdir>/config.yaml``; write metrics.json or error.json.

    Module-level and self-contained, so local workers and SLURM array tasks can call it. Run as several
    processes (``--procs-per-cell``, ``slurm.tasks_per_node``: :mod:`add_bench.distributed`), process 0 locks
    the cell, decides whether it trains and evaluates it; the others only train with it. Both phases of
    :func:`train_cell` and :func:`evaluate_cell` in one call."""
    return cell_phases(cell, Path(workdir), train=True, evaluate=True)


def train_cell(cell: str, workdir: str) -> dict[str, Any]:
    """The training phase of a cell evaluated by its own job (``slurm.eval_job``): train (or resume) and write
    ``trained.json``, the record :func:`evaluate_cell` reads; returns it. A trained or done cell is left as it is."""
    return cell_phases(cell, Path(workdir), train=True, evaluate=False)


def evaluate_cell(cell: str, workdir: str) -> dict[str, Any]:
    """The evaluation phase: the generators ``trained.json`` names, sampled in resumable shards and scored;
    writes metrics.json and samples.npz (a done cell is left as it is). One process."""
    return cell_phases(cell, Path(workdir), train=False, evaluate=True)


TRAINED = "trained.json"  # a trained cell's generators (methods.Generators) and inputs: what evaluation reads


def cell_phases(cell: str, wd: Path, train: bool, evaluate: bool) -> dict[str, Any]:
    """The phases of one cell (train, evaluate or both) under the cell's lock; a failure writes error.json.
    Returns metrics.json's content, or trained.json's when the cell is not evaluated here."""
    from add_bench import distributed

    if not distributed.processes().is_writer:
        return train_with_writer(cell, wd)
    with FolderLock(wd, f"cell {cell}"):
        status = cell_status(wd)
        if status == "stale":
            archive_stale(wd)
        (wd / "error.json").unlink(missing_ok=True)
        if status == "done":
            join_cell(wd, False)
            distributed.finish()
            return json.loads((wd / "metrics.json").read_text())
        try:
            record = train_phase(cell, wd) if train else read_trained(wd)
            return evaluate_phase(cell, wd, record) if evaluate else record
        except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
            atomic_write_json(
                wd / "error.json",
                {"cell": cell, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
            )
            raise


def train_with_writer(cell: str, wd: Path) -> dict[str, Any]:
    """A process other than 0 of a cell run as several: trains with process 0 when process 0 decides so."""
    from add_bench import distributed
    from add_bench.methods import make

    try:
        if join_cell(wd, False):  # process 0's decision
            make(load(TrainConfig, wd / "config.yaml"), wd)
    finally:
        distributed.finish()
    return {"cell": cell, "process": distributed.processes().rank}


def train_phase(cell: str, wd: Path) -> dict[str, Any]:
    """trained.json's record: read when the cell is trained already, else the cell is trained (or resumed:
    ``methods.make``) and the record written, atomically. The versions of the weights it reads are taken before
    training reads them."""
    from add_bench import distributed
    from add_bench.methods import inputs, make

    done = (wd / TRAINED).is_file()
    if not join_cell(wd, not done):
        distributed.finish()
        return read_trained(wd)
    start = time.time()
    cfg = load(TrainConfig, wd / "config.yaml")
    versions = weights_versions(inputs(cfg))
    try:
        made = make(cfg, wd)  # trains the method's generator(s), or nothing (method=teacher)
    finally:
        distributed.finish()  # the other processes are done: process 0 evaluates alone
    record = {
        "cell": cell,
        "method": cfg.method,
        "checkpoints": {str(steps): str(folder) for steps, folder in made.checkpoints.items()},
        "sampler": made.sampler,
        "cfg_scale": made.cfg_scale,
        "train_steps": made.train_steps,
        "train_wall_time_s": made.train_wall_time_s,
        "inputs": versions,
        "wall_time_s": round(time.time() - start, 2),  # this phase's, for the cell's provenance
    }
    atomic_write_json(wd / TRAINED, record)
    return record


def read_trained(wd: Path) -> dict[str, Any]:
    """The cell's trained.json (what :func:`train_phase` wrote); an error when the cell is not trained."""
    from add_bench.errors import DataError

    path = wd / TRAINED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found; the cell is not trained (its training phase, train_cell, writes it)"
        ) from None
    except ValueError as e:
        raise DataError(f"{path}: malformed JSON ({e}); remove it and re-run the cell's training phase") from None


def generators(record: dict[str, Any]):
    """trained.json's record → the methods.Generators that training returned."""
    from add_bench.methods import Generators

    return Generators(
        {int(steps): Path(folder) for steps, folder in record["checkpoints"].items()},
        record["sampler"],
        record["cfg_scale"],
        record["train_steps"],
        record["train_wall_time_s"],
    )


def evaluate_phase(cell: str, wd: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the trained cell (``record``: trained.json's) in shards; write samples.npz, then metrics.json."""
    cfg = load(TrainConfig, wd / "config.yaml")
    made = generators(record)
    eval_start = time.time()
    result, grids = evaluate_generators(made, cfg, wd / EVAL_SHARDS)
    result["cell"] = cell
    result["method"] = cfg.method
    result["train"] = {
        "steps": made.train_steps,
        "wall_time_s": made.train_wall_time_s,
        "last_log": last_log_row(wd / "log.jsonl"),
    }
    result["eval_wall_time_s"] = round(time.time() - eval_start, 1)
    result["inputs"] = record["inputs"]
    result["provenance"] = provenance(
        cfg,
        cfg.seed,
        record["wall_time_s"] + time.time() - eval_start,
        command=f"python -m add_bench.sweep (cell {cell})",
        schema_version=SCHEMA_VERSION,  # the schema the stored config.yaml was loaded into
    )
    import numpy as np

    from add_bench.provenance import atomic_path

    with atomic_path(wd / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, labels=next(iter(grids.values())).labels, **{k: v.images for k, v in grids.items()})
    atomic_write_json(wd / "metrics.json", result)
    shutil.rmtree(wd / EVAL_SHARDS, ignore_errors=True)  # only a resume reads them; metrics.json is written
    return result


def join_cell(wd: Path, train: bool) -> bool:
    """A cell run as several processes: join them (the process group) and return process 0's ``train``
    (whether the cell trains; every process passes its own, process 0's wins). Alone: ``train``."""
    from add_bench import distributed

    procs = distributed.processes()
    if procs.world == 1:
        return train
    cfg = load(TrainConfig, wd / "config.yaml")
    check_processes(cfg, procs.world, f"cell {wd.name}")
    distributed.init(distributed.resolve_device(cfg.device, procs.local_rank))
    return bool(distributed.gather_objects(train)[0])


def check_processes(cfg: Any, world: int, where: str) -> None:
    """A cell can run as ``world`` data-parallel processes: an ADD cell whose global batch_size splits, and whose
    micro_batch_size (> 0) divides each process's share (or is at least that share: one micro-batch)."""
    from add_bench import distributed

    if world == 1:
        return
    if cfg.method != "add":
        raise ConfigError(
            f"{where}: method={cfg.method!r} with {world} processes per cell; accepted: method=add, or one process "
            "(--procs-per-cell 1, slurm.nodes=1 slurm.tasks_per_node=1)"
        )
    from add_bench.execution import micro_batches

    try:
        local = distributed.local_batch(cfg, distributed.Processes(0, world, 0))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:  # what each process's training step splits its share into
        micro_batches(local, cfg.micro_batch_size, cfg.batch_size)
    except ConfigError as e:
        raise ConfigError(f"{where}, {world} processes: {e}, or another process count") from None


def archive_stale(wd: Path) -> Path:
    """Move a stale cell's outputs (everything but its config and lock) to ``stale/<finished_at>/`` with
    a ``why.json``, so that the cell re-runs from scratch and nothing computed is lost."""
    from add_bench.methods import changed_inputs

    changed = changed_inputs(wd)
    finished = json.loads((wd / "metrics.json").read_text()).get("provenance", {}).get("finished_at") or "unknown"
    dest = wd / "stale" / str(finished).replace(":", "")
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(wd.iterdir()):
        if p.name not in ("config.yaml", ".lock", "stale", "metrics.json"):
            os.replace(p, dest / p.name)
    atomic_write_json(dest / "why.json", {"changed_inputs": changed, "moved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    os.replace(wd / "metrics.json", dest / "metrics.json")  # last: until here the cell still reads as stale
    print(
        f"cell {wd.name}: inputs changed since it ran ({'; '.join(changed)}); its results moved to {dest}, "
        "re-running it",
        file=sys.stderr,
    )
    return dest


EVAL_SHARDS = "eval_shards"  # a cell's evaluation samples, in resumable shards (evaluate.Shards)


def evaluate_generators(made, cfg: Any, shards: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score every step count of a method's generators (one evaluation per weights folder) and draw
    a 100-sample grid per step count; rows in step order. ``shards``: where the samples are kept in
    shards, so that an interrupted evaluation resumes without sampling the finished ones again."""
    from add_bench.evaluate import evaluate, load_generator

    rows, kinds, grids = [], set(), {}
    grid_cfg = cfg.eval.copy()
    grid_cfg.num_samples = grid_cfg.batch_size = min(100, cfg.eval.num_samples)
    for folder, steps in made.groups().items():
        r = evaluate(folder, steps, cfg.eval, made.sampler, made.cfg_scale, device=cfg.device, shards=shards)
        rows += r["rows"]
        kinds.add(r["kind"])
        _, draw = load_generator(folder, grid_cfg, made.cfg_scale, cfg.device)
        grids.update({s: draw(made.sampler, s).samples for s in steps})
    folders = sorted({str(f) for f in made.checkpoints.values()})
    result = {
        "checkpoint": folders[0] if len(folders) == 1 else folders,
        "kind": "/".join(sorted(kinds)),
        "num_samples": cfg.eval.num_samples,
        "rows": sorted(rows, key=lambda r: r["steps"]),
    }
    return result, {f"steps_{s}": grids[s] for s in sorted(grids)}


def last_log_row(path: Path) -> dict[str, Any] | None:
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


# ------------------------------------------------------------------------------ the sweep
def prepare(ablations: list[Ablation], out: Path, only: set[str] | None = None) -> dict[str, Cell]:
    """Write each ablation's manifest and the config.yaml of each unique cell (of those in ``only``);
    return id → cell."""
    unique: dict[str, Cell] = {}
    for ab in ablations:
        for c in ab.cells:
            unique.setdefault(c.id, c)
            folder = out / "cells" / c.id
            if (only is None or c.id in only) and not (folder / "config.yaml").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(c.config))
    write_manifests(ablations, out)
    return unique


def write_manifests(ablations: list[Ablation], out: Path) -> None:
    """``<out>/<ablation>/cells.json``: the ablation's rows, their cell ids and the paper's numbers."""
    for ab in ablations:
        source = ab.path.resolve()
        source = source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source
        atomic_write_json(
            out / ab.name / "cells.json",
            {
                "ablation": ab.name,
                "table": ab.table,
                "title": ab.title,
                "source": str(source),
                "paper_metric_names": ab.paper_metric_names,
                "eval_steps": ab.eval_steps,
                **({"paper_note": ab.paper_note} if ab.paper_note else {}),
                "cells": [c.manifest() for c in ab.cells],
            },
        )


def training_iterations(cfg: Any) -> int:
    """Iterations a cell trains for: ADD's ``steps``, none for the teacher, every stage of progressive distillation."""
    if cfg.method == "teacher":
        return 0
    if cfg.method == "progressive":
        from add_bench.progressive import stages

        return stages(cfg)[-1].end
    return cfg.steps


ASSUMED_SECONDS_PER_STEP = 0.5  # ADD step at batch 32 when no cell has finished in the folder


def seconds_per_sample_step(out: Path) -> float | None:
    """Measured training seconds per step per sample, averaged over the finished cells in ``out``."""
    rates = []
    for m in (out / "cells").glob("*/metrics.json"):
        r = json.loads(m.read_text())
        if r.get("train", {}).get("steps"):
            bs = r["provenance"]["config"]["batch_size"]
            rates.append(r["train"]["wall_time_s"] / r["train"]["steps"] / bs)
    return sum(rates) / len(rates) if rates else None


def estimate_minutes(cell: Cell, per_sample_step: float) -> float:
    """Training time (seconds per step per sample × batch × iterations) plus evaluation at ≈ 1.5 ms per
    network evaluation per sample."""
    cfg = cell.config
    train_s = training_iterations(cfg) * cfg.batch_size * per_sample_step
    from add_bench.evaluate import nfe_per_sample

    eval_s = cfg.eval.num_samples * sum(nfe_per_sample(s, cfg.sampling.cfg_scale) for s in cfg.eval_steps) * 1.5e-3
    return (train_s + eval_s) / 60


def print_plan(
    ablations: list[Ablation], cells: dict[str, Cell], out: Path, only: set[str] | None = None, workers: int = 1
) -> float:
    total, left = 0.0, 0
    measured = seconds_per_sample_step(out)
    per_sample_step = measured if measured is not None else ASSUMED_SECONDS_PER_STEP / 32
    print(f"{'ablation':<16} {'cell':<22} {'seed':>4}  {'id':<12}  {'status':<8} {'est. min':>8}")
    seen = set()
    for ab in ablations:
        for c in ab.cells:
            status = cell_status(out / "cells" / c.id)
            if only is not None and c.id not in only and status != "done":
                status = "skipped"  # not selected by --cells
            todo = status not in ("done", "skipped") and c.id not in seen
            left += todo
            est = estimate_minutes(c, per_sample_step) if todo else 0.0
            shared = " (shared)" if c.id in seen else ""
            seen.add(c.id)
            total += est
            print(f"{ab.name:<16} {c.name:<22} {c.seed:>4}  {c.id:<12}  {status:<8} {est:>8.1f}{shared}")
    done = sum(cell_status(out / "cells" / i) == "done" for i in cells)
    w, wall = min(workers, left), ""
    if w > 1:  # cells run in rounds of w (launchers.thread_plan); a round of more cells than cores shares them
        from add_bench.launchers import round_sizes, usable_cores

        sizes = round_sizes(left, w)
        cell_rounds = sum(max(1.0, k / usable_cores()) for k in sizes)
        wall = f" (≈ {total / left * cell_rounds:.0f} min wall in {len(sizes)} round(s) of {w} workers)"
    basis = (
        ""
        if measured is not None
        else f"; no finished cell here, so {ASSUMED_SECONDS_PER_STEP} s per ADD step "
        "at batch 32 is assumed (python -m add_bench.bench measures this machine's)"
    )
    print(
        f"{len(cells)} unique cells, {done} done; estimated {total:.0f} min of work left on this machine{wall}{basis}"
    )
    return total


def print_requests(launches: dict[str, Launch]) -> None:
    """What each job array asks SLURM for, per launch profile."""
    seen: set[int] = set()
    for launch in launches.values():
        if id(launch) not in seen:
            seen.add(id(launch))
            print(f"slurm ({launch.describe()}): {request_text(launch.slurm)}")
            if launch.slurm.eval_job:
                from add_bench.launchers import eval_request

                print(
                    f"slurm evaluation jobs (slurm.eval, each after its cell's training): "
                    f"{request_text(eval_request(launch.slurm))}"
                )


def request_text(slurm: Any) -> str:
    """A SLURM request (launchers.SlurmConfig) as key=value and its extra sbatch flags."""
    values = dataclasses.asdict(slurm)
    extra = values.pop("additional_parameters")
    differences = values.pop("eval")
    shown = " ".join(f"{k}={v}" for k, v in values.items() if v is not None and (k != "eval_job" or v))
    shown += "".join(f" --{str(k).replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in extra.items())
    return shown + (f" eval={differences}" if differences and slurm.eval_job else "")  # unused when inline


def collect(ablations: list[Ablation], out: Path) -> None:
    from add_bench.tables import write_tables

    for ab in ablations:
        written = write_tables(out / ab.name)
        print(f"{ab.name}: wrote {', '.join(sorted(str(p) for p in written.values()))}", file=sys.stderr)


def selected_ids(ablations: list[Ablation], names: list[str] | None, source: str | Path = "") -> set[str] | None:
    """The cell ids of the rows named by ``--cells`` (every seed of each), or None for all rows."""
    if not names:
        return None
    known = {c.name for ab in ablations for c in ab.cells}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"--cells {','.join(unknown)}: no such row in {source or ablations[0].path}; rows: "
            f"{', '.join(sorted(known))}"
        )
    return {c.id for ab in ablations for c in ab.cells if c.name in names}


def parse_workers(value: str | int) -> int:
    """``--workers``: a positive integer, or ``auto`` = the cores this process may use. One 1-thread
    cell per core measured 1.42× the ADD steps per second of one cell on both cores; one worker more
    than cores (oversubscribed, 1 thread each) 1.34×, so auto stays at one per core
    (``python -m add_bench.bench --parallel``: results/bench/local_layout.json)."""
    if str(value) == "auto":
        from add_bench.launchers import usable_cores

        return usable_cores()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--workers {value!r}: must be a positive integer or 'auto'")
    return n


def run_sweep(
    ablations: list[Ablation],
    out: Path,
    launcher: str = "local",
    workers: int = 1,
    launches: dict[str, Launch] | None = None,
    only: set[str] | None = None,
    procs_per_cell: int = 1,
) -> dict:
    """Train and evaluate every unfinished cell (or only the ids in ``only``), then write the tables.
    ``launcher='slurm'``: one job array per launch profile (``launches``: ablation name → Launch; default: each
    ablation's preset's profile), each cell as the profile's nodes × tasks_per_node processes.
    ``launcher='local'``: ``procs_per_cell`` > 1 runs the cells one after another, each as that many gloo
    processes on the CPU (``workers`` is then 1)."""
    from tqdm import tqdm

    from add_bench.launchers import check_launcher, run_local

    check_launcher(launcher)
    launches = launches or launch_profiles(ablations)
    if launcher == "slurm":
        check_paths(ablations, out, only)  # nothing is submitted that would fail on the node for a missing path
    check_splits(ablations, out, only, launcher, launches, procs_per_cell)
    with FolderLock(out, "results folder"):
        cells = prepare(ablations, out, only)
        status = {i: cell_status(out / "cells" / i) for i in cells}
        unfinished = [i for i in cells if status[i] != "done"]
        todo = [i for i in unfinished if only is None or i in only]
        skipped = "" if only is None else f", {len(unfinished) - len(todo)} not selected by --cells"
        if stale := [i for i in todo if status[i] == "stale"]:
            skipped += f", {len(stale)} stale (a weights folder they read has changed since: re-run)"
        print(
            f"sweep → {out}: {len(cells)} cells, {len(cells) - len(unfinished)} already done{skipped}", file=sys.stderr
        )
        if launcher == "slurm":
            submitted: dict[str, str] = {}
            evaluations: dict[str, str] = {}
            for launch, group in launch_groups(ablations, launches, todo):
                ids, eval_ids = submit_cells(group, out / "cells", launch)
                submitted.update(zip(group, ids))
                evaluations.update(zip(group, eval_ids))
            then = (
                f"; evaluation, each after its cell's training: {', '.join(evaluations.values())}"
                if evaluations
                else ""
            )
            print(
                f"submitted: {', '.join(submitted.values()) or 'nothing to do'}{then}; "
                f"follow with --status, collect with --collect",
                file=sys.stderr,
            )
            return {"submitted": submitted} | ({"evaluation": evaluations} if evaluations else {})
        results: dict[str, Any] = {}
        if min(workers, len(todo)) > 1 and procs_per_cell == 1:
            results = run_local([(i, run_cell) for i in todo], workers=workers, folder=out / "cells")
        else:
            for i in tqdm(todo, desc="cells", dynamic_ncols=True):
                c = cells[i]
                print(f"\ncell {i}: {c.ablation}/{c.name} seed {c.seed} → {out / 'cells' / i}", file=sys.stderr)
                results.update(
                    run_local([(i, run_cell)], workers=1, folder=out / "cells", procs_per_cell=procs_per_cell)
                )
        failed = {i: r for i, r in results.items() if isinstance(r, str)}
        for i, err in failed.items():
            print(
                f"cell {i} ({cells[i].ablation}/{cells[i].name}) failed: {err}; recorded in "
                f"{out / 'cells' / i / 'error.json'}",
                file=sys.stderr,
            )
        collect(ablations, out)
        return results


def submit_cells(ids: list[str], folder: Path, launch: Launch) -> tuple[list[str], list[str]]:
    """Submit cells as ``launch`` asks: one array that trains and evaluates each cell (``run_cell``), or, with
    ``slurm.eval_job``, a training array (``train_cell``) and an evaluation array (``evaluate_cell``, requesting
    ``launchers.eval_request``) whose task i starts once training task i has succeeded and is cancelled when it
    failed. Returns (the job ids that train, the evaluation job ids: [] without eval_job); each cell's
    evaluation job is recorded in ``launchers.EVAL_JOBS_FILE`` (and forgotten without eval_job)."""
    from add_bench.launchers import EVAL_JOBS_FILE, eval_request, record_jobs, submit_slurm

    if not launch.slurm.eval_job:
        submitted = submit_slurm([(i, run_cell) for i in ids], folder, launch.slurm, launch.describe())
        record_jobs(folder / EVAL_JOBS_FILE, dict.fromkeys(ids))  # an earlier submission's evaluation jobs
        return submitted, []
    trains = submit_slurm([(i, train_cell) for i in ids], folder, launch.slurm, launch.describe())
    try:
        evaluations = submit_slurm(
            [(i, evaluate_cell) for i in ids],
            folder,
            eval_request(launch.slurm),
            f"{launch.describe()} (evaluation: slurm.eval)",
            after=trains,
            jobs_file=EVAL_JOBS_FILE,
        )
    except ConfigError as e:  # e.g. sbatch refused the evaluation partition: no training without its evaluation
        from add_bench.launchers import cancel_jobs

        cancel_jobs(trains)
        raise ConfigError(f"{e}; the training jobs {', '.join(trains)} were cancelled") from None
    return trains, evaluations


def check_splits(
    ablations: list[Ablation],
    out: Path,
    only: set[str] | None,
    launcher: str,
    launches: dict[str, Launch],
    procs_per_cell: int = 1,
) -> None:
    """Every cell still to run can run as the processes its launch gives it (``--procs-per-cell``, or the
    SLURM profile's nodes × tasks_per_node: ``check_processes``), else an error naming the cell and the
    launch, before anything runs or is submitted."""
    from add_bench.launchers import processes_per_cell

    for ab in ablations:
        if launcher == "slurm":
            world, launch = processes_per_cell(launches[ab.name].slurm), launches[ab.name].describe()
        else:
            world, launch = procs_per_cell, f"--procs-per-cell {procs_per_cell}"
        for c in ab.cells:
            if (only is None or c.id in only) and cell_status(out / "cells" / c.id) != "done":
                check_processes(c.config, world, f"{launch}: cell {c.id} ({ab.name}/{c.name} seed {c.seed})")


def check_paths(ablations: list[Ablation], out: Path, only: set[str] | None = None) -> None:
    """Every weights, metric and data path the cells still to run read (methods.needed_paths) exists; else
    one error listing each missing path with the config key that names it and the cells that read it."""
    from add_bench.methods import missing_paths

    missing: dict[str, list[str]] = {}
    seen: set[str] = set()
    for ab in ablations:
        for c in ab.cells:
            if c.id in seen or (only is not None and c.id not in only) or cell_status(out / "cells" / c.id) == "done":
                continue
            seen.add(c.id)
            for problem in missing_paths(c.config):
                missing.setdefault(problem, []).append(f"{c.id} ({c.ablation}/{c.name} seed {c.seed})")
    if missing:
        lines = [
            f"  {problem}; cells: {', '.join(cells[:3])}" + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")
            for problem, cells in missing.items()
        ]
        raise ConfigError(
            f"{len(missing)} path(s) that cells read are missing; nothing was run or submitted:\n" + "\n".join(lines)
        )


def launch_groups(ablations: list[Ablation], launches: dict[str, Launch], ids: list[str]) -> list[tuple[Launch, list]]:
    """``ids`` grouped by the launch of the ablation that lists them first (one job array per launch)."""
    groups: dict[int, tuple[Launch, list[str]]] = {}
    placed: set[str] = set()
    for ab in ablations:
        launch = launches[ab.name]
        for c in ab.cells:
            if c.id in ids and c.id not in placed:
                placed.add(c.id)
                groups.setdefault(id(launch), (launch, []))[1].append(c.id)
    return list(groups.values())


def check_fit(ablations: list[Ablation], launches: dict[str, Launch], out: Path, only: set[str] | None) -> None:
    """Before a SLURM submission: the cells of ablations whose launch profile names a GPU must fit its memory
    (the dry run's GPU plan, printed; a ConfigError names each cell that does not fit)."""
    with_gpu = [ab for ab in ablations if launches[ab.name].gpu]
    if with_gpu:
        from add_bench.cost import print_gpu_plan

        print_gpu_plan(with_gpu, out, only, {ab.name: launches[ab.name].gpu for ab in with_gpu})


def show_status(ablations: list[Ablation], out: Path) -> None:
    """Each cell's state (:func:`cell_status`; ``evaluating`` while a trained cell's evaluation job runs) and its
    SLURM jobs' ids and states: training (or training and evaluation), then the evaluation job if it has one."""
    from add_bench.launchers import EVAL_JOBS_FILE, JOBS_FILE, read_jobs, status_slurm

    folder = out / "cells"
    jobs, states = {}, {}
    for name in (JOBS_FILE, EVAL_JOBS_FILE):
        if (folder / name).is_file():
            jobs[name], states[name] = read_jobs(folder / name), status_slurm(folder, name)
    for ab in ablations:
        for c in ab.cells:
            state = cell_status(folder / c.id)
            evaluation = states.get(EVAL_JOBS_FILE, {}).get(c.id)
            if state == "trained" and evaluation == "RUNNING":
                state = "evaluating"
            shown = [
                f"{what} {jobs[name][c.id]} {states[name][c.id]}"
                for name, what in ((JOBS_FILE, "job"), (EVAL_JOBS_FILE, "evaluation"))
                if c.id in jobs.get(name, {})
            ]
            job = f"  slurm: {', '.join(shown)}" if shown else ""
            print(f"{ab.name:<16} {c.name:<22} seed {c.seed:<3} {c.id}  {state}{job}")


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ablation", help="ablation YAML (ablations/*.yaml), or a sweep key=a,b,c (one row per value)")
    p.add_argument("overrides", nargs="*", help="seeds=[0,1,2], base=<preset>, or training config key=value")
    p.add_argument(
        "--out",
        default=None,
        help=f"results folder (default: <runs>/sweeps, <runs> from the preset's launch profile, ${RUNS_ENV} or "
        f"{DEFAULT_OUT.parent})",
    )
    p.add_argument("--launcher", default="local", help="local | slurm")
    p.add_argument(
        "--workers",
        default="auto",
        help="local: parallel worker processes, or auto (default) = one per core, at most one per cell",
    )
    p.add_argument(
        "--slurm",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="SLURM settings over the preset's launch profile: partition, timeout_min, cpus_per_task, "
        "gpus_per_node, mem_gb, ..., additional_parameters.<sbatch flag>=<value>; eval_job=true: evaluation as "
        "its own job after training, its request eval.<key>=<value> (eval.timeout_min=30)",
    )
    p.add_argument(
        "--procs-per-cell",
        type=int,
        default=1,
        metavar="N",
        help="local: run each cell as N data-parallel processes (gloo on the CPU), cells one after another; "
        "batch_size stays the global batch (SLURM: slurm.nodes × slurm.tasks_per_node)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells, which are done, and the cost")
    p.add_argument(
        "--gpu",
        default=None,
        help="--dry-run: each cell's estimated GPU memory and GPU-hours on this GPU (add_bench.memory.GPUS; default: "
        "the launch profile's gpu), refusing cells that do not fit",
    )
    p.add_argument("--status", action="store_true", help="show each cell's state (and SLURM job state)")
    p.add_argument("--collect", action="store_true", help="only (re)write manifests, tables and plots from results")
    p.add_argument(
        "--cells",
        default=None,
        metavar="NAME[,NAME]",
        help="run only these rows (every seed of each); the tables still list every row",
    )
    add_cfg_option(p)
    a = p.parse_intermixed_args(argv)  # key=value overrides may follow the options
    if "=" in a.ablation and not a.ablation.endswith((".yaml", ".yml")):  # key=a,b,c on the command line
        data, rest = command_line_ablation([a.ablation, *a.overrides])
        sweep_over, train_over = split_overrides(rest)
        ablations = [expand(Path("command line"), data, sweep_over, train_over)]
    else:
        ablations = load_ablations(a.ablation, a.overrides)
    names = a.cells.split(",") if a.cells else None
    only = selected_ids(ablations, names, a.ablation)
    if a.cfg:  # each cell (of the --cells rows) as it would run; no folder, lock or launch profile is touched
        for ab in ablations:
            for c in ab.cells:
                if names is None or c.name in names:
                    print_job(c.config, ablation=ab.name, name=c.name, seed=c.seed, id=c.id)
        return 0
    launches = launch_profiles(ablations, a.slurm)
    out = Path(a.out) if a.out else default_out(launches)
    procs = a.procs_per_cell
    if procs < 1 or (procs > 1 and a.launcher != "local"):
        raise ConfigError(
            f"--procs-per-cell {procs}: accepted: a positive integer, with --launcher local (on SLURM a cell's "
            "processes are slurm.nodes × slurm.tasks_per_node: --slurm tasks_per_node=N)"
        )
    workers = parse_workers(a.workers) if procs == 1 else parse_workers(1 if a.workers == "auto" else a.workers)
    if procs > 1 and workers > 1:
        raise ConfigError(
            f"--workers {a.workers} with --procs-per-cell {procs}: a cell's processes share the cores; accepted: "
            "--workers 1 or auto (cells one after another)"
        )
    if a.dry_run:
        gpus = {name: a.gpu or launch.gpu for name, launch in launches.items()}
        if any(gpus.values()):
            from add_bench.cost import print_gpu_plan

            missing = sorted(name for name, g in gpus.items() if not g)
            if missing:
                raise ConfigError(f"--dry-run: no GPU for ablation(s) {', '.join(missing)}; give --gpu")
            print_gpu_plan(ablations, out, only, gpus)
        else:
            print_plan(ablations, {c.id: c for ab in ablations for c in ab.cells}, out, only, workers)
        if a.launcher == "slurm":
            print_requests(launches)
        check_paths(ablations, out, only)
        check_splits(ablations, out, only, a.launcher, launches, procs)
    elif a.status:
        show_status(ablations, out)
    elif a.collect:  # tables from whatever results exist, for this file's current rows and seeds
        write_manifests(ablations, out)
        collect(ablations, out)
    else:
        check_paths(ablations, out, only)
        if a.launcher == "slurm":
            check_fit(ablations, launches, out, only)
        run_sweep(ablations, out, a.launcher, workers, launches, only, procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launchers that run a sweep's cells: in this process / local worker processes, or as one SLURM job array.

A *cell* is ``(cell_id, fn)`` where ``fn(cell_id: str, workdir: str) -> dict`` is a picklable,
module-level callable. ``workdir`` is ``<folder>/<cell_id>`` (created before the call); the cell writes
its results and its own resumable checkpoints there, so calling it again after an interruption
resumes it. That is all a requeue does on SLURM: :class:`CellJob` asks submitit to resubmit the same
call when SLURM signals an upcoming time limit or a preemption.

* ``run_local(cells, workers=1)``: sequential in this process, or ``workers`` spawned processes each
  using ``cores // workers`` torch threads; a failing cell is recorded and the others still run.
  ``procs_per_cell=N``: each cell, one after another, as N spawned processes joined by gloo on the CPU
  (:mod:`add_bench.distributed`), the others stopped when one fails.
* ``submit_slurm(cells, folder, cfg)``: one job array (a job of ``nodes`` × ``tasks_per_node`` tasks per
  cell; several tasks: one data-parallel process each, the process group from the SLURM environment,
  ``srun --kill-on-bad-exit``) via submitit; returns the job
  ids at once and records ``folder/slurm_jobs.json`` (cell_id → job_id). ``status_slurm(folder)``
  reports each cell's state (sacct, else squeue, else submitit's result file). ``cfg`` (SlurmConfig)
  usually comes from a preset's :class:`LaunchProfile` with the command line's overrides on top
  (:func:`slurm_request`); a cell whose request has GPUs refuses to train on the CPU with device=auto.
  ``submit_slurm(..., after=ids, jobs_file=EVAL_JOBS_FILE)``: a second array whose task i waits for job
  ``ids[i]`` (``cfg.eval_job``: the sweep's evaluation jobs, requesting :func:`eval_request`).

A local single-node cluster for trying this out: ``scripts/slurm_cluster.sh`` (see
``scripts/README_slurm.md``); ``tests/test_slurm.py`` runs against it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf

from add_bench.errors import ConfigError, DataError
from add_bench.provenance import REPO_ROOT, atomic_write_json

Cell = tuple[str, Callable[[str, str], dict]]

LAUNCHERS = ("local", "slurm")
JOBS_FILE = "slurm_jobs.json"  # cell_id → job id of its (training, or training and evaluation) job
EVAL_JOBS_FILE = "slurm_eval_jobs.json"  # cell_id → job id of its evaluation job (slurm.eval_job)
LOGS_DIR = "slurm_logs"


# ----------------------------------------------------------------------------------------- config
@dataclass
class SlurmConfig:
    """SLURM resources for each cell of a sweep (one array job per cell)."""

    partition: str = "debug"  # sbatch --partition
    timeout_min: int = 60  # time limit of ONE run of a cell; a cell that hits it is requeued and resumes
    cpus_per_task: int = 2  # sbatch --cpus-per-task; also each process's OMP_NUM_THREADS
    gpus_per_node: int = 0  # sbatch --gpus-per-node (0: not requested)
    # a cell's processes: nodes × tasks_per_node data-parallel tasks, one per GPU (tasks_per_node ≤ gpus_per_node)
    nodes: int = 1  # sbatch --nodes
    tasks_per_node: int = 1  # sbatch --ntasks-per-node
    mem_gb: float = 4  # sbatch --mem, per node (all of its tasks)
    max_num_timeout: int = 3  # how many times a cell may be requeued after hitting its time limit
    array_parallelism: int = 8  # at most this many cells of the array run at once (--array=0-N%P)
    # seconds before the time limit at which SLURM sends USR2 so that submitit requeues the cell;
    # None: min(90, timeout_min*60 // 4). Must stay below timeout_min*60.
    signal_delay_s: int | None = None
    # any other sbatch flag, as --<flag>=<value>: {"account": "abc", "qos": "low", "constraint": "a100"};
    # the value true gives a flag without a value (--exclusive)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # evaluation as its own job: the cells' training array, then an evaluation array whose task i starts once
    # training task i has succeeded (sbatch --dependency=aftercorr); False: a cell trains and evaluates in one job
    # (the default here, and the embedded scale's; the GPU presets' launch profiles, sd21 and sdxl, set true)
    eval_job: bool = False
    # the evaluation jobs' request where it differs from the one above (any of its keys but eval_job and eval;
    # nodes and tasks_per_node stay 1: evaluation is one process); gpus_per_node defaults to min(1, gpus_per_node)
    eval: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # direct construction is checked; OmegaConf nodes: check_slurm_config
        _validated(self, "slurm")


# sbatch flags the launcher writes itself: from a SlurmConfig field, or for submitit's job array and logs
MANAGED_FLAGS = {
    "partition": "set slurm.partition",
    "time": "set slurm.timeout_min",
    "cpus-per-task": "set slurm.cpus_per_task",
    "gpus-per-node": "set slurm.gpus_per_node",
    "mem": "set slurm.mem_gb",
    "signal": "set slurm.signal_delay_s",
    "array": "set slurm.array_parallelism",
    "output": "submitit's log files",
    "error": "submitit's log files",
    "open-mode": "submitit's log files",
    "job-name": "the launcher's job name",
    "nodes": "set slurm.nodes",
    "ntasks": "set slurm.nodes and slurm.tasks_per_node",
    "ntasks-per-node": "set slurm.tasks_per_node",
}


@dataclass
class LaunchProfile:
    """How a preset's cells are launched (``add_bench/presets/launch/<preset>.yaml``): where a sweep writes
    when ``--out`` is not given, and what each cell asks SLURM for."""

    runs: str | None = None  # results root (a sweep writes <runs>/sweeps); None: $ADD_BENCH_RUNS, else runs/
    # the GPU a cell runs on (add_bench.memory.GPUS, e.g. A100-80GB): --dry-run prints each cell's estimated
    # memory and GPU-hours on it and refuses a cell that does not fit; None: no GPU plan (--gpu gives one)
    gpu: str | None = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def slurm_request(values: dict[str, Any], overrides: list[str]) -> SlurmConfig:
    """A SLURM request: SlurmConfig's defaults ← ``values`` (a launch profile's ``slurm``, resolved) ← the
    command line's ``--slurm key=value`` overrides, checked."""
    from add_bench.config import apply_overrides, load

    base = load(SlurmConfig, extra=values)
    try:
        return check_slurm_config(apply_overrides(base, overrides, SlurmConfig, "--slurm"))
    except ConfigError as e:
        if "unknown config key" not in str(e):
            raise
        raise ConfigError(
            f"{e}; any other sbatch flag: additional_parameters.<flag>=<value> (e.g. additional_parameters.account=abc)"
        ) from None


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key}={value!r}: must be {what}")
    return value


def _validated(cfg: Any, key: str) -> dict[str, Any]:
    """The SlurmConfig fields of ``cfg`` (a SlurmConfig or an OmegaConf node / mapping), checked."""
    defaults = SlurmConfig.__dataclass_fields__
    if hasattr(cfg, "keys"):

        def get(name: str) -> Any:
            f = defaults[name]
            return cfg.get(name, f.default_factory() if callable(f.default_factory) else f.default)
    else:

        def get(name: str) -> Any:
            return getattr(cfg, name)

    partition = get("partition")
    if not isinstance(partition, str) or not partition.strip():
        raise ConfigError(f"{key}.partition={partition!r}: must be a non-empty partition name")
    timeout_min = _positive_int(get("timeout_min"), f"{key}.timeout_min")
    mem_gb = get("mem_gb")
    if isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or not mem_gb > 0:
        raise ConfigError(f"{key}.mem_gb={mem_gb!r}: must be a positive number of GB")
    delay = get("signal_delay_s")
    if delay is not None:
        _positive_int(delay, f"{key}.signal_delay_s")
        if delay >= timeout_min * 60:
            raise ConfigError(
                f"{key}.signal_delay_s={delay}: must be below {key}.timeout_min*60={timeout_min * 60}"
                " (else every run is signalled at once and requeued)"
            )
    extra = get("additional_parameters")
    extra = {} if extra is None else extra
    if not hasattr(extra, "items"):
        raise ConfigError(f"{key}.additional_parameters={extra!r}: must be a mapping of sbatch flag → value")
    for flag, value in extra.items():
        why = MANAGED_FLAGS.get(str(flag).replace("_", "-"))
        if why:
            raise ConfigError(
                f"{key}.additional_parameters.{flag}: the launcher writes --{str(flag).replace('_', '-')} itself "
                f"({why}); accepted: any other sbatch flag"
            )
        if value is None or isinstance(value, (dict, list)) or OmegaConf.is_config(value):
            raise ConfigError(
                f"{key}.additional_parameters.{flag}={value!r}: must be one value (a string or number; true for a "
                "flag without a value)"
            )
    gpus = _positive_int(get("gpus_per_node"), f"{key}.gpus_per_node", minimum=0)
    tasks = _positive_int(get("tasks_per_node"), f"{key}.tasks_per_node")
    if gpus and tasks > gpus:
        raise ConfigError(
            f"{key}.tasks_per_node={tasks} with {key}.gpus_per_node={gpus}: a cell runs one process per GPU; "
            f"accepted: {key}.tasks_per_node ≤ {gpus} (= {gpus} to use them all)"
        )
    eval_job = get("eval_job")
    if not isinstance(eval_job, bool):
        raise ConfigError(f"{key}.eval_job={eval_job!r}: must be true (evaluation as its own job) or false")
    values = dict(
        partition=partition,
        timeout_min=timeout_min,
        cpus_per_task=_positive_int(get("cpus_per_task"), f"{key}.cpus_per_task"),
        gpus_per_node=gpus,
        nodes=_positive_int(get("nodes"), f"{key}.nodes"),
        tasks_per_node=tasks,
        mem_gb=float(mem_gb),
        max_num_timeout=_positive_int(get("max_num_timeout"), f"{key}.max_num_timeout", minimum=0),
        array_parallelism=_positive_int(get("array_parallelism"), f"{key}.array_parallelism"),
        signal_delay_s=delay,
        additional_parameters={str(k): v for k, v in extra.items()},
        eval_job=eval_job,
        eval={},
    )
    values["eval"] = _eval_differences(values, get("eval"), key)
    return values


# sbatch flags the evaluation array gets from the launcher (its dependency on the training array)
DEPENDENCY_FLAGS = ("dependency", "kill-on-invalid-dep")


def _eval_differences(request: dict[str, Any], differences: Any, key: str) -> dict[str, Any]:
    """``<key>.eval`` (the evaluation request's differences from ``request``), checked by checking the
    evaluation request they make; returned as a plain dict."""
    differences = {} if differences is None else differences
    if OmegaConf.is_config(differences):
        differences = OmegaConf.to_container(differences, resolve=True)
    if not hasattr(differences, "items"):
        raise ConfigError(f"{key}.eval={differences!r}: must be a mapping of SLURM request key → value")
    differences = {str(k): v for k, v in differences.items()}
    if not differences:  # training's request as one process: valid when training's is
        return {}
    accepted = [name for name in SlurmConfig.__dataclass_fields__ if name not in ("eval_job", "eval")]
    for name, value in differences.items():
        if name not in accepted:
            raise ConfigError(f"{key}.eval.{name}: unknown key; accepted: {', '.join(accepted)}")
        if name in ("nodes", "tasks_per_node") and value != 1:
            raise ConfigError(
                f"{key}.eval.{name}={value!r}: evaluation runs as one process; accepted: 1 (or leave it out)"
            )
    for flag in differences.get("additional_parameters") or {}:
        if str(flag).replace("_", "-") in DEPENDENCY_FLAGS:
            raise ConfigError(
                f"{key}.eval.additional_parameters.{flag}: the launcher writes --{str(flag).replace('_', '-')} of "
                "the evaluation array itself (it waits for its training task); accepted: any other sbatch flag"
            )
    _validated(_eval_values(request, differences), f"{key}.eval")
    return differences


def _eval_values(request: dict[str, Any], differences: dict[str, Any]) -> dict[str, Any]:
    """The evaluation jobs' request: ``request`` (training's) as one process with at most one GPU, without
    training's own dependency flags, ``differences`` on top (additional_parameters merged flag by flag)."""
    extra = {k: v for k, v in request["additional_parameters"].items() if k.replace("_", "-") not in DEPENDENCY_FLAGS}
    values = request | dict(nodes=1, tasks_per_node=1, gpus_per_node=min(1, request["gpus_per_node"]))
    values |= {k: v for k, v in differences.items() if k != "additional_parameters"}
    extra |= dict(differences.get("additional_parameters") or {})
    return values | dict(additional_parameters=extra, eval_job=False, eval={})


def eval_request(cfg: SlurmConfig) -> SlurmConfig:
    """What each evaluation job asks SLURM for when ``cfg.eval_job``: ``cfg`` with ``cfg.eval`` on top
    (:func:`_eval_values`)."""
    return SlurmConfig(**_eval_values(dataclasses.asdict(cfg), cfg.eval))


def check_slurm_config(cfg: Any, key: str = "slurm") -> SlurmConfig:
    """Validate a SlurmConfig (dataclass or OmegaConf node); returns a plain SlurmConfig copy."""
    return SlurmConfig(**_validated(cfg, key))


def processes_per_cell(cfg: SlurmConfig) -> int:
    """A cell's data-parallel processes under ``cfg``: nodes × tasks_per_node."""
    return cfg.nodes * cfg.tasks_per_node


def signal_delay(cfg: SlurmConfig) -> int:
    """Seconds before the time limit at which the requeue signal is asked for."""
    if cfg.signal_delay_s is not None:
        return cfg.signal_delay_s
    return max(1, min(90, cfg.timeout_min * 60 // 4))


def check_cells(cells: Sequence[Cell]) -> list[Cell]:
    cells = list(cells)
    seen: set[str] = set()
    for i, cell in enumerate(cells):
        if not (isinstance(cell, tuple) and len(cell) == 2 and callable(cell[1])):
            raise ConfigError(f"cells[{i}]: expected a (cell_id, callable) pair, got {type(cell).__name__}")
        cid = cell[0]
        if not isinstance(cid, str) or not cid or cid in (".", "..") or "/" in cid or os.sep in cid:
            raise ConfigError(
                f"cells[{i}] id {cid!r}: must be a non-empty string usable as a folder name (no '/', not '.' or '..')"
            )
        if cid in seen:
            raise ConfigError(f"cells[{i}] id {cid!r}: duplicate cell id")
        seen.add(cid)
    return cells


def check_launcher(name: str) -> str:
    if name not in LAUNCHERS:
        raise ConfigError(f"launcher={name!r}: unknown; accepted: {', '.join(LAUNCHERS)}")
    return name


# ------------------------------------------------------------------------------------------ slurm
# The two uses of submitit beyond its documented API (executors, jobs, helpers): neither has a public form.
# The error submitit raises from executor.submit when sbatch exits non-zero (a refused partition, memory or
# CPU request); submitit.core.utils defines it and the top level does not export it.
SbatchRefused = submitit.core.utils.FailedJobError

# sbatch's answers when the controller is momentarily unreachable or busy (a slurmctld restart or fail-over, a
# full RPC queue, the job-count limit): the same submission is tried again after these waits (seconds)
TRANSIENT_SBATCH = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Zero Bytes were transmitted",
    "Resource temporarily unavailable",
    "backup controller in standby mode",
)
SBATCH_RETRY_S = (5, 15, 30, 60)


def retry_transient(submit: Callable[[], Any], waits: Sequence[float] = SBATCH_RETRY_S, sleep=time.sleep) -> Any:
    """``submit()``, tried again after each of ``waits`` while sbatch refuses it with a transient controller
    error (``TRANSIENT_SBATCH``); any other refusal, or the last transient one, is raised."""
    for wait in (*waits, None):
        try:
            return submit()
        except SbatchRefused as e:
            reason = next((t for t in TRANSIENT_SBATCH if t in str(e)), None)
            if wait is None or reason is None:
                raise
            print(f"sbatch: {reason}; submitting again in {wait:g} s", file=sys.stderr, flush=True)
            sleep(wait)


def _parse_sacct(out: str) -> dict[str, dict[str, str]]:
    """job id → {column: value} from ``sacct --parsable2`` output, pending array ranges (``12_[0-7%8]``)
    expanded to one id per task, by the parser of ``SlurmJob``'s own watcher. ``SlurmJob.state`` runs sacct
    itself but without a timeout, answers from a result up to 10 minutes old, keeps finished states for
    good and logs a warning where accounting is disabled; ``status_slurm`` asks now and falls back quietly."""
    return submitit.SlurmJob.watcher.read_info(out)


class CellJob(submitit.helpers.Checkpointable):
    """One cell as a submitit job: ``fn(cell_id, workdir)``, requeued (not restarted from scratch by
    us, but called again) when SLURM signals a time limit or preemption; the cell resumes from the
    checkpoints it keeps in ``workdir``. A job of several tasks runs ``fn`` in each, with torch.distributed's
    variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) set from the SLURM environment by submitit's
    ``TorchDistributedEnvironment``."""

    gpus_per_node = 0  # class defaults: what a CellJob pickled without these fields reads
    launch = "the SLURM request"
    processes = 1

    def __init__(
        self,
        fn: Callable[[str, str], dict],
        cell_id: str,
        workdir: str,
        gpus_per_node: int = 0,
        launch: str = "the SLURM request",
        processes: int = 1,
    ) -> None:
        self.fn = fn
        self.cell_id = cell_id
        self.workdir = str(workdir)
        self.gpus_per_node, self.launch, self.processes = gpus_per_node, launch, processes
        self.requeues = 0  # incremented in the pickled copy at every requeue

    def __call__(self) -> dict:
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.gpus_per_node:  # device=auto then refuses to fall back to the CPU
            from add_bench.distributed import EXPECT_GPU_ENV

            os.environ[EXPECT_GPU_ENV] = f"{self.launch} asks for gpus_per_node={self.gpus_per_node}"
        if self.processes > 1:  # one task of a data-parallel cell
            # every task sees its node's GPUs and picks cuda:LOCAL_RANK (distributed.resolve_device)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            os.environ.setdefault("OMP_NUM_THREADS", cpus)
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(int(cpus))
        return self.fn(self.cell_id, self.workdir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit in the signal handler: resubmit this same call (the cell resumes itself)."""
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"CellJob({self.cell_id!r}, requeues={self.requeues})"


def dependency(after: Sequence[str]) -> str:
    """The sbatch ``--dependency`` that starts task i of an array once job ``after[i]`` has succeeded: ``aftercorr``
    on the array ``after`` is (``<array>_0`` … ``<array>_<n-1>``, as submit_slurm returns them), ``afterok`` on a
    single job (submitit submits one cell as a plain job)."""
    after = list(after)
    if len(after) == 1 and "_" not in after[0]:
        return f"afterok:{after[0]}"
    array = after[0].split("_")[0] if after else ""
    if not array or after != [f"{array}_{i}" for i in range(len(after))]:
        raise ValueError(
            f"after={after!r}: expected the job ids of one array, <array>_0 … <array>_<n-1>, or one job id"
        )
    return f"aftercorr:{array}"


def submit_slurm(
    cells: Sequence[Cell],
    folder: str | Path,
    cfg: Any = None,
    launch: str = "the SLURM request",
    *,
    after: Sequence[str] | None = None,
    jobs_file: str = JOBS_FILE,
) -> list[str]:
    """Submit all cells as ONE job array and return their job ids (``<array>_<index>``) at once.
    ``launch`` says where ``cfg`` came from (a preset's launch profile), for messages.

    Logs and submitit's pickles go to ``folder/slurm_logs/<job_id>/``; each cell's workdir is
    ``folder/<cell_id>``; ``folder/<jobs_file>`` maps cell_id → job_id (merged with earlier
    submissions to the same folder). ``after``: job ids, one per cell (an earlier submit_slurm of the same
    cells): task i starts once job ``after[i]`` has succeeded, and is cancelled when it has failed
    (``--kill-on-invalid-dep=yes``: else SLURM keeps it pending for good, DependencyNeverSatisfied).
    """
    cells = check_cells(cells)
    cfg = check_slurm_config(SlurmConfig() if cfg is None else cfg)
    if not cells:
        return []
    extra = dict(cfg.additional_parameters)
    if after is not None:
        if len(after) != len(cells):
            raise ValueError(f"after: {len(after)} job ids for {len(cells)} cells")
        extra |= {"dependency": dependency(after), "kill-on-invalid-dep": "yes"}
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        executor = submitit.AutoExecutor(
            folder=folder / LOGS_DIR / "%j",
            cluster="slurm",
            slurm_max_num_timeout=cfg.max_num_timeout,
            slurm_python=shlex.quote(sys.executable),
        )
    except RuntimeError as e:
        raise ConfigError(
            f"launcher='slurm': no SLURM client here ({e}); start one with "
            "scripts/slurm_cluster.sh or use launcher=local"
        ) from None
    executor.update_parameters(
        name="add-bench" if after is None else "add-bench-eval",
        timeout_min=cfg.timeout_min,
        cpus_per_task=cfg.cpus_per_task,
        gpus_per_node=cfg.gpus_per_node or None,  # --gpus-per-node=0 is refused where no GRES exist
        mem_gb=cfg.mem_gb,
        nodes=cfg.nodes,
        tasks_per_node=cfg.tasks_per_node,
        slurm_partition=cfg.partition,
        slurm_array_parallelism=cfg.array_parallelism,
        slurm_signal_delay_s=signal_delay(cfg),
        slurm_additional_parameters=extra,
        # a cell's tasks train together: one that fails ends the others (no all-reduce waits for it)
        slurm_srun_args=["--kill-on-bad-exit=1"] if processes_per_cell(cfg) > 1 else [],
        # the array tasks must import add_bench (CellJob) even when it is not pip-installed
        slurm_setup=[f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )

    def submit_array() -> list:
        jobs = []
        with executor.batch():
            for cell_id, fn in cells:
                job = CellJob(fn, cell_id, str(folder / cell_id), cfg.gpus_per_node, launch, processes_per_cell(cfg))
                jobs.append(executor.submit(job))
        return jobs

    try:
        jobs = retry_transient(submit_array)
    except SbatchRefused as e:
        msg = " ".join(str(e).split()) or "no message"
        raise ConfigError(
            f"sbatch refused the submission of {launch} (slurm.partition={cfg.partition!r}, "
            f"mem_gb={cfg.mem_gb}, cpus_per_task={cfg.cpus_per_task}, gpus_per_node={cfg.gpus_per_node}, "
            f"nodes={cfg.nodes}, tasks_per_node={cfg.tasks_per_node}): {msg}"
        ) from None
    ids = [str(job.job_id) for job in jobs]
    record_jobs(folder / jobs_file, dict(zip((cid for cid, _ in cells), ids)))
    return ids


def record_jobs(path: Path, jobs: dict[str, str | None]) -> None:
    """Merge ``jobs`` (cell_id → job id; None: forget the cell's job) into the jobs file at ``path``."""
    recorded = read_jobs(path) if path.exists() else {}
    recorded.update(jobs)
    recorded = {cid: jid for cid, jid in recorded.items() if jid is not None}
    if recorded or path.exists():
        atomic_write_json(path, recorded)


def read_jobs(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; submit_slurm writes it (is this a sweep folder?)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable or malformed JSON ({e}); expected {{cell_id: job_id}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataError(f"{path}: expected a JSON object {{cell_id: job_id}}")
    return data


def cancel_jobs(job_ids: Sequence[str]) -> None:
    """``scancel`` these jobs (what is already gone is ignored)."""
    if job_ids:
        _run(["scancel", *job_ids])


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _sacct_states(job_ids: set[str]) -> dict[str, str]:
    mains = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["sacct", "-o", "JobID,State", "--parsable2", *[a for m in mains for a in ("-j", m)]])
    if not out:  # no sacct, or accounting disabled ("Slurm accounting storage is disabled")
        return {}
    info = _parse_sacct(out)
    return {jid: info[jid]["State"].split()[0] for jid in job_ids if jid in info and info[jid].get("State")}


def _squeue_states(job_ids: set[str]) -> dict[str, str]:
    mains = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(mains), "-o", "%i|%T"])
    states = {}
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in job_ids and state:
            states[jid] = state
    return states


def _result_state(folder: Path, job_id: str) -> str | None:
    """COMPLETED / FAILED from the result file the job wrote; None before it exists."""
    job = submitit.SlurmJob(folder=folder / LOGS_DIR / "%j", job_id=job_id)
    if not job.paths.result_pickle.exists():
        return None
    try:  # the result file exists, so exception() reads it without waiting or asking SLURM
        failed = job.exception() is not None
    except Exception:  # noqa: BLE001 - a half-written or foreign pickle
        return "UNKNOWN"
    return "FAILED" if failed else "COMPLETED"


def status_slurm(folder: str | Path, jobs_file: str = JOBS_FILE) -> dict[str, str]:
    """cell_id → SLURM state (PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, TIMEOUT, ...) of the jobs in
    ``folder/<jobs_file>`` (``EVAL_JOBS_FILE``: the evaluation jobs).

    Asks sacct; without accounting, squeue (which forgets jobs MinJobAge after they end); then
    submitit's result file (COMPLETED / FAILED); "UNKNOWN" when none of them knows the job.
    """
    folder = Path(folder).resolve()
    jobs = read_jobs(folder / jobs_file)
    wanted = set(jobs.values())
    if not wanted:  # sacct without a job id would list every job
        return {}
    states = _sacct_states(wanted)
    missing = wanted - set(states)
    if missing:
        states.update(_squeue_states(missing))
    for jid in wanted - set(states):
        states[jid] = _result_state(folder, jid) or "UNKNOWN"
    return {cid: states[jid] for cid, jid in jobs.items()}


# ------------------------------------------------------------------------------------------ local
def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), the unit of `--workers auto`."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM when the sweep process ends, however it ends
    (Ctrl-C, SIGTERM, SIGKILL), so that no cell keeps training orphaned; its last checkpoint stays."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent ended before prctl took effect
        os._exit(1)


def _init_worker(threads: int, slots: Any) -> None:
    _die_with_parent()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # each worker's progress bars on their own terminal line, below the parent's "cells" bar
    try:
        os.environ["TQDM_POSITION"] = str(slots.get(timeout=30) + 1)
    except queue.Empty:  # a replacement worker: share the first worker's line
        os.environ["TQDM_POSITION"] = "1"
    import torch

    torch.set_num_threads(threads)


def _call_pickled(payload: bytes, cell_id: str, workdir: str, threads: int) -> dict:
    import cloudpickle
    import torch

    torch.set_num_threads(threads)
    fn = cloudpickle.loads(payload)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    print(f"\ncell {cell_id}: started on {threads} thread(s) → {workdir}", file=sys.stderr)
    return fn(cell_id, workdir)


def _cell_process(
    rank: int, payload: bytes, cell_id: str, workdir: str, world: int, port: int, threads: int, out: str
) -> None:
    """Process ``rank`` of a cell run as ``world`` local processes (torch.multiprocessing's entry point): the
    variables torchrun would set, then the cell; its result or error goes to ``out/<rank>.pkl``."""
    import cloudpickle

    _die_with_parent()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    try:
        outcome = ("ok", _call_pickled(payload, cell_id, workdir, threads))
    except Exception as e:
        outcome = ("error", _error_text(e))
        raise
    finally:
        Path(out, f"{rank}.pkl").write_bytes(cloudpickle.dumps(outcome))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(fn: Callable[[str, str], dict], cell_id: str, workdir: Path, world: int) -> Any:
    """``fn(cell_id, workdir)`` in ``world`` spawned processes joined as one data-parallel group (gloo on the
    CPU, each with cores // world threads); when one fails the others are stopped. Returns process 0's result,
    or the error text of the first process that failed."""
    import cloudpickle
    import torch.multiprocessing as mp

    threads = max(1, usable_cores() // world)
    payload = cloudpickle.dumps(fn)
    with tempfile.TemporaryDirectory(prefix="add-bench-procs-") as out:
        args = (payload, cell_id, str(workdir), world, _free_port(), threads, out)
        try:
            mp.start_processes(_cell_process, args=args, nprocs=world, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # the others were terminated
            failed = e
        else:
            failed = None
        outcomes = {
            r: cloudpickle.loads(Path(out, f"{r}.pkl").read_bytes())
            for r in range(world)
            if Path(out, f"{r}.pkl").is_file()
        }
    if failed is None and outcomes.get(0, ("",))[0] == "ok":
        return outcomes[0][1]
    errors = [(r, text) for r, (kind, text) in sorted(outcomes.items()) if kind == "error"]
    if not errors:
        return f"error: {type(failed).__name__}: {str(failed).splitlines()[0] if failed else 'no result'}"
    rank, text = errors[0]
    return text if rank == 0 else f"{text} (process {rank} of {world})"


def round_sizes(n: int, workers: int) -> list[int]:
    """Cells per round when ``n`` cells of about equal length run on ``workers`` processes."""
    workers = max(1, min(workers, n))
    return [workers] * (n // workers) + ([n % workers] if n % workers else [])


def thread_plan(n: int, workers: int, cores: int) -> list[int]:
    """Torch threads for each of ``n`` cells run in order by ``workers`` processes on ``cores`` cores.

    Cells of about equal length run in rounds of ``workers``; every cell gets ``cores // workers``
    threads, except that a last round of fewer cells shares all the cores among its cells (3 cells on
    2 workers and 2 cores: 1, 1, then 2 threads for the cell that runs alone)."""
    sizes = round_sizes(n, workers)
    return [max(1, cores // k) for k in sizes for _ in range(k)]


def _error_text(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {e}"


def run_local(
    cells: Sequence[Cell], workers: int = 1, folder: str | Path | None = None, procs_per_cell: int = 1
) -> dict[str, Any]:
    """Run cells here; returns cell_id → the cell's result dict, or ``"error: <Type>: <message>"``.

    ``workers=1`` runs them one after another in this process; ``workers>1`` uses that many spawned
    processes (each cell with ``cores // workers`` torch threads, a short last round with more:
    :func:`thread_plan`), each worker's progress bar on its own line under a bar over the cells. Each cell's workdir is
    ``folder/<cell_id>`` (``folder`` defaults to a new temporary directory). A failing cell's
    traceback goes to stderr and does not stop the other cells. ``procs_per_cell`` > 1: the cells one after
    another, each as that many processes (:func:`run_processes`; ``workers`` must then be 1).
    """
    cells = check_cells(cells)
    workers = _positive_int(workers, "workers")
    procs_per_cell = _positive_int(procs_per_cell, "procs_per_cell")
    if procs_per_cell > 1 and workers > 1:
        raise ConfigError(
            f"workers={workers} with procs_per_cell={procs_per_cell}: a cell's processes share the cores; accepted: "
            "workers=1 (cells one after another)"
        )
    base = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="add-bench-local-"))
    results: dict[str, Any] = {}

    def record_error(cell_id: str, e: BaseException) -> None:
        results[cell_id] = _error_text(e)
        print(f"cell {cell_id!r} failed:\n" + "".join(traceback.format_exception(e)), file=sys.stderr, end="")

    if workers == 1 or len(cells) <= 1:
        for cell_id, fn in cells:
            workdir = base / cell_id
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                if procs_per_cell > 1:
                    results[cell_id] = run_processes(fn, cell_id, workdir, procs_per_cell)
                    if isinstance(results[cell_id], str):
                        print(f"cell {cell_id!r} failed: {results[cell_id]}", file=sys.stderr)
                else:
                    results[cell_id] = fn(cell_id, str(workdir))
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                record_error(cell_id, e)
        return results

    import cloudpickle  # lambdas and closures too, not only importable functions
    from tqdm import tqdm

    workers = min(workers, len(cells))
    plan = thread_plan(len(cells), workers, usable_cores())
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    for k in range(workers):
        slots.put(k)
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(plan[0], slots)
    ) as pool:
        futures = {}
        for (cell_id, fn), threads in zip(cells, plan):
            try:
                payload = cloudpickle.dumps(fn)
            except Exception as e:  # noqa: BLE001
                record_error(cell_id, e)
                continue
            futures[pool.submit(_call_pickled, payload, cell_id, str(base / cell_id), threads)] = cell_id
        with tqdm(total=len(futures), desc=f"cells ({workers} workers)", position=0, dynamic_ncols=True) as bar:
            for fut in cf.as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()
                except Exception as e:  # noqa: BLE001 - incl. BrokenProcessPool when a worker dies
                    record_error(futures[fut], e)
                bar.update()
    return {cid: results[cid] for cid, _ in cells if cid in results}


def launch(
    launcher: str,
    cells: Sequence[Cell],
    folder: str | Path,
    *,
    workers: int = 1,
    slurm: Any = None,
    procs_per_cell: int = 1,
) -> dict[str, Any] | list[str]:
    """``launcher='local'``: run_local's results; ``launcher='slurm'``: submit_slurm's job ids."""
    check_launcher(launcher)
    if launcher == "slurm":
        return submit_slurm(cells, folder, slurm)
    return run_local(cells, workers=workers, folder=folder, procs_per_cell=procs_per_cell)


__all__ = [
    "SlurmConfig",
    "CellJob",
    "submit_slurm",
    "status_slurm",
    "eval_request",
    "dependency",
    "EVAL_JOBS_FILE",
    "run_local",
    "launch",
    "check_slurm_config",
    "check_launcher",
    "LAUNCHERS",
    "thread_plan",
    "run_processes",
    "processes_per_cell",
]

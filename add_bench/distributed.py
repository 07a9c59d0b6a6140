"""Devices and data-parallel training over processes (one per GPU), torch.distributed underneath.

One process per device, started by ``torchrun --nproc_per_node=N -m add_bench.train ...``, by a sweep's
launcher (``--procs-per-cell N``: N local gloo processes per cell; ``slurm.tasks_per_node`` ×
``slurm.nodes``: SLURM tasks, the process group from the SLURM environment through submitit's
``TorchDistributedEnvironment``: :func:`export_slurm_environment`).
Every process holds the whole student and discriminator. ``batch_size`` is the GLOBAL batch: each process
takes batch_size / processes samples (:func:`local_batch`), but every random draw of a step is made for
the whole global batch from the one cell seed and each process keeps its own rows (:func:`rows`, inside
:func:`global_batch`), so the processes' generators stay equal and the run does not depend on the process
count: N processes equal one process within float tolerance (the discriminator's BatchNormLocal groups of
8 and minibatch-std groups must then fall within one process's share: a local batch that is a multiple of
the group sizes). The gradients are averaged over processes before every optimiser step
(:func:`average_gradients`: one flat all-reduce per network, as StyleGAN2-ADA does, because R1's double
backward does not go through DistributedDataParallel's hooks). Parameters therefore stay equal on every
process; process 0 writes checkpoints, logs, the student and its metrics. A checkpoint holds the one
shared generator, so a run may resume with another process count.

A single process (no ``WORLD_SIZE`` in the environment, or 1) is the plain loop: nothing here changes
it, so embedded runs on one CPU are bit-identical with or without this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from add_bench.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        """Process 0 writes; the others only compute."""
        return self.rank == 0


def processes() -> Processes:
    """This process's place, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


# Set by launchers.CellJob in a cell whose launch asks for GPUs, to the launch that asked (for the message).
EXPECT_GPU_ENV = "ADD_BENCH_EXPECT_GPU"


def expect_gpu() -> None:
    """Raise when this process's launch asked for GPUs (``EXPECT_GPU_ENV``) and none is visible: a GPU preset
    is never trained on the CPU by accident."""
    import socket

    why = os.environ.get(EXPECT_GPU_ENV)
    if why:
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ConfigError(
            f"device='auto': {why}, but no CUDA device is visible on {socket.gethostname()} ({build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); check the allocation (the "
            "partition's GPUs, the sbatch --gpus-per-node) and torch's CUDA build, or set device=cpu to run "
            "this cell on the CPU on purpose"
        )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU (cuda:LOCAL_RANK) if one is visible, else the CPU (an error in a cell
    whose launch asked for GPUs: :func:`expect_gpu`); ``cpu``; ``cuda`` (= cuda:LOCAL_RANK) or ``cuda:N``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            expect_gpu()
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: no CUDA device is visible here; accepted: auto, cpu")
        return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    raise ConfigError(f"device={name!r}: unknown; accepted: auto, cpu, cuda, cuda:N")


def init(device: torch.device) -> Processes:
    """Join the process group when started as one of several processes (NCCL on GPUs, gloo on CPUs)."""
    p = processes()
    if p.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return p


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_batch(cfg: Any, p: Processes) -> int:
    """This process's share of the global ``cfg.batch_size`` (one place to combine with gradient
    accumulation); a batch that does not split evenly is an error before anything runs."""
    batch_size = cfg.batch_size
    if batch_size % p.world:
        raise ConfigError(
            f"batch_size={batch_size} (the global batch) does not split over {p.world} processes; accepted: a "
            f"multiple of {p.world}, or another process count (--procs-per-cell, slurm.nodes × slurm.tasks_per_node)"
        )
    return batch_size // p.world


_SHARE: Processes | None = None  # inside global_batch(): the process whose rows rows() keeps


@contextmanager
def global_batch(p: Processes) -> Iterator[None]:
    """Within: :func:`rows` draws for the global batch and keeps process ``p``'s rows (a training step)."""
    global _SHARE
    before, _SHARE = _SHARE, p
    try:
        yield
    finally:
        _SHARE = before


def rows(draw: Callable[[int], Any], n: int) -> Any:
    """``draw(m)`` makes m rows of random numbers (one per sample). Inside :func:`global_batch` with several
    processes: the draw for all processes' samples (n · processes: every process draws the same numbers)
    and this process's n rows of it; otherwise ``draw(n)`` itself."""
    p = _SHARE
    if p is None or p.world == 1:
        return draw(n)
    return draw(n * p.world)[p.rank * n : (p.rank + 1) * n]


def _comm_device() -> torch.device:
    """Where small collective tensors live: NCCL only reduces GPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_gradients(module: torch.nn.Module) -> None:
    """Replace every gradient by its mean over the processes (one flat all-reduce); a no-op alone."""
    if not active():
        return
    params = [q for q in module.parameters() if q.grad is not None]
    for q, g in zip(params, mean_tensors([q.grad for q in params])):
        q.grad = g


def mean_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor replaced by its mean over the processes (one flat all-reduce); alone, the tensors as is."""
    if not active() or not tensors:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [g.view_as(t) for t, g in zip(tensors, flat.split([t.numel() for t in tensors]))]


def mean_over_processes(row: dict[str, float]) -> dict[str, float]:
    """A log row averaged over the processes (a key some processes lack, e.g. a student timestep absent
    from their share of the batch, is averaged over those that have it); alone, the row itself."""
    if not active():
        return row
    rows = gather_objects(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def any_process(flag: bool) -> bool:
    """True on every process if it is True on one (e.g. a time budget ran out somewhere)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (alone: [obj])."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_in_sync(step: int, **modules: torch.nn.Module) -> None:
    """Raise if the processes' parameters differ: with equal initial weights and averaged gradients
    they stay bit-identical, so any difference is a bug or a faulty device, caught at checkpoints."""
    if not active():
        return
    mine = {name: float(sum(q.detach().double().sum() for q in m.parameters())) for name, m in modules.items()}
    everyone = gather_objects(mine)
    bad = [name for name in mine if len({sums[name] for sums in everyone}) > 1]
    if bad:
        from add_bench.errors import TrainingDiverged

        raise TrainingDiverged(
            f"step {step}: the processes' {', '.join(bad)} parameters differ "
            f"({[round(s[bad[0]], 6) for s in everyone]}); the last good checkpoint is kept"
        )


def check_same_stream(step: int, generator: torch.Generator) -> None:
    """Raise if the processes' generators differ: each draws the whole global batch (:func:`rows`), so they
    stay equal unless a draw of one process's share bypassed ``rows``."""
    if not active():
        return
    states = gather_objects(generator.get_state())
    if any(not torch.equal(states[0], s) for s in states[1:]):
        from add_bench.errors import TrainingDiverged

        raise TrainingDiverged(
            f"step {step}: the processes' random generators differ (a draw of one process's share of the batch "
            "instead of distributed.rows over the global batch); the last good checkpoint is kept"
        )


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Devices and data-parallel training over processes (one per GPU), torch.distributed underneath.

One process per device, started by ``torchrun --nproc_per_node=N -m add_bench.train ...`` (or inside a
SLURM job by hand: submitit's ``TorchDistributedEnvironment`` exports the same variables; the sweep's
launcher runs one process per cell).
Every process holds the whole student and discriminator; each draws its own share of the global batch
from its own generator, and the gradients are averaged over processes before every optimiser step
(:func:`average_gradients`: one flat all-reduce per network, as StyleGAN2-ADA does, because R1's
double backward does not go through DistributedDataParallel's hooks). Parameters therefore stay equal
on every process; process 0 writes checkpoints, logs, the student and its metrics.

A single process (no ``WORLD_SIZE`` in the environment, or 1) is the plain loop: nothing here changes
it, so embedded runs on one CPU are bit-identical with or without this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from add_bench.errors import ConfigError

RANK_SEED_STRIDE = 1_000_003  # process r > 0 draws from seed + r·stride (a prime, far from nearby seeds)


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


def rank_seed(seed: int, p: Processes) -> int:
    """Process 0 keeps the cell's seed (a one-process run is unchanged); others get their own stream."""
    return seed + p.rank * RANK_SEED_STRIDE


def local_batch(batch_size: int, p: Processes) -> int:
    """The global batch is split evenly over the processes."""
    if batch_size % p.world:
        raise ConfigError(
            f"batch_size={batch_size} does not split over {p.world} processes; accepted: a multiple of {p.world}"
        )
    return batch_size // p.world


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


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""The GPU plan of a sweep: ``python -m add_bench.sweep <ablation> base=sd21 --dry-run [--gpu A100-80GB]``.

For each cell still to run: its estimated peak GPU memory per process and its GPU-hours on the chosen GPU
(:mod:`add_bench.memory`: model sizes from the folders' configs, activations and FLOPs measured on the meta
device, a per-GPU throughput table; not this machine's CPU speed), the total, and an error naming every cell
whose estimate does not fit the GPU's memory (nothing was run on a GPU to check these numbers).
"""

from __future__ import annotations

import math
from typing import Any

from add_bench.errors import AddBenchError, ConfigError


def fitting_micro_batch(est: Any, memory_gib: float) -> int:
    """The largest micro-batch whose estimate fits ``memory_gib`` (0: not even one sample)."""
    from add_bench.memory import ALLOCATOR_OVERHEAD, GIB

    room = memory_gib * GIB / ALLOCATOR_OVERHEAD - est.fixed
    return max(0, math.floor(room / est.per_sample)) if est.per_sample > 0 else 0


def print_gpu_plan(ablations: list, out, only: set[str] | None, gpus: dict[str, str]) -> float:
    """Print each cell's memory and GPU-hours on its ablation's GPU (``gpus``: ablation name → GPU name), the total
    of the cells left to run; raise a ConfigError naming each cell that does not fit. Returns the total GPU-hours."""
    from add_bench.memory import GIB, estimate, gpu
    from add_bench.sweep import cell_status

    print(
        f"{'ablation':<16} {'cell':<22} {'seed':>4}  {'id':<12}  {'status':<8} {'gpu':<10} {'micro':>5} {'GiB':>7} {'s/step':>8} {'GPU-h':>7}"
    )
    total, seen, too_big = 0.0, set(), []
    for ab in ablations:
        name = gpus[ab.name]
        card = gpu(name)
        for c in ab.cells:
            status = cell_status(out / "cells" / c.id)
            if only is not None and c.id not in only and status != "done":
                status = "skipped"
            todo = status not in ("done", "skipped") and c.id not in seen
            if c.config.method != "add":
                print(
                    f"{ab.name:<16} {c.name:<22} {c.seed:>4}  {c.id:<12}  {status:<8} {name:<10}  not estimated ({c.config.method})"
                )
                seen.add(c.id)
                continue
            try:
                est = estimate(c.config, name)
            except AddBenchError as e:  # a folder without its configs: the path check below names what is missing
                print(f"{ab.name:<16} {c.name:<22} {c.seed:>4}  {c.id:<12}  {status:<8} {name:<10}  not estimated: {e}")
                seen.add(c.id)
                continue
            hours = est.gpu_hours if todo else 0.0
            shared = " (shared)" if c.id in seen else ""
            seen.add(c.id)
            total += hours
            gib = est.peak / GIB
            print(
                f"{ab.name:<16} {c.name:<22} {c.seed:>4}  {c.id:<12}  {status:<8} {name:<10} {est.micro_batch:>5} "
                f"{gib:>7.2f} {est.seconds_per_step:>8.3g} {hours:>7.2f}{shared}"
            )
            if todo and gib > card.memory_gib:
                fits = fitting_micro_batch(est, card.memory_gib)
                too_big.append(
                    f"  cell {c.id} ({ab.name}/{c.name} seed {c.seed}): ≈ {gib:.1f} GiB at micro-batch {est.micro_batch} "
                    f"on one {name} ({card.memory_gib:g} GiB); "
                    + (f"≤ {fits} samples per micro-batch fit" if fits else "not even one sample fits")
                )
    print(
        f"estimated {total:.1f} GPU-hours of training left (estimates from add_bench.memory, not measured on a GPU; "
        "evaluation not included)"
    )
    if too_big:
        raise ConfigError(
            f"{len(too_big)} cell(s) do not fit the GPU's memory; set micro_batch_size (a divisor of batch_size), "
            "precision=bf16 or gradient_checkpointing=true, or choose another --gpu:\n" + "\n".join(too_big)
        )
    return total

"""The GPU plan of a sweep: ``python -m add_bench.sweep <ablation> base=sd21 --dry-run [--gpu A100-80GB]``.

For each cell still to run: its estimated peak GPU memory per process and its GPU-hours on the chosen GPU
(:mod:`add_bench.memory`: model sizes from the folders' configs, activations and FLOPs measured on the meta
device, a per-GPU throughput table; not this machine's CPU speed), the total, and an error naming every cell
whose estimate does not fit the GPU's memory (nothing was run on a GPU to check these numbers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from add_bench.errors import AddBenchError, ConfigError, command_line


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


# ------------------------------------------------------------------------------ a plan without the weights
def model_configs_dir():
    """Architecture configs (no weights) of the cluster presets' Stable Diffusion folders: SD2.1 and SDXL base,
    in diffusers' layout (``config.json`` files: what the estimate reads)."""
    from add_bench.config import PRESETS_DIR

    return PRESETS_DIR / "model_configs"


MODEL_VARS = {"ADD_BENCH_SD21": "sd21", "ADD_BENCH_SDXL": "sdxl"}


def path_vars(*files: str) -> set[str]:
    """The ``ADD_BENCH_*`` variables the presets and the given ablation files (and the files they include)
    read paths from."""
    import re

    from add_bench.config import PRESETS_DIR

    texts = [p.read_text() for p in PRESETS_DIR.glob("*.yaml")]
    for f in files:
        texts += [p.read_text() for p in Path(f).parent.glob("**/*.yaml")]
    return {m for t in texts for m in re.findall(r"oc\.env:(ADD_BENCH_\w+)", t)}


def plan_rows(ablation: str, overrides: list[str], gpu_name: str) -> list[dict[str, Any]]:
    """Each ADD cell of ``ablation`` (with ``overrides``, e.g. ``base=sd21``) estimated on ``gpu_name`` from the
    shipped architecture configs: the SD folders' variables point at ``model_configs/``, the other paths (data,
    feature network and metric weights, which the estimate does not read) at placeholders, for the call only."""
    import os

    from add_bench.memory import GIB, estimate, gpu
    from add_bench.sweep import load_ablations

    card = gpu(gpu_name)
    values = {var: str(model_configs_dir() / name) for var, name in MODEL_VARS.items()}
    values |= {var: f"/not-read/{var.lower()}" for var in path_vars(ablation) - set(values)}
    saved = {var: os.environ.get(var) for var in values}
    os.environ.update(values)
    try:
        ablations = load_ablations(ablation, overrides)
    finally:
        for var, old in saved.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
    rows, seen = [], set()
    for ab in ablations:
        for c in ab.cells:
            if c.config.method != "add":
                continue
            est = estimate(c.config, gpu_name)
            rows.append(
                {
                    "ablation": ab.name,
                    "cell": c.name,
                    "seed": c.seed,
                    "id": c.id,
                    "shared": c.id in seen,  # the same cell in another ablation: computed once
                    "micro_batch": est.micro_batch,
                    "gib": est.peak / GIB,
                    "fits": est.peak / GIB <= card.memory_gib,
                    "seconds_per_step": est.seconds_per_step,
                    "steps": c.config.steps,
                    "gpu_hours": est.gpu_hours,
                }
            )
            seen.add(c.id)
    return rows


@command_line
def main(argv: list[str] | None = None) -> int:
    """python -m add_bench.cost ABLATION [key=value ...] --gpu A100-80GB [--out results/cluster_plan/NAME.json]"""
    import argparse
    import sys
    import time

    from add_bench.provenance import atomic_write_json, provenance

    p = argparse.ArgumentParser(
        prog="python -m add_bench.cost",
        description="GPU memory and GPU-hours of an ablation's cells at cluster scale, estimated from the shipped "
        "architecture configs of SD2.1 and SDXL (add_bench/presets/model_configs: no weights needed; not measured "
        "on a GPU). With the real folders at hand, `python -m add_bench.sweep ... --dry-run --gpu` gives the same.",
    )
    p.add_argument("ablation")
    p.add_argument("overrides", nargs="*", help="e.g. base=sd21 seeds=[0,1,2]")
    p.add_argument("--gpu", default="A100-80GB")
    p.add_argument("--out", help="write the plan (JSON, with provenance) here")
    a = p.parse_args(argv)
    start = time.time()
    rows = plan_rows(a.ablation, a.overrides, a.gpu)
    if not rows:
        raise ConfigError(f"{a.ablation}: no ADD cells to estimate")
    for r in rows:
        print(
            f"{r['ablation']:<16} {r['cell']:<22} {r['seed']:>4}  {r['id']}  micro {r['micro_batch']:>3}  "
            f"{r['gib']:7.2f} GiB{'' if r['fits'] else ' (does not fit)'}  {r['seconds_per_step']:6.3g} s/step  "
            f"{r['gpu_hours']:7.2f} GPU-h{' (shared)' if r['shared'] else ''}"
        )
    total = sum(r["gpu_hours"] for r in rows if not r["shared"])
    cells = sum(not r["shared"] for r in rows)
    print(f"{cells} cells, {total:.1f} GPU-hours of training on {a.gpu} (estimates; evaluation not included)")
    if a.out:
        command = " ".join(["python -m add_bench.cost", *(sys.argv[1:] if argv is None else argv)])
        atomic_write_json(
            Path(a.out),
            {
                "gpu": a.gpu,
                "cells": cells,
                "gpu_hours": total,
                "rows": rows,
                "provenance": provenance(None, None, time.time() - start, command=command),
            },
        )
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

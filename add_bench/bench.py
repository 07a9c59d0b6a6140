"""Performance ratios, measured in one run on this machine (timings live here, never in tests).

    python -m add_bench.bench [key=value ...] [--repeats 5] [--out results/bench/add_step.json]

Times one full ADD iteration (``add_bench.train.add_step``) and each of its component passes on the
same batch — student forward+backward, teacher target, feature network forward+backward on x̂θ,
feature network forward on x0 and c_img, discriminator heads forward+backward, and R1's extra cost
(amortised over ``discriminator.r1_every`` steps) — and reports the ratio of the full step to the sum
of its parts (≈ 1 means no overhead beyond the passes) and what R1 costs the heads' pass.

``--parallel`` instead measures a local sweep's two layouts in one run: ADD steps per second of one
process using all cores' threads against one 1-thread process per core running at once
(``python -m add_bench.sweep --workers N``), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from add_bench.augment import diff_augment
from add_bench.config import TrainConfig, load
from add_bench.data import load_split
from add_bench.errors import command_line
from add_bench.loop import set_threads
from add_bench.losses import discriminator_hinge_loss, generator_adversarial_loss, r1_penalty, teacher_target
from add_bench.provenance import atomic_write_json, provenance
from add_bench.train import add_step, build_networks, conditioning, optimisers


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_add_step(cfg: TrainConfig, repeats: int = 5) -> dict[str, float]:
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg)
    data = cfg.data
    x, y = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()
    x0, labels = x[: cfg.batch_size], y[: cfg.batch_size]
    gen = torch.Generator().manual_seed(0)
    opt_s = torch.optim.Adam(nets.student.unet.parameters(), lr=0.0)  # lr 0: timing only, weights unchanged
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), lr=0.0)
    n = x0.shape[0]
    s = torch.full((n,), max(cfg.student.timesteps))
    t = torch.full((n,), (cfg.teacher.t_min + cfg.teacher.t_max) // 2)
    eps = torch.randn(x0.shape, generator=gen)
    x_student = nets.student(x0, s, labels).x0.detach()
    c_text, c_img = conditioning(nets, x0, labels)
    aug = cfg.discriminator.augment

    def student_pass():
        nets.student.unet.zero_grad(set_to_none=True)
        nets.student(x0, s, labels).x0.mean().backward()

    def teacher_pass():
        teacher_target(nets.teacher, x_student, labels, t, eps, cfg.teacher.steps, cfg.teacher.cfg_scale)

    def fake_features_pass():
        xs = x_student.clone().requires_grad_(True)
        nets.discriminator.requires_grad_(False)
        generator_adversarial_loss(
            nets.discriminator(nets.feature_network(diff_augment(xs, aug, gen)), c_text, c_img)
        ).backward()
        nets.discriminator.requires_grad_(True)

    def real_features_pass():
        with torch.no_grad():
            nets.feature_network(diff_augment(x0, aug, gen))
            conditioning(nets, x0, labels)

    with torch.no_grad():
        real_f = nets.feature_network(diff_augment(x0, aug, gen))
        fake_f = nets.feature_network(diff_augment(x_student, aug, gen))

    def heads_pass(gamma: float):
        rf = [f.clone().requires_grad_(gamma > 0) for f in real_f]
        real = nets.discriminator(rf, c_text, c_img)
        fake = nets.discriminator(fake_f, c_text, c_img)
        nets.discriminator.zero_grad(set_to_none=True)
        (discriminator_hinge_loss(real, fake) + r1_penalty(real, rf, gamma)).backward()

    parts = {
        "student_fwd_bwd": student_pass,
        "teacher_target": teacher_pass,
        "feature_network_fake_fwd_bwd": fake_features_pass,
        "feature_network_real_fwd": real_features_pass,
        "discriminator_heads_fwd_bwd": lambda: heads_pass(0.0),
    }
    timings = {k: median_seconds(fn, repeats) for k, fn in parts.items()}
    every = cfg.discriminator.r1_every
    if cfg.discriminator.r1_gamma > 0:  # R1's double backward, paid on every r1_every-th step
        with_r1 = median_seconds(lambda: heads_pass(cfg.discriminator.r1_gamma), repeats)
        timings["ratio_heads_with_r1_to_without"] = with_r1 / timings["discriminator_heads_fwd_bwd"]
        timings["r1_extra_per_step"] = max(0.0, with_r1 - timings["discriminator_heads_fwd_bwd"]) / every
    step = [0]

    def full():  # a whole lazy-R1 period, so the R1 step is counted once per ``every`` steps
        for _ in range(every):
            add_step(nets, cfg, x0, labels, gen, opt_s, opt_d, step[0])
            step[0] += 1

    timings["add_step"] = median_seconds(full, repeats) / every
    timings["sum_of_parts"] = sum(timings[k] for k in parts) + timings.get("r1_extra_per_step", 0.0)
    timings["ratio_step_to_parts"] = timings["add_step"] / timings["sum_of_parts"]
    return timings


# ------------------------------------------------------------------ local sweep layout: workers vs threads
def _timed_steps(cfg_yaml: str, threads: int, steps: int, barrier) -> float:
    """In a fresh process: ``threads`` torch threads, build one cell's networks, 2 warm-up ADD steps,
    wait at ``barrier`` (so parallel workers are timed over the same interval), then time ``steps``."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(cfg_yaml))
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg)
    data = cfg.data
    x, y = load_split("train", data.root, data.val_size, data.split_seed, data.download).tensors()
    gen = torch.Generator().manual_seed(0)
    opt_s, opt_d = optimisers(nets, cfg)

    def one(step: int) -> None:
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        add_step(nets, cfg, x[idx], y[idx], gen, opt_s, opt_d, step)

    for i in range(2):
        one(i)
    barrier.wait()
    start = time.perf_counter()
    for i in range(steps):
        one(2 + i)
    return time.perf_counter() - start


def bench_workers(cfg: TrainConfig, steps: int = 30, cores: int | None = None) -> dict[str, float]:
    """Throughput of a local sweep's layouts on this machine, measured in one run: one cell at a time
    using every core's threads (``--workers 1``), one cell per core at 1 thread each (``--workers
    <cores>``), and one more 1-thread cell than cores (oversubscribed: what a sweep whose cell count is
    not a multiple of the cores can run instead of a last round on fewer cells). Ratios > 1 mean the
    layout finishes a sweep of many cells sooner than one cell on all cores."""
    import concurrent.futures as cf
    import multiprocessing

    from omegaconf import OmegaConf

    from add_bench.launchers import usable_cores

    cores = cores or usable_cores()
    text = OmegaConf.to_yaml(cfg)
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, float] = {"cores": float(cores)}
    layouts = ((1, cores), (cores, 1), (cores + 1, 1))
    with ctx.Manager() as manager:
        for workers, threads in layouts:
            barrier = manager.Barrier(workers)
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                secs = list(
                    pool.map(
                        _timed_steps, [text] * workers, [threads] * workers, [steps] * workers, [barrier] * workers
                    )
                )
            out[f"steps_per_s_{workers}_workers_x_{threads}_threads"] = sum(steps / t for t in secs)
    one = out[f"steps_per_s_1_workers_x_{cores}_threads"]
    out["ratio_workers_to_threads"] = out[f"steps_per_s_{cores}_workers_x_1_threads"] / one
    out["ratio_oversubscribed_to_threads"] = out[f"steps_per_s_{cores + 1}_workers_x_1_threads"] / one
    return out


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="TrainConfig overrides key=value (batch_size=32, ...)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the timings JSON (with provenance) here")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="instead: sweep throughput of N workers × 1 thread against 1 worker × N threads",
    )
    p.add_argument("--steps", type=int, default=30, help="--parallel: ADD steps timed per process")
    a = p.parse_args(argv)
    cfg = load(TrainConfig, overrides=a.overrides)
    start = time.time()
    timings = bench_workers(cfg, a.steps) if a.parallel else bench_add_step(cfg, a.repeats)
    for k, v in timings.items():
        unit = "" if k.startswith(("ratio", "steps_per_s", "cores")) else " s"
        print(f"{k:<40} {v:12.6f}{unit}")
    if a.out:
        command = " ".join(["python -m add_bench.bench", *(sys.argv[1:] if argv is None else argv)])
        atomic_write_json(
            Path(a.out),
            {
                "timings": timings,
                "batch_size": cfg.batch_size,
                "provenance": provenance(cfg, cfg.seed, time.time() - start, command=command),
            },
        )
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

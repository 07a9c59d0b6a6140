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

``--against REF`` instead times ADD steps of this tree and of the git commit REF (a temporary worktree)
in one run, in alternating rounds, on the same config, seed, batches and thread count
(:mod:`add_bench.step_timer`), and compares the losses each step logged.

``--profile`` instead profiles ADD steps and progressive-distillation steps with ``torch.profiler``: the
operators' share of the step and the time per sample at several batch sizes (constant: compute-bound;
falling with the batch: per-operator overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from add_bench.augment import diff_augment
from add_bench.config import TrainConfig, add_cfg_option, load, print_job
from add_bench.data import load_split
from add_bench.errors import ConfigError, command_line
from add_bench.loop import set_threads
from add_bench.losses import discriminator_hinge_loss, generator_adversarial_loss, r1_penalty, teacher_target
from add_bench.provenance import REPO_ROOT, atomic_write_json, provenance
from add_bench.train import FashionMnistBatches, add_step, build_networks, conditioning, optimisers


def first_batch(cfg: TrainConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels of the training split: the fixed batch a timing runs on."""
    x, y = FashionMnistBatches(cfg).batch(torch.arange(n), None)[:2]
    return x, y


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
    x0, labels = first_batch(cfg, cfg.batch_size)
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
    # what ADD costs beyond the passes a plain distillation step would make anyway
    timings["ratio_step_to_student_and_teacher"] = timings["add_step"] / (
        timings["student_fwd_bwd"] + timings["teacher_target"]
    )
    return timings


# ------------------------------------------------------------------ local sweep layout: workers vs threads
def _timed_steps(cfg_yaml: str, threads: int, steps: int, barrier) -> float:
    """In a fresh process: ``threads`` torch threads, build one cell's networks, 2 warm-up ADD steps,
    wait at ``barrier`` (so parallel workers are timed over the same interval), then time ``steps``."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
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
    for workers, threads in layouts:  # training only: a cell's evaluation comes on top
        rate = out[f"steps_per_s_{workers}_workers_x_{threads}_threads"]
        out[f"cells_per_hour_training_{workers}_workers_x_{threads}_threads"] = rate * 3600 / cfg.steps
    return out


# ------------------------------------------------------------------ where the time goes
OP_CLASSES = {  # operator name fragments → class (first match wins); the rest is "other"
    "convolution": ("convolution",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"),
    "attention": ("scaled_dot_product",),
    "normalisation": ("norm", "aten::var"),
    "optimiser": ("Optimizer.step", "aten::lerp_", "aten::_foreach"),
}


def op_class(name: str) -> str:
    return next((c for c, parts in OP_CLASSES.items() if any(p in name for p in parts)), "other")


def profile_steps(step: Callable[[], object], steps: int, top: int = 12) -> dict:
    """``torch.profiler`` over ``steps`` calls of ``step`` (after one warm-up): seconds per step, the
    ``top`` operators by self CPU time and each operator class's share of the profiled time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    classes: dict[str, float] = {}
    for e in events:
        classes[op_class(e.key)] = classes.get(op_class(e.key), 0.0) + e.self_cpu_time_total / total
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:top]
    ]
    return {"s_per_step_profiled": wall, "op_classes": dict(sorted(classes.items())), "top_ops": ops}


def progressive_halving_step(cfg: TrainConfig) -> Callable[[], None]:
    """One optimiser step of progressive distillation's first halving stage on a fixed batch (the student
    a copy of the teacher), as ``progressive.train_progressive`` takes it."""
    from add_bench.diffusion import Denoiser, schedule_from_card
    from add_bench.networks.unets import build_unet, load_into, read_card
    from add_bench.progressive import frozen_denoiser, progressive_step, stage_timesteps, stages
    from add_bench.provenance import resolve_weights

    folder = resolve_weights(cfg.teacher.network)
    card = read_card(folder)
    schedule = schedule_from_card(card)
    teacher = frozen_denoiser(folder, card, schedule)
    student = Denoiser(load_into(build_unet(card["unet"]), folder).train(), schedule, teacher.null_label)
    opt = torch.optim.Adam(student.unet.parameters(), lr=0.0)
    stage = next(s for s in stages(cfg) if s.name == "halving")
    grid = stage_timesteps(schedule, stage)
    x0, labels = first_batch(cfg, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)

    def step() -> None:
        loss = progressive_step(student, teacher, stage, grid, x0, labels, gen, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def add_step_on_batch(cfg: TrainConfig, batch_size: int, compiled: bool = False) -> Callable[[], None]:
    """One ADD step (``train.add_step``, its optimisers at lr 0) on a fixed batch of ``batch_size``;
    ``compiled``: the student, teacher and feature network wrapped in ``torch.compile`` (the discriminator
    heads stay eager: R1's double backward is not supported by compiled autograd)."""
    nets = build_networks(cfg)
    if compiled:
        nets.student.unet = torch.compile(nets.student.unet)
        nets.teacher.unet = torch.compile(nets.teacher.unet)
        same = nets.c_img_network is nets.feature_network
        nets.feature_network = torch.compile(nets.feature_network)
        nets.c_img_network = nets.feature_network if same else nets.c_img_network
    x0, labels = first_batch(cfg, batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt_s = torch.optim.Adam(nets.student.unet.parameters(), lr=0.0)
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), lr=0.0)
    counter = [1]  # odd steps: no lazy-R1 step, the common case

    def step() -> None:
        add_step(nets, cfg, x0, labels, gen, opt_s, opt_d, counter[0])
        counter[0] += 2

    return step


def bench_profile(cfg: TrainConfig, steps: int = 5, batches: tuple[int, ...] = (16, 32, 64)) -> dict:
    """Profiles of an ADD step and a progressive-distillation step at ``cfg.batch_size``, and an ADD step's
    seconds per sample at each of ``batches``."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = {
        "add_step": profile_steps(add_step_on_batch(cfg, cfg.batch_size), steps),
        "progressive_step": profile_steps(progressive_halving_step(cfg), steps),
    }
    per_sample = {}
    for b in batches:
        per_sample[str(b)] = median_seconds(add_step_on_batch(cfg, b), steps) / b
    out["add_step_s_per_sample_by_batch"] = per_sample
    out["ratio_s_per_sample_smallest_to_largest_batch"] = per_sample[str(min(batches))] / per_sample[str(max(batches))]
    eager = per_sample[str(cfg.batch_size)] * cfg.batch_size if str(cfg.batch_size) in per_sample else None
    eager = eager or median_seconds(add_step_on_batch(cfg, cfg.batch_size), steps)
    step = add_step_on_batch(cfg, cfg.batch_size, compiled=True)
    step(), step()  # compilation (and the recompilation for the other grad mode) happens here
    out["ratio_eager_to_compiled"] = eager / median_seconds(step, steps)
    bf16 = OmegaConf.merge(cfg, {"precision": "bf16"})
    out["ratio_fp32_to_bf16_autocast"] = eager / median_seconds(add_step_on_batch(bf16, cfg.batch_size), steps)
    return out


def print_timings(timings: dict, indent: str = "", seconds: bool = True) -> None:
    """The bench's numbers, nested dicts indented; ``seconds``: unmarked numbers are times in seconds."""
    for k, v in timings.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            print_timings(v, indent + "  ", seconds and k != "op_classes")
        elif isinstance(v, list):
            print(f"{indent}{k}:")
            for row in v:
                print(f"{indent}  {row}")
        elif isinstance(v, (str, int)):
            print(f"{indent}{k:<40} {v}")
        else:
            unit = "" if not seconds or k.startswith(("ratio", "steps_per_s", "cores", "loss", "threads")) else " s"
            print(f"{indent}{k:<40} {v:12.6f}{unit}")


# ------------------------------------------------------------------ this tree against another commit
LOSS_RTOL = 1e-4  # losses of the same seed agree to this relative tolerance ("equal within float tolerance")


def step_timer_run(tree: Path, overrides: list[str], steps: int, warmup: int) -> dict:
    """:mod:`add_bench.step_timer` (this tree's file) run with ``tree``'s package, in a fresh process."""
    script = Path(__file__).with_name("step_timer.py")
    code = f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(steps), str(warmup), *overrides],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"ADD steps in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_agreement(a: list[dict], b: list[dict], rtol: float = LOSS_RTOL) -> dict:
    """Largest relative difference of the losses both runs logged, step by step, and the first step over
    ``rtol`` (-1: none)."""
    worst, first = 0.0, -1
    for step, (ra, rb) in enumerate(zip(a, b)):
        for key in ra.keys() & rb.keys():
            diff = abs(ra[key] - rb[key]) / max(abs(ra[key]), abs(rb[key]), 1e-12)
            worst = max(worst, diff)
            if diff > rtol and first < 0:
                first = step
    return {"loss_max_rel_diff": worst, "loss_first_step_over_rtol": first, "loss_rtol": rtol}


def bench_against(ref: str, overrides: list[str], steps: int = 10, warmup: int = 2, rounds: int = 2) -> dict:
    """Seconds per ADD step of commit ``ref`` and of this tree, measured in alternating rounds of the same
    config (each round a fresh process per tree), their ratio, and whether the steps' losses agree."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)

    if git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode:
        raise ConfigError(f"--against {ref}: not a commit of the repository at {REPO_ROOT} (a hash, tag or branch)")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "ref"
        git("worktree", "add", "--detach", str(tree), ref).check_returncode()
        try:
            runs: dict[str, list[dict]] = {"ref": [], "current": []}
            for _ in range(rounds):
                for name, root in (("ref", tree), ("current", REPO_ROOT)):
                    runs[name].append(step_timer_run(root, overrides, steps, warmup))
        finally:
            git("worktree", "remove", "--force", str(tree))
    median = {k: statistics.median(s for r in v for s in r["seconds"]) for k, v in runs.items()}
    return {
        "ref": ref,
        "s_per_step_ref": median["ref"],
        "s_per_step_current": median["current"],
        "ratio_ref_to_current": median["ref"] / median["current"],
        "threads": runs["current"][0]["threads"],
        **loss_agreement(runs["ref"][0]["losses"], runs["current"][0]["losses"]),
    }


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
    p.add_argument("--steps", type=int, default=30, help="--parallel / --against: ADD steps timed per process")
    p.add_argument("--against", metavar="REF", help="instead: this tree's ADD step against git commit REF's")
    p.add_argument("--rounds", type=int, default=2, help="--against: alternating rounds (a fresh process each)")
    p.add_argument("--profile", action="store_true", help="instead: torch.profiler summary of ADD and PD steps")
    add_cfg_option(p)
    a = p.parse_args(argv)
    cfg = load(TrainConfig, overrides=a.overrides)
    if a.cfg:
        print_job(cfg)
        return 0
    start = time.time()
    if a.against:
        timings = bench_against(a.against, a.overrides, a.steps, rounds=a.rounds)
    elif a.profile:
        timings = bench_profile(cfg, a.repeats)
    elif a.parallel:
        timings = bench_workers(cfg, a.steps)
    else:
        timings = bench_add_step(cfg, a.repeats)
    print_timings(timings)
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

"""Which of the student's sampling steps loses: a hand-off ladder between an ADD student and its teacher.

    python -m add_bench.handoff ablations/methods.yaml 'seeds=[0,1,2]' --cells add1,add_reg1 \
        [--root results] [--out results/handoff] [--steps 2 4]

ADD samples in n steps on the student's timesteps (n = 4: τ = 999, 749, 499, 249): predict x0, re-noise it
with fresh noise to the next τ, predict again (:func:`add_bench.diffusion.sample_add`). Rung k of the ladder
runs that same chain with the student at its first k timesteps and the cell's teacher (``teacher.network``
at ``teacher.cfg_scale``) at the others, on the same noise and fresh-noise draws:

- k = n is the student's own n-step sampling (it reproduces the cell's evaluation: the ``cell_fid`` column);
- k = 0 is the teacher alone on ADD's sampler (its DDIM rows are in ``results/teacher``);
- k = 1 is the student's 1-step sample refined by the teacher at the lower timesteps.

Nothing is trained. If the student's n-step FID is worse than its 1-step refined by the teacher (k = 1), the
student is worse than its teacher at the lower timesteps; the rung at which FID rises names the step.
If the teacher alone (k = 0) is also worse on this sampler than with DDIM, the re-noising sampler itself loses.

Beside the ladder (``--no-denoise``: without it; ``--no-ladder``: only it), each network's one-step denoising
of real images: validation images (never trained on) noised to each τ of T_student, x0 predicted once by the
student and by the teacher, scored like samples (``denoise.md``). A student worse than its teacher there on
real inputs has a degraded map at that τ; equal there but worse in the ladder points at its own samples as
inputs instead.

Each rung is scored on the cell's own evaluation settings (``eval``: samples, seed, metrics) and written to
``<out>/rows/<key>.json`` with provenance (a re-run skips the finished ones; the teacher-alone rung is shared by
every cell with that teacher and settings); ``<out>/table.md`` and ``table.csv`` hold mean ± 95% CI over seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from add_bench.config import check_positive, to_dict
from add_bench.diffusion import Denoiser, add_timesteps, sample_add_chain
from add_bench.errors import ConfigError, command_line
from add_bench.provenance import atomic_write_json, atomic_write_text, provenance, resolve_weights, weights_versions

METRICS = ("fid", "recall", "coverage", "align_prob", "intra_fid")


def handoff_sampler(teacher: Denoiser, teacher_cfg: float, k: int):
    """A sampler (diffusion.SAMPLERS' signature) running ADD's chain with the student (the ``denoiser`` it is
    called with, unguided) at the first ``k`` of its timesteps and ``teacher`` at ``teacher_cfg`` after them."""

    def sample_handoff(student: Denoiser, noise, labels, steps: int, cfg_scale: float = 1.0, generator=None):
        taus = add_timesteps(student.schedule, steps, student.student_timesteps)
        if not 0 <= k <= len(taus):
            raise ConfigError(f"hand-off after {k} student steps: accepted 0..{len(taus)} for {steps} steps")
        models = [(student, cfg_scale)] * k + [(teacher, teacher_cfg)] * (len(taus) - k)
        return sample_add_chain(models, noise, labels, taus, generator)

    sample_handoff.__name__ = f"handoff{k}"
    return sample_handoff


def rung_nfe(steps: int, k: int, teacher_cfg: float) -> int:
    """Network evaluations per sample: one per student step, one or two (CFG) per teacher step."""
    return k + (steps - k) * (2 if teacher_cfg != 1.0 else 1)


def rung_spec(cfg: Any, student: Path | None, steps: int, k: int) -> dict[str, Any]:
    """What decides a rung's samples; the teacher-alone rung (k = 0) names no student."""
    folders = {"teacher": Path(cfg.teacher.network)}
    if k:
        folders["student"] = student
    versions = weights_versions({role: resolve_weights(f) for role, f in folders.items()})
    return {
        "teacher": str(cfg.teacher.network),
        "teacher_cfg": float(cfg.teacher.cfg_scale),
        "student": str(student) if k else None,
        "weights": {role: v.get("blob") for role, v in versions.items()},
        "steps": steps,
        "k": k,
        "eval": to_dict(cfg.eval),
    }


def rung_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


@cache
def loaded(folder: str | Path) -> Denoiser:
    """A weights folder's denoiser, loaded once per process (the ladder and the denoising rows share them)."""
    from add_bench.evaluate import load_denoiser

    return load_denoiser(folder)[0]


def run_rung(cfg: Any, folder: Path, steps: int, k: int, suite) -> dict[str, Any]:
    """Sample and score one rung on the cell's evaluation settings (``suite()``: the metrics)."""
    from add_bench.evaluate import generate
    from add_bench.metrics import score

    student, teacher = loaded(folder), loaded(resolve_weights(cfg.teacher.network))
    if k < steps and teacher.schedule.cfg != student.schedule.cfg:
        # the chain re-noises on the next model's schedule; below the top timestep the two must agree
        for tau in add_timesteps(student.schedule, steps, student.student_timesteps)[1:]:
            if not all(
                abs(float(a) - float(b)) < 1e-6
                for a, b in zip(student.schedule.alpha_sigma(tau), teacher.schedule.alpha_sigma(tau))
            ):
                raise ConfigError(
                    f"{folder}: its schedule differs from its teacher's ({cfg.teacher.network}) at t = {tau}; "
                    "the hand-off ladder needs one schedule below the student's top timestep"
                )
    g = generate(
        student,
        handoff_sampler(teacher, float(cfg.teacher.cfg_scale), k),
        steps,
        cfg.eval.num_samples,
        cfg.eval.seed,
        cfg.eval.batch_size,
        1.0,
    )
    return {"nfe": rung_nfe(steps, k, float(cfg.teacher.cfg_scale)), **score(suite(), g.samples)}


def cells_of(ablation: str, overrides: list[str], names: list[str], root: Path) -> list[tuple[Any, Path, dict]]:
    """(cell, its folder, its trained.json record) for every seed of the named ADD rows, each cell once."""
    from add_bench.sweep import load_ablations, read_trained, selected_ids

    abls = load_ablations(ablation, overrides)
    ids = selected_ids(abls, names, ablation)
    out, seen = [], set()
    for ab in abls:
        for c in ab.cells:
            if c.id not in (ids or set()) or c.id in seen:
                continue
            seen.add(c.id)
            if c.config.method != "add":
                raise ConfigError(f"--cells {c.name}: method {c.config.method!r}; the hand-off ladder takes ADD rows")
            folder = root / "cells" / c.id
            if not (folder / "metrics.json").is_file():
                raise ConfigError(
                    f"{folder}: row {c.name} seed {c.seed} is not finished (no metrics.json); run "
                    f"`python -m add_bench.sweep {ablation} --cells {c.name} --out {root}` first"
                )
            out.append((c, folder, read_trained(folder)))
    return out


def cell_fid(folder: Path, steps: int) -> float | None:
    rows = json.loads((folder / "metrics.json").read_text())["rows"]
    return next((r["fid"] for r in rows if r["steps"] == steps), None)


def stored_row(out: Path, spec: dict[str, Any], what: str, compute, eval_cfg: Any) -> dict[str, Any]:
    """The row of ``spec`` from ``<out>/rows/<key>.json``, or ``compute()``'s scores written there with provenance."""
    path = out / "rows" / f"{rung_key(spec)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    print(f"handoff: {what}", file=sys.stderr)
    start = time.time()
    row = {
        "spec": spec,
        **compute(),
        "provenance": provenance(
            eval_cfg,
            eval_cfg.seed,
            time.time() - start,
            command=" ".join(["python -m add_bench.handoff", *sys.argv[1:]]),
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    print(f"wrote {path}: FID {row['fid']:.3f}", file=sys.stderr)
    return row


def student_folder(trained: dict[str, Any], steps: int) -> Path:
    return Path(trained["checkpoints"].get(str(steps), next(iter(trained["checkpoints"].values()))))


def ladder(cells: list[tuple[Any, Path, dict]], out: Path, steps_list: list[int], suite) -> pd.DataFrame:
    """Every rung of each cell (missing ones are run); one row per (cell, steps, k)."""
    records = []
    for cell, folder, trained in cells:
        for steps in steps_list:
            student = student_folder(trained, steps)
            for k in range(steps + 1):
                spec = rung_spec(cell.config, student, steps, k)
                row = stored_row(
                    out,
                    spec,
                    f"{cell.name} seed {cell.seed} ({cell.id}), {steps} steps, k = {k}",
                    partial(run_rung, cell.config, student, steps, k, suite),
                    cell.config.eval,
                )
                records.append(
                    {
                        "row": cell.label,
                        "seed": cell.seed,
                        "cell": cell.id,
                        "key": rung_key(spec),  # the teacher-alone rung is one row shared by every seed
                        "steps": steps,
                        "k": k,
                        "nfe": row["nfe"],
                        "cell_fid": cell_fid(folder, steps) if k == steps else None,
                        **{m: row.get(m) for m in METRICS},
                    }
                )
    return pd.DataFrame(records)


# ------------------------------------------------------------------------- one-step denoising of real images
@torch.no_grad()
def denoise_real(weights: Path, cfg_scale: float, tau: int, cfg: Any, suite) -> dict[str, Any]:
    """The ``weights`` folder's x0 predicted in one step from validation images (never trained on) noised to ``tau`` on the denoiser's own
    schedule with fixed noise (``eval.seed``), scored like samples; ``mse``: against the clean images, in [−1, 1]."""
    from add_bench.data import load_split, to_uint8
    from add_bench.diffusion import add_noise
    from add_bench.metrics import SampleSet, score

    denoiser, d = loaded(weights), cfg.data
    x0, labels = load_split("val", d.root, d.val_size, d.split_seed, d.download).tensors()
    n = min(cfg.eval.num_samples, len(x0))
    x0, labels = x0[:n], labels[:n]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.eval.seed))
    alpha, sigma = denoiser.schedule.alpha_sigma(tau)
    images, sq = [], 0.0
    for i in range(0, n, cfg.eval.batch_size):
        j = i + cfg.eval.batch_size
        x0_hat = denoiser(add_noise(x0[i:j], eps[i:j], alpha, sigma), tau, labels[i:j], cfg_scale).x0
        sq += float(((x0_hat.clamp(-1, 1) - x0[i:j]) ** 2).sum())
        images.append(to_uint8(x0_hat))
    scores = score(suite(), SampleSet(np.concatenate(images), labels.numpy()))
    return {"nfe": 2 if cfg_scale != 1.0 else 1, "mse": sq / x0.numel(), **scores}


def denoising(cells: list[tuple[Any, Path, dict]], out: Path, suite) -> pd.DataFrame:
    """Student, teacher and the student's initial weights (``init``: the network it was copied from, unguided, on
    that network's own schedule; pretrained init only) at each of the student's timesteps: one row per (cell, τ,
    model). The teacher's rows (at its training CFG) and the init's are shared by every cell with those settings."""
    records = []
    for cell, _, trained in cells:
        models = {
            "student": (student_folder(trained, 1), 1.0),
            "teacher": (resolve_weights(cell.config.teacher.network), float(cell.config.teacher.cfg_scale)),
        }
        if cell.config.student.init == "pretrained":
            models["init"] = (resolve_weights(cell.config.student.network), 1.0)
        for model, (weights, scale) in models.items():
            for tau in cell.config.student.timesteps:
                spec = {
                    "denoise": tau,
                    "model": model,
                    "weights": weights_versions({model: weights}).get(model, {}).get("blob"),
                    "path": str(weights),
                    "cfg_scale": scale,
                    "eval": to_dict(cell.config.eval),
                    "data": to_dict(cell.config.data),
                }
                row = stored_row(
                    out,
                    spec,
                    f"{cell.name} seed {cell.seed}: {model} denoising at t = {tau}",
                    partial(denoise_real, weights, scale, tau, cell.config, suite),
                    cell.config.eval,
                )
                records.append(
                    {
                        "row": cell.label,
                        "seed": cell.seed,
                        "cell": cell.id,
                        "key": rung_key(spec),  # the teacher's rows are shared by every seed
                        "t": tau,
                        "model": model,
                        "nfe": row["nfe"],
                        "mse": row["mse"],
                        **{m: row.get(m) for m in METRICS},
                    }
                )
    return pd.DataFrame(records)


def over_seeds(rows: pd.DataFrame, metric: str, digits: int) -> str | None:
    """Mean ± 95% CI over seeds as the sweep's tables write it (:func:`add_bench.tables.fmt`); seeds that share
    one stored row (the teacher's) are one measurement."""
    from add_bench.tables import ci95, fmt

    values = rows.drop_duplicates("key")[metric]
    return fmt(values.mean(), ci95(values), len(values), digits)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± 95% CI over seeds per (row, steps, k)."""
    out = []
    for (row, steps, k), g in df.groupby(["row", "steps", "k"], sort=False):
        entry = {"setting": row, "steps": steps, "student steps k": k, "NFE": int(g["nfe"].iloc[0])}
        for m in ("fid", "recall", "coverage"):
            entry[m] = over_seeds(g, m, 2 if m == "fid" else 3)
        entry["seeds"] = len(g)
        out.append(entry)
    return pd.DataFrame(out)


def write_table(df: pd.DataFrame, out: Path) -> Path:
    table = summary(df)
    atomic_write_text(out / "table.csv", df.to_csv(index=False))
    checked = df.dropna(subset=["cell_fid"])
    worst = float((checked["fid"] - checked["cell_fid"]).abs().max()) if len(checked) else float("nan")
    lines = [
        "# Hand-off ladder: the student at its first k sampling steps, the teacher at the rest",
        "",
        "Written by `python -m add_bench.handoff` (module docstring: what a rung is). Same noise and fresh-noise draws "
        "in every rung; k = steps is the student's own sampling, k = 0 the teacher alone (at its training CFG) on "
        "ADD's re-noising sampler. FID-5000 and recall / coverage as in the sweep's tables; mean ± 95% CI over seeds.",
        "",
        table.to_markdown(index=False),
        "",
        f"- the rungs k = steps reproduce the cells' own evaluations: largest |FID difference| {worst:.2g} "
        f"over {len(checked)} cell(s)",
        "- per cell and seed: `table.csv`; each rung with its provenance: `rows/`",
    ]
    path = out / "table.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_denoise_table(df: pd.DataFrame, out: Path) -> Path:
    """``denoise.md`` / ``denoise.csv``: per row and timestep, the student's and the teacher's one-step denoising
    of real images (mean ± 95% CI over seeds; the teacher's is one number)."""
    atomic_write_text(out / "denoise.csv", df.to_csv(index=False))
    table = []
    for (row, tau), g in df.groupby(["row", "t"], sort=False):
        entry = {"setting": row, "t": tau}
        for model in ("student", "teacher", "init"):
            m = g[g["model"] == model]
            if m.empty:
                continue
            entry[f"{model} FID"] = over_seeds(m, "fid", 2)
            entry[f"{model} recall"] = over_seeds(m, "recall", 3)
            entry[f"{model} MSE"] = f"{m['mse'].mean():.4f}"
        entry["seeds"] = int((g["model"] == "student").sum())
        table.append(entry)
    lines = [
        "# One-step denoising of real images at the student's timesteps",
        "",
        "Written by `python -m add_bench.handoff`: validation images (never trained on) noised to t with fixed noise, "
        "each network on its own schedule (the student's t = 999 is pure noise), x0 predicted in one step and scored "
        "like samples (FID, recall) and against the clean images (MSE in [−1, 1]); the teacher at its training CFG; "
        "init: the weights the student started from, unguided, on their own schedule.",
        "",
        pd.DataFrame(table).to_markdown(index=False),
        "",
        "- per cell and seed: `denoise.csv`; each row with its provenance: `rows/`",
    ]
    path = out / "denoise.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


@command_line(ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.handoff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ablation", help="the ablation YAML whose ADD rows to take (ablations/*.yaml)")
    p.add_argument("overrides", nargs="*", help="the sweep's overrides of those rows (seeds=[0,1,2], ...)")
    p.add_argument("--cells", required=True, help="row names, comma-separated (every seed of each)")
    p.add_argument("--root", default="results", help="the sweep's results folder holding cells/<id>/")
    p.add_argument("--out", default="results/handoff")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4], help="the sampling step counts to ladder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--no-denoise", action="store_true", help="only the ladder, not the one-step denoising rows")
    p.add_argument("--no-ladder", action="store_true", help="only the one-step denoising rows, not the ladder")
    a = p.parse_intermixed_args(argv)
    if a.no_ladder and a.no_denoise:
        raise ValueError("--no-ladder and --no-denoise together leave nothing to do: give at most one")
    for s in a.steps:
        check_positive(s, "--steps")
    from add_bench.loop import set_threads

    set_threads(a.threads)
    out, made = Path(a.out), {}

    def suite():
        from add_bench.metrics import build_suite

        if "suite" not in made:
            made["suite"] = build_suite(cells[0][0].config.eval)
        return made["suite"]

    cells = cells_of(a.ablation, a.overrides, a.cells.split(","), Path(a.root))
    if not a.no_ladder:
        df = ladder(cells, out, a.steps, suite)
        print(f"wrote {write_table(df, out)}", file=sys.stderr)
    if not a.no_denoise:
        den = denoising(cells, out, suite)
        print(f"wrote {write_denoise_table(den, out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

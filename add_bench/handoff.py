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
student is worse than its teacher at the lower timesteps; the first k at which FID rises names the step.
If the teacher alone (k = 0) is also worse on this sampler than with DDIM, the re-noising sampler itself loses.

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
from pathlib import Path
from typing import Any

import pandas as pd

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


def run_rung(cfg: Any, student_folder: Path, steps: int, k: int, suite) -> dict[str, Any]:
    """Sample and score one rung on the cell's evaluation settings."""
    from add_bench.evaluate import generate, load_denoiser
    from add_bench.metrics import score

    student, _ = load_denoiser(student_folder)
    teacher, _ = load_denoiser(cfg.teacher.network)
    if k < steps and teacher.schedule.cfg != student.schedule.cfg:
        # the chain re-noises on the next model's schedule; below the top timestep the two must agree
        for tau in add_timesteps(student.schedule, steps, student.student_timesteps)[1:]:
            if not all(
                abs(float(a) - float(b)) < 1e-6
                for a, b in zip(student.schedule.alpha_sigma(tau), teacher.schedule.alpha_sigma(tau))
            ):
                raise ConfigError(
                    f"{student_folder}: its schedule differs from its teacher's ({cfg.teacher.network}) at t = {tau}; "
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
    return {"nfe": rung_nfe(steps, k, float(cfg.teacher.cfg_scale)), **score(suite, g.samples)}


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


def ladder(
    ablation: str, overrides: list[str], names: list[str], root: Path, out: Path, steps_list: list[int]
) -> pd.DataFrame:
    """Run every missing rung of the named rows' cells; return one row per (cell, steps, k)."""
    from add_bench.metrics import build_suite

    cells = cells_of(ablation, overrides, names, root)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    records, suite = [], None
    for cell, folder, trained in cells:
        for steps in steps_list:
            student = Path(trained["checkpoints"].get(str(steps), next(iter(trained["checkpoints"].values()))))
            for k in range(steps + 1):
                spec = rung_spec(cell.config, student, steps, k)
                path = out / "rows" / f"{rung_key(spec)}.json"
                if path.is_file():
                    row = json.loads(path.read_text())
                else:
                    print(f"handoff: {cell.name} seed {cell.seed} ({cell.id}), {steps} steps, k = {k}", file=sys.stderr)
                    suite = suite or build_suite(cell.config.eval)
                    start = time.time()
                    scores = run_rung(cell.config, student, steps, k, suite)
                    row = {
                        "spec": spec,
                        **scores,
                        "provenance": provenance(
                            cell.config.eval,
                            cell.config.eval.seed,
                            time.time() - start,
                            command=" ".join(["python -m add_bench.handoff", *sys.argv[1:]]),
                        ),
                    }
                    atomic_write_json(path, row)
                    print(f"wrote {path}: FID {row['fid']:.3f}", file=sys.stderr)
                records.append(
                    {
                        "row": cell.label,
                        "seed": cell.seed,
                        "cell": cell.id,
                        "steps": steps,
                        "k": k,
                        "nfe": row["nfe"],
                        "cell_fid": cell_fid(folder, steps) if k == steps else None,
                        **{m: row.get(m) for m in METRICS},
                    }
                )
    return pd.DataFrame(records)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± 95% CI over seeds per (row, steps, k)."""
    from add_bench.tables import ci95

    out = []
    for (row, steps, k), g in df.groupby(["row", "steps", "k"], sort=False):
        entry = {"setting": row, "steps": steps, "student steps k": k, "NFE": int(g["nfe"].iloc[0])}
        for m in ("fid", "recall", "coverage"):
            entry[m] = (
                f"{g[m].mean():.2f} ± {ci95(g[m]):.2f}" if m == "fid" else f"{g[m].mean():.3f} ± {ci95(g[m]):.3f}"
            )
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
    a = p.parse_intermixed_args(argv)
    for s in a.steps:
        check_positive(s, "--steps")
    from add_bench.loop import set_threads

    set_threads(a.threads)
    df = ladder(a.ablation, a.overrides, a.cells.split(","), Path(a.root), Path(a.out), a.steps)
    print(f"wrote {write_table(df, Path(a.out))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

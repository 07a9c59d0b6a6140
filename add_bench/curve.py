"""Quality against training length: one run per seed, evaluated at several lengths on the way.

    python -m add_bench.curve [key=value ...] --at 300 600 900 1200 1800 2400 --seeds 0 1 2 \
        [--out results/length_curve] [--workdir runs/curve]

Each seed trains one ADD cell (the training config with the given overrides) and stops at every length of
``--at`` in turn: the cell is exported and evaluated there (FID, alignment, recall, coverage, intra-FID
at ``eval_steps``), then resumed exactly to the next length. With the default constant learning rate
after warm-up a cell of length n is the first n steps of a longer one, so the curve is what a sweep of
separate cells of those lengths would give (a cosine schedule is refused: its steps depend on the total).

Writes ``rows/seed<s>_<n>steps.json`` (one evaluation, with provenance; a re-run skips the finished ones),
``table.md`` / ``table.csv`` (mean ± 95% CI over seeds), ``curve.png`` and ``curve.json`` with the
*knee*: the shortest length whose mean 1-step FID lies within the 95% CI of the best length's mean
and whose mean recall lies within the CI of the best recall.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from add_bench.config import TrainConfig, add_cfg_option, load, print_job, to_dict
from add_bench.errors import AddBenchError, ConfigError, command_line
from add_bench.provenance import REPO_ROOT, atomic_write_json, atomic_write_text, provenance

CURVE_METRICS = ("fid", "align_prob", "recall", "coverage", "intra_fid")


def evaluate_at(cfg: TrainConfig, workdir: Path, length: int) -> dict[str, Any]:
    """Train (or resume) the cell in ``workdir`` to ``length`` steps, then evaluate its EMA student."""
    from add_bench.evaluate import evaluate
    from add_bench.train import train

    cfg.steps = length
    start = time.time()
    student = train(cfg, workdir)
    if student is None:
        raise AddBenchError(f"{workdir}: training stopped before step {length}")
    result = evaluate(student, list(cfg.eval_steps), cfg.eval, device=cfg.device)
    return {"length": length, "seed": cfg.seed, **result, "provenance": provenance(cfg, cfg.seed, time.time() - start)}


def curve_config(cfg: TrainConfig) -> dict[str, Any]:
    """What makes one curve: the training config without its length, seed and how it is run (threads,
    device, checkpoint and log intervals), so seeds may run in parallel processes with other thread counts."""
    from add_bench.sweep import EXECUTION_KEYS

    values = to_dict(cfg)
    return {k: v for k, v in values.items() if k not in ("steps", "seed", *EXECUTION_KEYS)}


def check_same_curve(cfg: TrainConfig, out: Path) -> str:
    """``out/config.json`` holds the curve's config; another config there is refused (one curve per folder).
    Returns a short hash of the config, which names the training work folder."""
    import hashlib

    from add_bench.config import added_fields, without

    added = added_fields(TrainConfig)  # fields newer than a stored curve compare at the value it was made with
    values = curve_config(cfg)
    current = json.loads(json.dumps(without(values, added), default=str))  # as stored (JSON types)
    path = out / "config.json"
    if path.is_file():
        stored = without(json.loads(path.read_text()), added)
        if stored != current:
            keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise ConfigError(
                f"{path}: this folder holds a curve of another config (differs in {', '.join(keys)}); use another --out"
            )
    else:
        atomic_write_json(path, values)
    return hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]


def run_curve(cfg: TrainConfig, lengths: list[int], seeds: list[int], out: Path, workdir: Path) -> pd.DataFrame:
    if cfg.optim.lr_schedule != "constant":
        raise ConfigError(
            f"optim.lr_schedule={cfg.optim.lr_schedule!r}: a curve needs a schedule that does not depend on "
            "the total length; accepted: constant"
        )
    if sorted(set(lengths)) != list(lengths) or not lengths or lengths[0] <= 0:
        raise ConfigError(f"--at {lengths}: expected increasing positive step counts")
    workdir = workdir / check_same_curve(cfg, out)
    for seed in seeds:
        for length in lengths:
            path = out / "rows" / f"seed{seed}_{length}steps.json"
            if path.is_file():
                continue
            cfg.seed = seed
            print(f"curve: seed {seed}, {length} steps → {path}", file=sys.stderr)
            atomic_write_json(path, evaluate_at(cfg, workdir / f"seed{seed}", length))
    return curve_frame(out)


def curve_frame(out: Path) -> pd.DataFrame:
    """One row per seed × length × sampling step count."""
    records = []
    for path in sorted((out / "rows").glob("*.json")):
        r = json.loads(path.read_text())
        for row in r["rows"]:
            records.append(
                {
                    "length": r["length"],
                    "seed": r["seed"],
                    "steps": row["steps"],
                    **{m: row.get(m) for m in CURVE_METRICS},
                }
            )
    return pd.DataFrame.from_records(records, columns=["length", "seed", "steps", *CURVE_METRICS])


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    from add_bench.tables import ci95

    agg = {f"{m}_{stat}": (m, fn) for m in CURVE_METRICS for stat, fn in (("mean", "mean"), ("ci95", ci95))}
    return df.groupby(["steps", "length"]).agg(n=("seed", "nunique"), **agg).reset_index()


def knee(summary: pd.DataFrame, steps: int = 1) -> int | None:
    """The shortest length whose mean FID is within the best length's CI and whose mean recall is within
    the best recall's CI, at ``steps`` sampling steps (None without rows, or with fewer than 2 seeds at some
    length: one seed has no interval to be within)."""
    s = summary[summary["steps"] == steps].sort_values("length")
    if s.empty or (s["n"] < 2).any():
        return None
    best_fid = s.loc[s["fid_mean"].idxmin()]
    ok = s["fid_mean"] <= best_fid["fid_mean"] + float(best_fid["fid_ci95"])
    if s["recall_mean"].notna().any():
        best_recall = s.loc[s["recall_mean"].idxmax()]
        ok = ok & (s["recall_mean"] >= best_recall["recall_mean"] - float(best_recall["recall_ci95"]))
    hits = s[ok.fillna(False)]
    return int(hits["length"].iloc[0]) if not hits.empty else None


def write_outputs(df: pd.DataFrame, out: Path, cfg: TrainConfig, seeds: list[int], wall: float) -> None:
    from add_bench.tables import fmt, new_figure, save_figure, to_markdown

    summary = summarise(df)
    rows = []
    for r in summary.itertuples():
        rows.append(
            {
                "sampling steps": r.steps,
                "training steps": r.length,
                "seeds": r.n,
                **{
                    m: fmt(getattr(r, f"{m}_mean"), getattr(r, f"{m}_ci95"), r.n, 2 if "fid" in m else 3) or "—"
                    for m in CURVE_METRICS
                },
            }
        )
    k = knee(summary)
    text = (
        "# Quality against training length\n\n"
        f"One ADD cell per seed (`python -m add_bench.curve`), evaluated at each length on the way; mean ± 95% CI "
        f"over seeds. Knee (the shortest length whose 1-step FID and recall are within the best length's "
        f"95% CI): **{k if k is not None else 'n/a (needs 2 or more seeds at every length)'}** training steps.\n\n"
        + to_markdown(pd.DataFrame(rows))
        + "\n"
    )
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "table.csv", summary.to_csv(index=False))
    fig = new_figure((9, 3.4))
    axes = fig.subplots(1, 2)
    for steps, g in summary.groupby("steps"):
        for ax, m in zip(axes, ("fid", "recall")):
            ax.errorbar(
                g["length"],
                g[f"{m}_mean"],
                yerr=g[f"{m}_ci95"].fillna(0),
                marker="o",
                capsize=3,
                label=f"{steps} sampling step{'s' if steps > 1 else ''}",
            )
    for ax, m in zip(axes, ("FID ↓", "recall ↑")):
        ax.set_xlabel("ADD training steps")
        ax.set_ylabel(m)
        if k is not None:
            ax.axvline(k, color="gray", linestyle=":", label="knee")
    axes[0].legend(fontsize=7)
    save_figure(fig, out / "curve.png")
    atomic_write_json(
        out / "curve.json",
        {
            "knee": k,
            "summary": json.loads(summary.to_json(orient="records")),
            "provenance": provenance(cfg, seeds, wall),
        },
    )


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.curve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="training config key=value")
    p.add_argument("--at", nargs="+", type=int, default=[300, 600, 900, 1200, 1800, 2400])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "length_curve")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "curve")
    add_cfg_option(p)
    a = p.parse_args(argv)
    start = time.time()
    cfg = load(TrainConfig, overrides=a.overrides)
    if a.cfg:
        print_job(cfg)
        return 0
    df = run_curve(cfg, a.at, a.seeds, a.out, a.workdir)
    write_outputs(df, a.out, cfg, a.seeds, time.time() - start)
    print(f"wrote {a.out}/table.md, curve.png, curve.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

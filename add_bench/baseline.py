"""The teacher baseline: shipped teachers at 1–50 DDIM steps, with and without CFG, plus a real-data floor.

    python -m add_bench.baseline [--teachers teacher_small_sl27k teacher_large_sl] [--out results/teacher]

Writes ``<out>/rows/*.json`` (one per setting, atomically; a re-run skips finished rows),
``table.md``, ``table.csv``, ``fid_vs_steps.png`` and ``provenance.json``. The CFG scale of the
"best CFG" rows is chosen per teacher by FID against the *validation* split (never the test split)
at 50 steps on ``--cfg-search-samples`` samples, over 1.5, 2, 3 and beyond the edge while the best
lies on it; the search is stored in ``rows/`` too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from add_bench.config import EvalConfig, add_cfg_option, load, print_job
from add_bench.data import NUM_CLASSES, balanced_indices, load_split
from add_bench.errors import DataError, command_line
from add_bench.evaluate import generate, load_denoiser
from add_bench.metrics import FID, EvalNetScorer, SampleSet, build_suite, score
from add_bench.provenance import REPO_ROOT, atomic_write_json, atomic_write_text, provenance, resolve_weights

STEPS = (1, 2, 4, 8, 25, 50)
CFG_GRID = (1.5, 2.0, 3.0)


def cached_row(path: Path, compute) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return computed_row(path, compute)


def computed_row(path: Path, compute, earlier_wall_s: float = 0.0, **extra) -> dict[str, Any]:
    """``compute()`` with its provenance (wall time plus ``earlier_wall_s``, ``extra``), written atomically."""
    start = time.time()
    row = compute()
    row["provenance"] = provenance(
        seed=row.get("seed"),
        wall_time_s=time.time() - start + earlier_wall_s,
        command="python -m add_bench.baseline",
        **extra,
    )
    atomic_write_json(path, row)
    return row


def floor_row(cfg: EvalConfig, suite) -> dict[str, Any]:
    """The real-data floor: 5k random training images, balanced over the classes as samples are, scored like samples."""
    train = load_split("train", cfg.data.root, cfg.data.val_size, cfg.data.split_seed, cfg.data.download)
    idx = balanced_indices(train.labels, cfg.num_samples // NUM_CLASSES, np.random.default_rng(cfg.seed))
    real = SampleSet(train.images[idx], train.labels[idx])
    return {
        "model": "real data (train split)",
        "steps": 0,
        "cfg_scale": None,
        "nfe": 0,
        "seed": cfg.seed,
        **score(suite, real),
    }


def next_scale(val_fid: dict[str, float]) -> float | None:
    """The scale to try next when the best one lies on the searched grid's edge: halfway to 1 below the
    smallest (down to 1.125), 1 above the largest (up to 6); None once the best is inside the grid."""
    scales = sorted(float(s) for s in val_fid)
    best = float(min(val_fid, key=val_fid.get))
    if best == scales[0] and best >= 1.25:
        return 1 + (best - 1) / 2
    if best == scales[-1] and best < 6:
        return best + 1
    return None


def cfg_search(
    teacher: str,
    cfg: EvalConfig,
    num_samples: int,
    done: dict[str, float] | None = None,
    partial: Path | None = None,
    earlier_wall_s: float = 0.0,
) -> dict[str, Any]:
    """FID against the validation split at 50 DDIM steps for each scale in CFG_GRID, then beyond the grid's
    edge while the best scale lies on it (:func:`next_scale`). ``done``: scales already measured. Each
    measured scale is written to ``partial`` (with the search's wall time so far, ``earlier_wall_s`` included),
    from which an interrupted search goes on (:func:`stored_cfg_search`)."""
    start = time.time()
    denoiser, _ = load_denoiser(teacher)
    scorer = EvalNetScorer(cfg.evalnet)
    data = cfg.data
    val = lambda: load_split("val", data.root, data.val_size, data.split_seed, data.download).images  # noqa: E731
    fid_val = FID(scorer.features, val, f"{scorer.id}_fashion-mnist-val{data.val_size}-{data.split_seed}")
    fids = dict(done or {})
    todo = [s for s in CFG_GRID if str(s) not in fids]
    while todo or next_scale(fids) is not None:
        s = todo.pop(0) if todo else next_scale(fids)
        g = generate(denoiser, "ddim", 50, num_samples, cfg.seed + 1, cfg.batch_size, s)
        fids[str(s)] = fid_val.distance(g.samples.images)
        print(f"{teacher} cfg {s}: val FID-{num_samples} {fids[str(s)]:.3f}", file=sys.stderr)
        if partial is not None:
            wall = earlier_wall_s + time.time() - start
            atomic_write_json(partial, search_record(teacher, cfg, num_samples, fids) | {"wall_time_s": wall})
    return search_record(teacher, cfg, num_samples, fids)


def search_record(teacher: str, cfg: EvalConfig, num_samples: int, fids: dict[str, float]) -> dict[str, Any]:
    return {
        "teacher": teacher,
        "steps": 50,
        "num_samples": num_samples,
        "seed": cfg.seed + 1,
        "val_fid": dict(fids),
        "best_cfg_scale": float(min(fids, key=fids.get)),
    }


def stored_cfg_search(path: Path, teacher: str, cfg: EvalConfig, num_samples: int) -> dict[str, Any]:
    """The stored CFG search, extended where its best scale lies on the grid's edge (a search stored before
    the edge rule keeps its measured scales); computed whole when none is stored for these samples, going on
    from the scales an interrupted search wrote to ``<path>.partial``."""
    stored = json.loads(path.read_text()) if path.is_file() else None
    partial = path.with_name(path.name + ".partial")  # not *.json: never read as a row
    if stored and stored["num_samples"] == num_samples and stored["seed"] == cfg.seed + 1:
        if next_scale(stored["val_fid"]) is None:
            return stored
        done, earlier, extra = stored["val_fid"], stored["provenance"]["wall_time_s"], {"extends": stored["provenance"]}
    else:
        done, earlier, extra = {}, 0.0, {}
    interrupted = json.loads(partial.read_text()) if partial.is_file() else None
    if interrupted and (interrupted["num_samples"], interrupted["seed"]) == (num_samples, cfg.seed + 1):
        done, earlier = interrupted["val_fid"] | done, interrupted["wall_time_s"]
        print(f"{teacher}: the CFG search goes on from {partial} (scales {', '.join(done)})", file=sys.stderr)
    search = computed_row(path, lambda: cfg_search(teacher, cfg, num_samples, done, partial, earlier), earlier, **extra)
    partial.unlink(missing_ok=True)
    return search


def teacher_row(teacher: str, steps: int, cfg_scale: float, cfg: EvalConfig, suite) -> dict[str, Any]:
    denoiser, card = load_denoiser(teacher)
    g = generate(denoiser, "ddim", steps, cfg.num_samples, cfg.seed, cfg.batch_size, cfg_scale)
    return {
        "model": teacher,
        "params": card.get("params"),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "nfe": g.nfe,
        "seed": cfg.seed,
        "sec_per_1000": round(1000 * g.seconds / cfg.num_samples, 3),
        **score(suite, g.samples),
    }


def row_key(teacher: str) -> str:
    """File-name stem of a teacher's rows: the shipped name, or for a folder its name plus a hash of its path."""
    if "/" not in teacher:
        return teacher
    import hashlib

    path = str(Path(teacher).resolve())
    return f"{Path(path).name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def run(teachers: list[str], out: Path, cfg: EvalConfig, steps=STEPS, cfg_search_samples: int = 1000) -> list[dict]:
    start = time.time()
    suite = build_suite(cfg)
    rows_dir = out / "rows"
    print(f"teacher baseline → {out}", file=sys.stderr)
    rows = [cached_row(rows_dir / "floor.json", lambda: floor_row(cfg, suite))]
    for teacher in teachers:
        if not resolve_weights(teacher).is_dir():
            print(f"skipping {teacher}: no weights at {resolve_weights(teacher)}", file=sys.stderr)
            continue
        key = row_key(teacher)
        search = stored_cfg_search(rows_dir / f"{key}_cfg_search.json", teacher, cfg, cfg_search_samples)
        for scale in (1.0, search["best_cfg_scale"]):
            for s in steps:
                rows.append(
                    cached_row(
                        rows_dir / f"{key}_{s}steps_cfg{scale:g}.json",
                        lambda teacher=teacher, s=s, scale=scale: teacher_row(teacher, s, scale, cfg, suite),
                    )
                )
                print(
                    f"{teacher} {s} steps cfg {scale:g}: FID {rows[-1]['fid']:.3f} acc {rows[-1]['align_acc']:.3f}",
                    file=sys.stderr,
                )
    stored = stored_rows(rows_dir)
    write_baseline_tables(stored, out)  # every teacher measured so far, not only this run's
    # wall_time_s: this run (finished rows are skipped); rows_wall_time_s: every stored row's own time
    atomic_write_json(
        out / "provenance.json",
        provenance(
            cfg,
            cfg.seed,
            time.time() - start,
            command="python -m add_bench.baseline",
            teachers=teachers,
            rows=sorted(p.name for p in rows_dir.glob("*.json")),
            rows_wall_time_s=round(sum(r.get("provenance", {}).get("wall_time_s") or 0.0 for r in stored), 1),
        ),
    )
    return rows


def stored_rows(rows_dir: Path) -> list[dict[str, Any]]:
    """All table rows in ``rows_dir`` (the floor first, then by model, CFG scale, steps); the CFG
    searches are not rows."""
    rows = [json.loads(p.read_text()) for p in rows_dir.glob("*.json") if not p.name.endswith("_cfg_search.json")]
    return sorted(rows, key=lambda r: (r["steps"] > 0, r["model"], r.get("cfg_scale") or 0.0, r["steps"]))


def write_baseline_tables(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    # the torch threads a row was sampled on (from its provenance): sec_per_1000 compares only at equal threads
    df = pd.DataFrame(
        [
            {
                **{k: v for k, v in r.items() if k != "provenance"},
                "threads": r.get("provenance", {}).get("machine", {}).get("torch_threads"),
            }
            for r in rows
        ]
    )
    floor = float(df.loc[df["steps"] == 0, "fid"].iloc[0])
    df["fid_over_floor"] = df["fid"] / floor
    cols = [
        "model",
        "params",
        "steps",
        "cfg_scale",
        "nfe",
        "fid",
        "fid_over_floor",
        "align_prob",
        "align_acc",
        "recall",
        "coverage",
        "intra_fid",
        "sec_per_1000",
        "threads",
    ]
    df = df.reindex(columns=cols)  # rows scored before recall, coverage and intra-FID existed: empty there
    with_cfg = df["cfg_scale"].fillna(1.0)
    df["cfg_scale"] = df["cfg_scale"].map(lambda v: "—" if v is None or v != v else f"{v:g}")
    atomic_write_text(out / "table.csv", df.to_csv(index=False, float_format="%.4g"))
    header = (
        "# Teacher baseline (DDIM, Fashion-MNIST)\n\nFID of 5k balanced samples against the "
        "10k test split in the evaluation network's feature space; alignment = evaluation-network probability "
        "of the conditioning class / accuracy. Floor: 5k real training images. Produced by "
        "`python -m add_bench.baseline`; provenance in rows/*.json.\n\n"
    )
    shown = df.astype(object).where(df.notna(), None)
    for col in ("recall", "coverage", "intra_fid"):
        shown[col] = shown[col].map(lambda v: "n/m" if v is None else f"{v:.4g}")
    header += (
        "Recall, coverage (class-conditional, k = 5) and intra-FID (per-class FID) in the self-supervised "
        "embedding `evalnet_ssl`; `n/m` = not measured (a row scored before these metrics existed).\n\n"
    )
    atomic_write_text(out / "table.md", header + shown.to_markdown(index=False, floatfmt=".4g") + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    gen = df[df["steps"] > 0]
    for (model, scale), g in gen.groupby([gen["model"], with_cfg[gen.index]]):
        ax.plot(g["steps"], g["fid"], marker="o", label=f"{model}, CFG {scale:g}" if scale != 1 else f"{model}, no CFG")
    ax.axhline(floor, color="k", ls="--", lw=1, label="real data floor")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="DDIM steps",
        ylabel="FID-5k (evaluation-network features)",
        title="Teacher FID vs sampling steps",
    )
    ax.set_xticks(sorted(gen["steps"].unique()), [str(s) for s in sorted(gen["steps"].unique())])
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / ".fid_vs_steps.tmp.png"
    fig.savefig(tmp, dpi=120)
    tmp.replace(out / "fid_vs_steps.png")
    plt.close(fig)


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.baseline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="EvalConfig overrides key=value")
    p.add_argument("--teachers", nargs="+", default=["teacher_small_sl27k", "teacher_large_sl"])
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--cfg-search-samples", type=int, default=1000)
    p.add_argument("--out", default=str(REPO_ROOT / "results" / "teacher"))
    p.add_argument("--tables-only", action="store_true", help="rewrite the tables and plot from the stored rows only")
    add_cfg_option(p)
    a = p.parse_args(argv)
    if a.cfg:
        print_job(load(EvalConfig, overrides=a.overrides))
        return 0
    if a.tables_only:
        rows_dir = Path(a.out) / "rows"
        if not rows_dir.is_dir():
            raise DataError(f"{rows_dir}: no stored rows; run python -m add_bench.baseline --out {a.out} first")
        write_baseline_tables(stored_rows(rows_dir), Path(a.out))
        print(f"wrote {a.out}/table.md, table.csv, fid_vs_steps.png", file=sys.stderr)
        return 0
    cfg = load(EvalConfig, overrides=a.overrides)
    run(a.teachers, Path(a.out), cfg, a.steps, a.cfg_search_samples)
    print(f"wrote {a.out}/table.md, table.csv, fid_vs_steps.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

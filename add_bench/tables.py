"""Sweep results → paper-style tables and plots, with the paper's numbers beside ours.

    python -m add_bench.tables <root>/<ablation> [<root>/<ablation> ...]
    python -m add_bench.tables --report      (docs/findings.md from results/: add_bench.findings)

Reads the sweep's manifest ``<root>/<ablation>/cells.json`` and each cell's ``<root>/cells/<id>/metrics.json``
(or ``error.json``) and writes into the ablation folder:

* ``table.md`` / ``table.tex`` / ``table.csv``: one row per cell at the headline step count (1, as in the
  paper's Table 1): ours (mean ± 95% CI over seeds) beside the paper's FID / CLIP score; default row ``*``.
  The CSV holds the numbers (mean, ci95, n, status); the Markdown and LaTeX hold the formatted text.
* ``table_steps.md`` / ``table_steps.csv``: FID, alignment, recall, coverage and per-class FID at every
  evaluated step count.
* ``samples.png``: each row's committed samples (10 per class) at the row's step count.
* ``fid_vs_alignment.png`` (ours | paper, side by side) and ``fid_vs_steps.png``.
* ``summary.json``: the aggregated numbers, the ranking agreement with the paper and the provenance.

Diversity-aware columns (class-conditional recall and coverage, per-class FID; ``add_bench.metrics``)
show ``n/m`` (not measured) for cells evaluated before the suite computed them. A row whose class-conditional
recall is below ``COLLAPSE_RECALL`` is flagged ``collapsed``.

Partial sweeps are expected: a cell without results shows ``pending``, one with ``error.json`` shows
``failed: <error>``, one whose teacher, feature or evaluation network weights changed after it ran shows
``stale`` (its numbers are left out until the sweep re-runs it). Confidence intervals are t-distribution half-widths (0 with a single seed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from add_bench.errors import DataError, command_line
from add_bench.provenance import REPO_ROOT, atomic_path, atomic_write_json, atomic_write_text

ALIGNMENT_KEYS = ("clip_score", "align_prob")  # the first one present in a metrics row is "align"
ALIGNMENT_NAMES = {"clip_score": "CLIP score", "align_prob": "align. prob"}
HEADLINE_STEPS = 1
# A row is flagged collapsed below this class-conditional recall (k = 5, evalnet_ssl embedding). On the
# metric sanity ladder (python -m add_bench.metric_sanity) it lies between the rung of 100 distinct real
# images per class, each repeated to 500 samples, and the rung of 20, which scores 0: below it a generator
# recalls less of each class than a hundred fixed images would.
COLLAPSE_RECALL = 0.2
DIVERSITY_METRICS = (("recall", "recall", 3), ("coverage", "coverage", 3), ("intra_fid", "intra-FID", 2))
DEFAULT_EVAL_STEPS = (1, 2, 4)
CONVENTIONS = {
    "align_prob": "FID{n} on the evaluation network's 128-d features against the 10k test split; alignment = mean "
    "evaluation-network probability of the conditioning class (the embedded stand-in for CLIP score); "
    "diversity = within-class pixel standard deviation of the cell's 100-sample grid (10 per class, "
    "`metrics.Diversity`; real training images ≈ 0.17), near 0 when every noise gives the class's one image; "
    "recall, coverage = class-conditional k-NN recall (Kynkäänniemi et al. 2019) and coverage (Naeem et al. "
    "2020), k = 5, and intra-FID = per-class FID averaged over classes, all on the same samples in the "
    "self-supervised embedding `evalnet_ssl` against each class's test images (what real "
    "images and collapsed generators score: results/metric_sanity); `n/m` = not measured (evaluated before these metrics existed); "
    "`collapsed` = recall < {collapse}.",
    "clip_score": 'FID{n}: clean-fid Inception FID ("clean" mode); CLIP score: open_clip mean of max(cos, 0) '
    "between image and prompt, on the paper's 0–1 scale.",
}
PAPER_NOTE = (
    "The paper's numbers are COCO FID-5k / CLIP score of ADD-M on SD2.1 (Sauer et al. 2023, Table {table}); "
    "the setting differs, so compare directions (which row is better), not values."
)
LATEX_UNICODE = {
    "±": r"\ensuremath{\pm}",
    "λ": r"\ensuremath{\lambda}",
    "·": r"\ensuremath{\cdot}",
    "—": "---",
    "–": "--",
    "↑": r"\ensuremath{\uparrow}",
    "↓": r"\ensuremath{\downarrow}",
    "τ": r"\ensuremath{\tau}",
}


# ------------------------------------------------------------------------------ reading
def read_manifest(ablation_dir: str | Path) -> dict[str, Any]:
    """The sweep's ``cells.json``; a DataError naming the path if it is missing or malformed."""
    path = Path(ablation_dir) / "cells.json"
    if not path.is_file():
        raise DataError(
            f"{path}: not found; expected an ablation folder written by `python -m add_bench.sweep` "
            "(<root>/<ablation>/cells.json)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cells"), list):
        raise DataError(f"{path}: expected a JSON object with a 'cells' list")
    for i, c in enumerate(manifest["cells"]):
        if not isinstance(c, dict) or not {"name", "id"} <= c.keys():
            raise DataError(f"{path}: cells[{i}] needs the keys 'name' and 'id'")
    return manifest


def read_cell(folder: Path) -> tuple[str, dict | None, str | None]:
    """(status, metrics, error) of one cell folder: done (metrics.json), stale (metrics.json, but a weights
    folder the cell read has changed since: its numbers are left out), failed (error.json) or pending."""
    from add_bench.methods import changed_inputs

    try:
        if (folder / "metrics.json").is_file():
            metrics = json.loads((folder / "metrics.json").read_text())
            if not isinstance(metrics, dict) or not isinstance(metrics.get("rows"), list):
                return "failed", None, "metrics.json has no 'rows' list"
            if changed := changed_inputs(folder):
                return "stale", None, "computed with other weights of: " + "; ".join(changed)
            return "done", metrics, None
        if (folder / "error.json").is_file():
            err = json.loads((folder / "error.json").read_text())
            return "failed", None, str(err.get("error", "unknown error") if isinstance(err, dict) else err)
    except (OSError, ValueError) as e:
        return "failed", None, f"unreadable result file ({type(e).__name__})"
    return "pending", None, None


def training_teacher_evaluations(folder: Path) -> int | None:
    """Teacher network evaluations of a cell's training (``methods.teacher_evaluations`` of its stored
    config.yaml): the compute a method comparison is read at; None without a readable config."""
    from add_bench.config import TrainConfig, load
    from add_bench.errors import AddBenchError
    from add_bench.methods import teacher_evaluations

    try:
        return teacher_evaluations(load(TrainConfig, folder / "config.yaml"))
    except AddBenchError:
        return None


def grid_diversity(folder: Path) -> dict[int, float]:
    """Within-class diversity (``metrics.Diversity``) of a cell's committed sample grids (``samples.npz``:
    100 samples, 10 per class, per step count): {steps: diversity}; {} without grids."""
    path = folder / "samples.npz"
    if not path.is_file():
        return {}
    from add_bench.metrics import Diversity, SampleSet

    try:
        with np.load(path) as z:
            labels = z["labels"]
            prompts = [""] * len(labels)  # labels may be COCO image ids (cluster scale): no class prompts
            return {
                int(k.split("_", 1)[1]): Diversity()(SampleSet(z[k], labels, prompts))["diversity"]
                for k in z.files
                if k.startswith("steps_")
            }
    except (OSError, ValueError, KeyError):
        return {}


def alignment_key(row: dict) -> str | None:
    """Which alignment metric a metrics row carries (``clip_score`` on the cluster scale, else ``align_prob``)."""
    return next((k for k in ALIGNMENT_KEYS if row.get(k) is not None), None)


def machine_text(machine: dict | None) -> str | None:
    if not machine:
        return None
    return f"{machine.get('hostname', '?')} ({machine.get('device', '?')}, {machine.get('cpu_count', '?')} CPUs)"


def load_results(ablation_dir: str | Path) -> pd.DataFrame:
    """One row per cell × seed × step count, in manifest order, with ``status`` done / pending / failed / stale.

    Unfinished cells get one row per manifest step count with empty metrics, so they stay visible."""
    ablation_dir = Path(ablation_dir)
    manifest = read_manifest(ablation_dir)
    order = {name: i for i, name in enumerate(dict.fromkeys(c["name"] for c in manifest["cells"]))}
    planned = manifest.get("eval_steps") or list(DEFAULT_EVAL_STEPS)
    records = []
    for c in manifest["cells"]:
        status, metrics, error = read_cell(ablation_dir.parent / "cells" / str(c["id"]))
        paper = c.get("paper") or {}
        base = {
            "order": order[c["name"]],
            "name": c["name"],
            "label": c.get("label", c["name"]),
            "default": bool(c.get("default", False)),
            "seed": c.get("seed"),
            "id": str(c["id"]),
            "status": status,
            "error": error,
            "paper_fid": paper.get("fid"),
            "paper_cs": paper.get("cs"),
            "paper_time": paper.get("time"),
            "row_steps": c.get("steps"),
        }
        if metrics is None:
            records += [{**base, "steps": s} for s in ([c["steps"]] if c.get("steps") else planned)]
            continue
        prov = metrics.get("provenance") or {}
        grids = grid_diversity(ablation_dir.parent / "cells" / str(c["id"]))
        teacher_evals = training_teacher_evaluations(ablation_dir.parent / "cells" / str(c["id"]))
        for row in metrics["rows"]:
            key = alignment_key(row)
            records.append(
                {
                    **base,
                    "steps": row.get("steps"),
                    "nfe": row.get("nfe"),
                    "fid": row.get("fid"),
                    "align": row.get(key) if key else None,
                    "align_key": key,
                    **{m: row.get(m) for m, _, _ in DIVERSITY_METRICS},
                    "diversity": grids.get(row.get("steps")),
                    "sec_per_1000": row.get("sec_per_1000"),
                    "teacher_evals": teacher_evals,
                    "num_samples": metrics.get("num_samples"),
                    "git_commit": prov.get("git_commit"),
                    "machine": machine_text(prov.get("machine")),
                }
            )
    columns = [
        "order",
        "name",
        "label",
        "default",
        "seed",
        "id",
        "status",
        "error",
        "steps",
        "nfe",
        "fid",
        "align",
        "align_key",
        "diversity",
        *(m for m, _, _ in DIVERSITY_METRICS),
        "sec_per_1000",
        "teacher_evals",
        "num_samples",
        "paper_fid",
        "paper_cs",
        "paper_time",
        "row_steps",
        "git_commit",
        "machine",
    ]
    df = pd.DataFrame.from_records(records, columns=columns)
    for col in (
        "steps",
        "nfe",
        "fid",
        "align",
        "diversity",
        *(m for m, _, _ in DIVERSITY_METRICS),
        "sec_per_1000",
        "teacher_evals",
        "num_samples",
        "paper_fid",
        "paper_cs",
        "paper_time",
        "row_steps",
    ):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


# ------------------------------------------------------------------------------ aggregating
def ci95(values) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t); 0 for one value, NaN for none."""
    from scipy.stats import t

    v = np.asarray(pd.Series(values, dtype=float).dropna())
    if len(v) == 0:
        return math.nan
    if len(v) == 1:
        return 0.0
    return float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def cell_status(statuses: pd.Series) -> str:
    """done (every seed), partial (some), failed (none done, one failed), stale (none done, one stale) or pending."""
    s = set(statuses)
    if s == {"done"}:
        return "done"
    if "done" in s:
        return "partial"
    return next((k for k in ("failed", "stale") if k in s), "pending")


def first_error(errors: pd.Series) -> str | None:
    errors = errors.dropna()
    return str(errors.iloc[0]) if len(errors) else None


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, ci95 and n over seeds for FID and alignment, one row per cell × step count (manifest order). Seeds
    of a row that share one cell (a method that reads no seed: the teacher) are one measurement, n = 1."""
    df = df.dropna(subset=["steps"])
    keys = ["order", "name", "steps"]
    seeds = df.groupby(keys, sort=True).agg(status=("status", cell_status), n_seeds=("seed", "nunique"))
    grouped = df.drop_duplicates([*keys, "id"]).groupby(keys, sort=True)
    agg = grouped.agg(
        label=("label", "first"),
        default=("default", "first"),
        error=("error", first_error),
        fid_mean=("fid", "mean"),
        fid_ci95=("fid", ci95),
        fid_n=("fid", "count"),
        align_mean=("align", "mean"),
        align_ci95=("align", ci95),
        align_n=("align", "count"),
        div_mean=("diversity", "mean"),
        div_ci95=("diversity", ci95),
        div_n=("diversity", "count"),
        **{
            f"{m}_{stat}": (m, fn)
            for m, _, _ in DIVERSITY_METRICS
            for stat, fn in (("mean", "mean"), ("ci95", ci95), ("n", "count"))
        },
        nfe=("nfe", "mean"),
        sec_per_1000=("sec_per_1000", "mean"),
        teacher_evals=("teacher_evals", "first"),
        paper_fid=("paper_fid", "first"),
        paper_cs=("paper_cs", "first"),
        paper_time=("paper_time", "first"),
        row_steps=("row_steps", "first"),
    )
    order = ["label", "default", "status", "error", "n_seeds"]
    agg = agg.join(seeds)[[*order, *(c for c in agg.columns if c not in order)]].reset_index()
    agg["steps"] = agg["steps"].astype(int)
    return agg


def one_row_per_cell(df: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """``agg`` with the rows that share their cells merged (a method table samples one training at several
    step counts: pd1, pd2, pd4 are one progressive run): the first row's name, every label joined with " / ",
    the default mark if any row has it. For the every-step table, its CSV and the FID-vs-steps plot."""
    cell_of = df.groupby("name")["id"].agg(lambda ids: tuple(sorted(set(ids))))
    names = list(dict.fromkeys(agg["name"]))  # manifest order
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(cell_of[name], []).append(name)
    firsts = {name: group[0] for group in groups.values() for name in group}
    labels = {
        group[0]: " / ".join(dict.fromkeys(agg.loc[agg["name"].isin(group), "label"])) for group in groups.values()
    }
    defaults = {group[0]: bool(agg.loc[agg["name"].isin(group), "default"].any()) for group in groups.values()}
    out = agg[agg["name"].map(lambda n: firsts[n] == n)].copy()
    out["label"] = out["name"].map(labels)
    out["default"] = out["name"].map(defaults)
    return out.reset_index(drop=True)


def per_row_steps(agg: pd.DataFrame) -> bool:
    """Do the rows name their own step counts (a method comparison, the paper's Table 2)?"""
    return bool(agg["row_steps"].notna().any())


def headline(agg: pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
    """The main table's rows: each cell at its own ``steps`` where the ablation file gives one, else at the
    headline step count; and that common step count (None when the rows differ)."""
    steps = headline_steps(agg)
    want = agg["row_steps"].fillna(steps)
    head = agg[agg["steps"] == want].reset_index(drop=True)
    return head, (None if per_row_steps(agg) else steps)


def headline_steps(agg: pd.DataFrame) -> int:
    """The step count of the main table: 1 (the paper's Table 1) if evaluated, else the smallest."""
    steps = sorted(agg["steps"].unique())
    return HEADLINE_STEPS if HEADLINE_STEPS in steps or not steps else int(steps[0])


def ranking_agreement(head: pd.DataFrame) -> dict[str, Any]:
    """Does our ranking of cells match the paper's? Kendall τ (FID; alignment vs CS) and pairwise directions.

    ``head`` is the aggregate at one step count; only cells with both our number and the paper's count."""
    from scipy.stats import kendalltau

    out: dict[str, Any] = {"pairs": []}
    for metric, paper_col in (("fid", "paper_fid"), ("align", "paper_cs")):
        both = head.dropna(subset=[f"{metric}_mean", paper_col])
        tau = kendalltau(both[f"{metric}_mean"], both[paper_col])[0] if len(both) >= 2 else math.nan
        out[f"kendall_tau_{metric}"] = None if tau is None or np.isnan(tau) else float(tau)
        out[f"n_{metric}"] = len(both)
        rows = list(both.itertuples())
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                p = np.sign(getattr(a, paper_col) - getattr(b, paper_col))
                o = np.sign(getattr(a, f"{metric}_mean") - getattr(b, f"{metric}_mean"))
                out["pairs"].append(
                    {
                        "metric": metric,
                        "a": a.name,
                        "b": b.name,
                        "paper": f"{a.name} {relation(p)} {b.name}",
                        "ours": f"{a.name} {relation(o)} {b.name}",
                        "agree": None if p == 0 else bool(p == o),
                    }
                )
    return out


def relation(sign: float) -> str:
    return "<" if sign < 0 else ">" if sign > 0 else "="


# ------------------------------------------------------------------------------ formatting
def short_error(error: str | None, width: int = 48) -> str:
    lines = (error or "").strip().splitlines()
    line = lines[0].replace("|", "/") if lines else "unknown error"
    return line if len(line) <= width else line[: width - 1] + "…"


def fmt(mean: float, ci: float, n: int, digits: int) -> str | None:
    """``11.00 ± 1.27`` over seeds, ``12.30 (n=1)`` for one seed, None without a value."""
    if n == 0 or mean != mean:
        return None
    return f"{mean:.{digits}f} (n=1)" if n == 1 else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def metric_text(row, metric: str, digits: int) -> str:
    """A metric's ``mean ± ci`` over seeds; ``n/m`` for a finished cell evaluated before the metric existed."""
    text = fmt(getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_ci95"), getattr(row, f"{metric}_n"), digits)
    if text:
        return text
    return "n/m" if row.status in ("done", "partial") else missing_text(row)


def collapse_text(row) -> str:
    """``collapsed`` when the mean class-conditional recall is below COLLAPSE_RECALL, else ``no``."""
    if not row.recall_n:
        return "n/m" if row.status in ("done", "partial") else missing_text(row)
    return "collapsed" if row.recall_mean < COLLAPSE_RECALL else "no"


def missing_text(row, detail: bool = False) -> str:
    """``pending``, ``stale`` or ``failed`` (with the short error when ``detail``) for a cell without numbers."""
    if row.status == "stale":
        return "stale (weights changed since it ran)" if detail else "stale"
    if row.status != "failed":
        return "pending"
    return f"failed: {short_error(row.error)}" if detail else "failed"


def paper_number(value: float, digits: int) -> str:
    return "—" if value != value or value is None else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def alignment_of(df: pd.DataFrame) -> str:
    keys = df["align_key"].dropna().unique() if "align_key" in df else []
    return str(keys[0]) if len(keys) else "align_prob"


def headline_table(head: pd.DataFrame, align_name: str, paper_names: dict[str, str]) -> pd.DataFrame:
    """The displayed main table (strings): marker, setting, ours FID, ours alignment, paper FID / CS, n seeds.
    Rows at their own step counts (a method comparison) also show steps, NFE and sampling time."""
    per_row = per_row_steps(head)
    paper_time = per_row and head["paper_time"].notna().any()
    diversity = bool(head["div_n"].sum()) if "div_n" in head else False
    rows = []
    for r in head.itertuples():
        row = {"": "*" if r.default else "", "setting": r.label}
        if per_row:
            row |= {
                "steps": str(int(r.steps)),
                "NFE": "—" if r.nfe != r.nfe else str(int(r.nfe)),
                "s / 1000 samples (ours, CPU)": paper_number(r.sec_per_1000, 1),
                "teacher evals in training (M)": paper_number(getattr(r, "teacher_evals", float("nan")) / 1e6, 2),
            }
        row |= {
            "ours FID ↓": fmt(r.fid_mean, r.fid_ci95, r.fid_n, 2) or missing_text(r, detail=True),
            f"ours {align_name} ↑": fmt(r.align_mean, r.align_ci95, r.align_n, 3) or missing_text(r),
        }
        if diversity:
            row["ours diversity ↑"] = fmt(r.div_mean, r.div_ci95, r.div_n, 3) or missing_text(r)
        if shows_diversity_metrics(head, align_name):
            row |= {
                "ours recall ↑": metric_text(r, "recall", 3),
                "ours coverage ↑": metric_text(r, "coverage", 3),
                "mode collapse": collapse_text(r),
            }
        row |= {
            f"paper {paper_names.get('fid', 'FID')} ↓": paper_number(r.paper_fid, 2),
            f"paper {paper_names.get('cs', 'CLIP score')} ↑": paper_number(r.paper_cs, 3),
        }
        if paper_time:
            row["paper s / image (A100)"] = paper_number(r.paper_time, 2)
        rows.append(row | {"n seeds": f"{r.fid_n}/{r.n_seeds}"})
    return pd.DataFrame(rows)


def shows_diversity_metrics(agg: pd.DataFrame, align_name: str) -> bool:
    """Recall, coverage and intra-FID columns: on the embedded scale always (``n/m`` where not measured),
    on the cluster scale (CLIP score) only where some cell measured them."""
    if "recall_n" not in agg:
        return False
    return align_name != ALIGNMENT_NAMES["clip_score"] or bool(agg["recall_n"].sum())


def steps_table(agg: pd.DataFrame, align_name: str) -> pd.DataFrame:
    """The displayed per-step table (strings): one row per cell; FID, alignment, recall, coverage and
    intra-FID at each step count."""
    rows = []
    all_steps = sorted(int(s) for s in agg["steps"].unique())
    metrics = (("fid", "FID", 2), ("align", align_name, 3))
    metrics += DIVERSITY_METRICS if shows_diversity_metrics(agg, align_name) else ()
    for _, g in agg.groupby(["order", "name"], sort=True):
        first = g.iloc[0]
        row = {"": "*" if first.default else "", "setting": first.label}
        at = {int(r.steps): r for r in g.itertuples()}
        for metric, title, digits in metrics:
            for steps in all_steps:  # a step count this cell is not sampled at (a method table): —
                r = at.get(steps)
                row[f"{title} @{steps}"] = "—" if r is None else metric_text(r, metric, digits)
        rows.append(row)
    return pd.DataFrame(rows)


def provenance_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Cell counts by status, and the git commits, machines and sample counts of the finished cells."""
    cells = df.drop_duplicates("id")
    done = df[df["status"] == "done"].drop_duplicates("id")
    out: dict[str, Any] = {
        "cells": len(cells),
        **{s: int((cells["status"] == s).sum()) for s in ("done", "pending", "failed", "stale")},
    }
    for col, key in (("git_commit", "git_commits"), ("machine", "machines"), ("num_samples", "num_samples")):
        counts = done[col].dropna().value_counts()
        out[key] = {(f"{k:g}" if isinstance(k, float) else str(k)): int(v) for k, v in counts.items()}
    return out


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """Markdown bullets of ``provenance_summary``."""
    lines = [
        f"- cells finished: {prov['done']} of {prov['cells']} (cell × seed); "
        f"pending {prov['pending']}, failed {prov['failed']}"
        + (
            f", stale {prov['stale']} (a weights folder they read has changed since; the sweep re-runs them)"
            if prov.get("stale")
            else ""
        )
    ]
    for key, title in (("git_commits", "git commits"), ("machines", "machines"), ("num_samples", "samples per FID")):
        counts = prov[key]
        if counts:
            lines.append(
                f"- {title}: "
                + ", ".join(f"`{k}`" + (f" ({v} cells)" if len(counts) > 1 else "") for k, v in counts.items())
            )
    lines.append("- written by `python -m add_bench.tables` from `cells.json` and `../cells/<id>/metrics.json`")
    return lines


def failure_lines(df: pd.DataFrame) -> list[str]:
    failed = df[df["status"].isin(["failed", "stale"])].drop_duplicates("id")
    return [
        f"- {r.name}, seed {r.seed} (cell `{r.id}`): {r.status}: {short_error(r.error, 200)}"
        for r in failed.itertuples()
    ]


def markdown(manifest: dict, df: pd.DataFrame, head_df: pd.DataFrame, steps: int | None, agreement: dict) -> str:
    align = alignment_of(df)
    num = df["num_samples"].dropna()
    n = f"-{int(num.iloc[0])}" if len(num) else ""
    where = (
        (
            "each row at its own step count (as in the paper's Table 2; NFE counts the network evaluations per "
            "sample, CFG doubling them; seconds per 1000 samples were measured while each cell was evaluated, on "
            "the machine that ran it: see Provenance, and compare NFE across machines; teacher evals in training = "
            "the teacher network evaluations the method's training spent, in millions of images, the compute "
            "the methods are compared at)"
        )
        if steps is None
        else f"{steps} sampling step{'s' * (steps != 1)} (as in the paper's Table 1)"
    )
    lines = [
        f"# {table_title(manifest)}",
        "",
        f"Ablation `{manifest.get('ablation', '?')}`, {where}; `*` = default row. Ours: mean ± 95% CI over "
        "seeds (t-distribution); `(n=1)` = a single seed; `n seeds` = finished / planned.",
        "",
        f"Metrics (ours): {CONVENTIONS.get(align, CONVENTIONS['align_prob']).format(n=n, collapse=COLLAPSE_RECALL)}",
        "",
        manifest.get("paper_note") or PAPER_NOTE.format(table=manifest.get("table", "1")),
        "",
        to_markdown(head_df) if len(head_df) else "_cells.json lists no cells._",
        "",
    ]
    tau = agreement.get("kendall_tau_fid")
    if tau is not None:
        agree = [p["agree"] for p in agreement["pairs"] if p["metric"] == "fid" and p["agree"] is not None]
        lines += [
            f"Ranking by FID vs the paper: Kendall τ = {tau:.2f} over {agreement['n_fid']} cells; "
            f"{sum(agree)} of {len(agree)} pairwise directions agree.",
            "",
        ]
    if failure_lines(df):
        lines += ["Failed or stale cells:", *failure_lines(df), ""]
    lines += [
        "Every step count: `table_steps.md`. Plots: `fid_vs_alignment.png`, `fid_vs_steps.png`; "
        "each row's samples: `samples.png`.",
        "",
        "## Provenance",
        "",
        *provenance_lines(provenance_summary(df)),
        "",
    ]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame) -> str:
    """Pipe table; the marker and setting columns left-aligned (settings such as "1" stay text), numbers right."""
    align = [
        "left" if c in ("", "setting") or table[c].astype(str).str.contains("[a-z]").any() else "right"
        for c in table.columns
    ]
    return table.to_markdown(index=False, colalign=align, disable_numparse=True)


def table_title(manifest: dict) -> str:
    return f"Table {manifest.get('table', '?')} — {manifest.get('title', manifest.get('ablation', ''))}"


def latex(head_df: pd.DataFrame, manifest: dict) -> str:
    """booktabs LaTeX of the displayed main table (special characters escaped, Unicode mapped to math)."""
    styler = head_df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    tex = styler.to_latex(
        hrules=True,
        column_format="l" * head_df.shape[1],
        position="t",
        caption=f"{table_title(manifest)}: ours (mean $\\pm$ 95\\% CI) beside the paper's numbers",
        label=f"tab:{manifest.get('ablation', 'ablation')}",
    )
    for char, replacement in LATEX_UNICODE.items():
        tex = tex.replace(char, replacement)
    return tex


# ------------------------------------------------------------------------------ plots
def cell_colors(agg: pd.DataFrame) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(dict.fromkeys(agg.sort_values("order")["name"]))}


def new_figure(figsize: tuple[float, float]):
    """A pyplot-free Figure: renders with Agg whatever backend is active (e.g. inline in a notebook)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: Path) -> Path:
    """PNG written to a temporary name beside ``path``, then renamed over it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def annotate_points(ax, xs, ys, names, colors, defaults, xerr=None, yerr=None) -> None:
    for i, (x, y, name) in enumerate(zip(xs, ys, names)):
        ax.errorbar(
            x,
            y,
            xerr=None if xerr is None else xerr[i],
            yerr=None if yerr is None else yerr[i],
            fmt="*" if defaults[i] else "o",
            ms=11 if defaults[i] else 6,
            color=colors[name],
            capsize=3,
        )
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def empty_panel(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_fid_vs_alignment(head: pd.DataFrame, manifest: dict, align_name: str, path: Path) -> Path:
    """Two panels with the same cell names: ours (FID vs alignment, 95% CI bars) and the paper's (FID vs CS)."""
    colors = cell_colors(head)
    fig = new_figure((11, 4.2))
    ours_ax, paper_ax = fig.subplots(1, 2)
    ours = head[(head["fid_n"] > 0) & (head["align_n"] > 0)]
    annotate_points(
        ours_ax,
        ours["align_mean"],
        ours["fid_mean"],
        list(ours["name"]),
        colors,
        list(ours["default"]),
        list(ours["align_ci95"]),
        list(ours["fid_ci95"]),
    )
    if ours.empty:
        empty_panel(ours_ax, "no finished cells yet")
    missing = [f"{r.name}: {r.status}" for r in head.itertuples() if r.fid_n == 0]
    if missing:
        ours_ax.text(0.02, 0.02, "; ".join(missing), transform=ours_ax.transAxes, fontsize=7, color="grey")
    paper = head.dropna(subset=["paper_fid", "paper_cs"])
    annotate_points(
        paper_ax, paper["paper_cs"], paper["paper_fid"], list(paper["name"]), colors, list(paper["default"])
    )
    if paper.empty:
        empty_panel(paper_ax, "no paper numbers for these cells")
    steps = sorted(int(x) for x in head["steps"].unique()) or [HEADLINE_STEPS]
    at = f"{steps[0]} step{'s' * (steps[0] != 1)}" if len(steps) == 1 else "each row at its steps"
    ours_ax.set(xlabel=f"{align_name} ↑", ylabel="FID ↓", title=f"ours ({at}, mean ± 95% CI)")
    paper_ax.set(
        xlabel="CLIP score ↑", ylabel="COCO FID-5k ↓", title=f"paper (ADD-M, Table {manifest.get('table', '?')})"
    )
    fig.suptitle(f"{table_title(manifest)}: * = default; compare directions, not values", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_fid_vs_steps(agg: pd.DataFrame, manifest: dict, path: Path) -> Path:
    """FID vs sampling steps per cell, mean with 95% CI bars."""
    colors = cell_colors(agg)
    fig = new_figure((6, 4))
    ax = fig.subplots()
    done = agg[agg["fid_n"] > 0]
    for (_, name), g in done.groupby(["order", "name"], sort=True):
        star = bool(g["default"].iloc[0])
        ax.errorbar(
            g["steps"],
            g["fid_mean"],
            yerr=g["fid_ci95"],
            marker="*" if star else "o",
            ms=10 if star else 6,
            capsize=3,
            color=colors[name],
            label=f"{name}{' *' if star else ''}",
        )
    if done.empty:
        empty_panel(ax, "no finished cells yet")
    else:
        ax.legend(fontsize=8)
    ticks = sorted(agg["steps"].unique())
    ax.set(
        xscale="log", xlabel="student sampling steps", ylabel="FID ↓", title=f"{table_title(manifest)}: FID vs steps"
    )
    ax.set_xticks(ticks, [str(s) for s in ticks])
    ax.minorticks_off()
    fig.tight_layout()
    return save_figure(fig, path)


def first_grid(folder_ids: list[str], cells_dir: Path, steps: int, num_classes: int = 10) -> np.ndarray | None:
    """The sample grid at ``steps`` (:func:`sample_grid`) of the first of these cells that has one."""
    for i in folder_ids:
        path = cells_dir / i / "samples.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    if f"steps_{steps}" in z.files:
                        return sample_grid(z[f"steps_{steps}"], z["labels"], num_classes=num_classes)
            except (OSError, ValueError, KeyError):
                continue
    return None


def plot_samples(head: pd.DataFrame, df: pd.DataFrame, manifest: dict, cells_dir: Path, path: Path) -> Path:
    """One panel per row of the main table: its cell's committed samples at the row's step count (the
    lowest finished seed; one class per grid row), so a mode collapse is seen at a glance."""
    n = max(len(head), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = new_figure((3.2 * cols, 3.6 * rows))
    fig.set_layout_engine("constrained")  # square image panels: tight_layout lets titles overlap the row above
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, r in zip(axes, head.itertuples()):
        done = df[(df["name"] == r.name) & (df["status"] == "done")].sort_values("seed")
        grid = first_grid(list(dict.fromkeys(done["id"])), cells_dir, int(r.steps))
        seed = "" if done.empty else f", seed {int(done['seed'].iloc[0])}"
        ax.set_title(
            f"{r.label}{' *' if r.default else ''}\n{int(r.steps)} step{'s' if r.steps != 1 else ''}{seed}", fontsize=8
        )
        if grid is None:
            empty_panel(ax, "no samples yet")
        else:
            ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(head) :]:
        ax.set_axis_off()
    fig.suptitle(f"{table_title(manifest)}: samples (one class per grid row)", fontsize=10)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ writing
def jsonable(value: Any) -> Any:
    """NaN → None, numpy scalars → Python, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def summary(manifest: dict, df: pd.DataFrame, agg: pd.DataFrame, steps: int, agreement: dict) -> dict[str, Any]:
    """What the tables show, as JSON for notebooks: per cell, per step count: mean / ci95 / n."""
    cells = []
    for (_, name), g in agg.groupby(["order", "name"], sort=True):
        first = g.iloc[0]
        cells.append(
            {
                "name": name,
                "label": first.label,
                "default": bool(first.default),
                "status": first.status,
                "row_steps": None if first.row_steps != first.row_steps else int(first.row_steps),
                "error": first.error,
                "n_seeds": int(first.n_seeds),
                "ids": list(dict.fromkeys(df.loc[df["name"] == name, "id"])),
                "paper": {"fid": first.paper_fid, "cs": first.paper_cs},
                "steps": {
                    str(r.steps): {
                        m: {
                            "mean": getattr(r, f"{m}_mean"),
                            "ci95": getattr(r, f"{m}_ci95"),
                            "n": int(getattr(r, f"{m}_n")),
                        }
                        for m in ("fid", "align", *(k for k, _, _ in DIVERSITY_METRICS))
                    }
                    | {"nfe": r.nfe, "sec_per_1000": r.sec_per_1000}
                    for r in g.itertuples()
                },
            }
        )
    align = alignment_of(df)
    return jsonable(
        {
            "ablation": manifest.get("ablation"),
            "table": manifest.get("table"),
            "title": manifest.get("title"),
            "headline_steps": steps,
            "alignment_key": align,
            "alignment_name": ALIGNMENT_NAMES[align],
            "paper_metric_names": manifest.get("paper_metric_names") or {"fid": "FID", "cs": "CLIP score"},
            "cells": cells,
            "agreement": agreement,
            "provenance": provenance_summary(df),
        }
    )


def diversity_columns() -> list[str]:
    return [f"{m}_{stat}" for m, _, _ in DIVERSITY_METRICS for stat in ("mean", "ci95", "n")]


def headline_csv(head: pd.DataFrame, align: str) -> str:
    cols = [
        "default",
        "name",
        "label",
        "steps",
        "status",
        "error",
        "n_seeds",
        "fid_n",
        "fid_mean",
        "fid_ci95",
        "align_mean",
        "align_ci95",
        "div_mean",
        "div_ci95",
        *diversity_columns(),
        "paper_fid",
        "paper_cs",
    ]
    if per_row_steps(head):  # a method comparison: the cost of each row too
        cols += ["nfe", "sec_per_1000", "teacher_evals", "paper_time"]
    collapsed = (head["recall_mean"] < COLLAPSE_RECALL).where(head["recall_n"] > 0)  # NaN: not measured
    return head[cols].assign(align_key=align, collapsed=collapsed).to_csv(index=False, float_format="%.6g")


def steps_csv(agg: pd.DataFrame, align: str) -> str:
    cols = [
        "name",
        "label",
        "default",
        "steps",
        "status",
        "n_seeds",
        "nfe",
        "fid_n",
        "fid_mean",
        "fid_ci95",
        "align_mean",
        "align_ci95",
        "div_mean",
        "div_ci95",
        *diversity_columns(),
        "sec_per_1000",
    ]
    return agg[cols].assign(align_key=align).to_csv(index=False, float_format="%.6g")


def write_tables(ablation_dir: str | Path) -> dict[str, Path]:
    """Write every table, plot and summary.json of one ablation folder; return {file name: path}."""
    out = Path(ablation_dir)
    manifest = read_manifest(out)
    df = load_results(out)
    agg = aggregate(df)
    head, steps = headline(agg)
    align = alignment_of(df)
    paper_names = manifest.get("paper_metric_names") or {}
    agreement = ranking_agreement(head)
    head_df = headline_table(head, ALIGNMENT_NAMES[align], paper_names)
    per_cell = one_row_per_cell(df, agg)
    steps_df = steps_table(per_cell, ALIGNMENT_NAMES[align])
    texts = {
        "table.md": markdown(manifest, df, head_df, steps, agreement),
        "table.tex": latex(head_df, manifest),
        "table.csv": headline_csv(head, align),
        "table_steps.md": f"# {table_title(manifest)}: every step count\n\nMean ± 95% CI over seeds; `*` = default row. "
        "See `table.md` for metric conventions and provenance.\n\n" + to_markdown(steps_df) + "\n",
        "table_steps.csv": steps_csv(per_cell, align),
    }
    written = {}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        written[name] = out / name
    written["fid_vs_alignment.png"] = plot_fid_vs_alignment(
        head, manifest, ALIGNMENT_NAMES[align], out / "fid_vs_alignment.png"
    )
    written["fid_vs_steps.png"] = plot_fid_vs_steps(per_cell, manifest, out / "fid_vs_steps.png")
    written["samples.png"] = plot_samples(head, df, manifest, out.parent / "cells", out / "samples.png")
    atomic_write_json(out / "summary.json", summary(manifest, df, agg, steps, agreement))
    written["summary.json"] = out / "summary.json"
    return written


# ------------------------------------------------------------------------------ helpers for notebooks
def default_results_root(repo: Path | None = None) -> Path:
    """Where the notebooks read results: ``ADD_BENCH_RESULTS`` if set, else the user's own ``runs/sweeps``
    once a sweep has written an ablation there, else the committed ``results/``."""
    import os

    repo = repo or REPO_ROOT
    own = repo / "runs" / "sweeps"
    default = own if any(own.glob("*/cells.json")) else repo / "results"
    return Path(os.environ.get("ADD_BENCH_RESULTS", default)).resolve()


def ablation_dirs(root: str | Path) -> list[Path]:
    """Ablation folders (those with a cells.json) directly under a results root, sorted by name."""
    root = Path(root)
    return sorted(p.parent for p in root.glob("*/cells.json")) if root.is_dir() else []


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10, num_classes: int = 10) -> np.ndarray:
    """One row per class, ``per_class`` samples each (black where a class has fewer), as one image array.
    Labels that are not class indices (COCO image ids at cluster scale): the samples in order instead."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        labels = np.arange(len(images)) // per_class
    h, w = images.shape[1:3]
    grid = np.zeros((num_classes * h, per_class * w, *images.shape[3:]), dtype=images.dtype)
    for c in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            grid[c * h : (c + 1) * h, j * w : (j + 1) * w] = images[i]
    return grid


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ablation_dirs", nargs="*", type=Path, help="ablation folders <root>/<ablation> with a cells.json")
    p.add_argument(
        "--report",
        action="store_true",
        help="write the findings document from every ablation under --results (add_bench.findings)",
    )
    p.add_argument("--results", type=Path, default=Path("results"), help="results root read by --report")
    p.add_argument("--report-out", type=Path, default=Path("docs/findings.md"), help="where --report writes")
    a = p.parse_args(argv)
    if not a.ablation_dirs and not a.report:
        p.error("give ablation folders, or --report")
    if a.report and not a.results.is_dir():
        raise DataError(f"--results {a.results}: no such folder")
    for folder in a.ablation_dirs:
        print(f"{folder}: wrote {', '.join(write_tables(folder))}", file=sys.stderr)
    if a.report:
        from add_bench.findings import write_report

        print(f"wrote {write_report(a.results, a.report_out)} from {a.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

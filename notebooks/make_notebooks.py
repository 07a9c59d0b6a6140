"""Generate the result notebooks (without outputs) from the cell sources below.

    python notebooks/make_notebooks.py          # rewrites notebooks/{ablations,methods,samples}.ipynb

Each notebook reads the results root from ``ADD_BENCH_RESULTS`` (default: the repository's ``results/``)
and runs to the end when there is nothing there yet, printing what to run first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from add_bench.provenance import atomic_write_text  # noqa: E402

SETUP = '''\
import json
import os
import sys
from pathlib import Path


def find_repo(start: Path) -> Path:
    """The add-bench checkout around this notebook, so `import add_bench` works without installing it."""
    return next((p for p in (start, *start.parents) if (p / "add_bench" / "__init__.py").is_file()), start)


REPO = find_repo(Path.cwd())
sys.path.insert(0, str(REPO))
ROOT = Path(os.environ.get("ADD_BENCH_RESULTS", REPO / "results")).resolve()
print(f"results root: {ROOT}  (set ADD_BENCH_RESULTS to change)")'''

ABLATIONS = [
    new_markdown_cell("""\
# ADD ablations: our tables beside the paper's Table 1

For every ablation folder under the results root (`<root>/<ablation>/cells.json`, written by
`python -m add_bench.sweep`) this notebook refreshes the tables and plots from the finished cells
(`add_bench.tables.write_tables`), shows them, and then asks across ablations: **do our cells rank in the
same order as the paper's?** Our numbers (FID and alignment on Fashion-MNIST-scale models, or FID / CLIP
score on the cluster scale) are not comparable in value to the paper's COCO numbers, only in direction."""),
    new_code_cell(
        SETUP
        + """

from add_bench.tables import ablation_dirs, write_tables

FOLDERS = ablation_dirs(ROOT)
if not FOLDERS:
    print(f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT}")
else:
    print("ablations:", ", ".join(f.name for f in FOLDERS))"""
    ),
    new_markdown_cell("## Each ablation: table (1 step) and plots"),
    new_code_cell("""\
from IPython.display import Image, Markdown, display

summaries = {}
for folder in FOLDERS:
    write_tables(folder)  # cheap, atomic: keeps the tables in step with the cells finished so far
    display(Markdown((folder / "table.md").read_text()))
    for png in ("fid_vs_alignment.png", "fid_vs_steps.png"):
        display(Image(filename=str(folder / png)))
    summaries[folder.name] = json.loads((folder / "summary.json").read_text())"""),
    new_markdown_cell("""\
## Ours vs the paper: same ranking?

Per ablation, over the cells that have both our number and the paper's (at the headline step count):
Kendall τ between our FID and the paper's FID (1 = same order, −1 = reversed), the same for our alignment
vs the paper's CLIP score, and every pair of cells with the direction in the paper and in ours."""),
    new_code_cell("""\
import pandas as pd


def agreement_row(name: str, s: dict) -> dict:
    a = s["agreement"]
    fid_pairs = [p["agree"] for p in a["pairs"] if p["metric"] == "fid" and p["agree"] is not None]
    return {"ablation": name, "table": s["table"], "cells compared": a["n_fid"],
            "Kendall τ (FID)": a["kendall_tau_fid"], "Kendall τ (alignment vs CS)": a["kendall_tau_align"],
            "FID directions agreeing": f"{sum(fid_pairs)}/{len(fid_pairs)}"}


if summaries:
    display(pd.DataFrame([agreement_row(n, s) for n, s in summaries.items()]))
    pairs = pd.DataFrame([{"ablation": n, **p} for n, s in summaries.items() for p in s["agreement"]["pairs"]])
    display(pairs if len(pairs) else "no pair of finished cells with paper numbers yet")
else:
    print("nothing to compare yet")"""),
    new_code_cell('''\
import matplotlib.pyplot as plt


def compared_cells(s: dict) -> list[tuple[dict, dict]]:
    """(cell, our FID stats at the headline step count) for cells with both our number and the paper's."""
    out = []
    for c in s["cells"]:
        ours = c["steps"].get(str(c.get("row_steps") or s["headline_steps"]), {}).get("fid", {})
        if c["paper"]["fid"] is not None and ours.get("n"):
            out.append((c, ours))
    return out


shown = {n: s for n, s in summaries.items() if compared_cells(s)}
if shown:
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, (name, s) in zip(axes.flat, shown.items()):
        for c, ours in compared_cells(s):
            ax.errorbar(c["paper"]["fid"], ours["mean"], yerr=ours["ci95"], fmt="*" if c["default"] else "o",
                        ms=10 if c["default"] else 6, capsize=3)
            ax.annotate(c["name"], (c["paper"]["fid"], ours["mean"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=8)
        tau = s["agreement"]["kendall_tau_fid"]
        ax.set(title=f"Table {s['table']} {name}" + ("" if tau is None else f": τ = {tau:.2f}"),
               xlabel="paper FID (COCO)", ylabel="our FID")
        ax.title.set_fontsize(9)
    fig.suptitle("Ours vs paper, FID per cell (* = default): same ranking ⇔ points rise left to right")
    fig.tight_layout()
    plt.show()
else:
    print("no ablation has finished cells with paper numbers yet")'''),
]

METHODS = [
    new_markdown_cell("""\
# Methods: teacher sampling vs the ADD student

FID against the number of network evaluations (NFE) for the DDIM teacher baseline
(`<root>/teacher/table.csv`, from `python -m add_bench.baseline`) and the ADD students' default cells from
the ablation folders (one curve per distinct default cell; ADD sampling costs one NFE per step). The
paper's Table 2 is given below for reference: its numbers are the paper's (SD1.5-scale models, COCO),
not ours."""),
    new_code_cell(
        SETUP
        + """

import pandas as pd
from IPython.display import display

from add_bench.tables import ablation_dirs, aggregate, load_results

teacher_csv = ROOT / "teacher" / "table.csv"
teacher = pd.read_csv(teacher_csv) if teacher_csv.is_file() else None
if teacher is None:
    print(f"no teacher baseline at {teacher_csv} yet; run python -m add_bench.baseline --out {ROOT / 'teacher'}")
else:
    display(teacher)"""
    ),
    new_code_cell('''\
def student_curves(root: Path) -> dict[str, pd.DataFrame]:
    """Aggregated step curves of the default cells, one per distinct set of cell ids (ablations share it)."""
    groups = {}  # cell ids → (ablation names, aggregated finished rows)
    for folder in ablation_dirs(root):
        df = load_results(folder)
        default = df[df["default"]]
        ids = frozenset(default["id"])
        if ids in groups:
            groups[ids][0].append(folder.name)
        elif len(default):
            agg = aggregate(default)
            groups[ids] = ([folder.name], agg[agg["fid_n"] > 0])
    return {f"ADD student, default cell of {names[0]}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else ""): agg
            for names, agg in groups.values() if len(agg)}


students = student_curves(ROOT)
if not students and teacher is None:
    print(f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT} "
          "and python -m add_bench.baseline")
for name, agg in students.items():
    print(name)
    display(agg[["steps", "nfe", "fid_mean", "fid_ci95", "align_mean", "align_ci95", "recall_mean", "coverage_mean",
                 "intra_fid_mean", "n_seeds"]])'''),
    new_markdown_cell("""\
## Our Table 2: methods on equal terms

`python -m add_bench.sweep ablations/methods.yaml` runs the teacher with DDIM and DPM-Solver, progressive
distillation (guided) and ADD with the same teacher, data, evaluation network and seeds; each row at its own
step count, with its network evaluations per sample (NFE) and sampling seconds per 1000 samples on the CPU."""),
    new_code_cell("""\
methods_csv = ROOT / "methods" / "table.csv"
methods = pd.read_csv(methods_csv) if methods_csv.is_file() else None
if methods is None:
    print(f"no method comparison at {methods_csv} yet; run python -m add_bench.sweep ablations/methods.yaml --out {ROOT}")
else:
    shown = [c for c in ("label", "steps", "nfe", "sec_per_1000", "fid_mean", "fid_ci95", "align_mean", "align_ci95",
                         "recall_mean", "coverage_mean", "collapsed", "n_seeds", "status", "paper_fid", "paper_cs",
                         "paper_time") if c in methods]  # recall, coverage: absent from tables written before them
    display(methods[shown])"""),
    new_markdown_cell("## FID vs NFE"),
    new_code_cell('''\
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

# The paper's Table 2 (Sauer et al. 2023): SD1.5-based methods, COCO FID-5k / CLIP score, seconds per image
# on an A100. These are the PAPER'S numbers, hard-coded for reference; none of them was measured here.
PAPER_TABLE_2 = pd.DataFrame([
    ("DPM-Solver", 25, 0.88, 20.1, 0.318), ("DPM-Solver", 8, 0.34, 31.7, 0.320),
    ("Progressive distillation (guided)", 1, 0.09, 37.2, 0.275),
    ("Progressive distillation (guided)", 2, 0.13, 26.0, 0.297),
    ("Progressive distillation (guided)", 4, 0.21, 26.4, 0.300),
    ("CFG-aware distillation", 8, 0.34, 24.2, 0.300), ("InstaFlow-0.9B", 1, 0.09, 23.4, 0.304),
    ("InstaFlow-1.7B", 1, 0.12, 22.4, 0.309), ("UFOGen", 1, 0.09, 22.5, 0.311), ("ADD-M", 1, 0.09, 19.7, 0.326),
], columns=["method", "steps", "time s (A100)", "FID (paper)", "CLIP score (paper)"])


def teacher_label(model: str, cfg) -> str:
    return f"{model}, no CFG" if str(cfg) in ("1", "1.0") else f"{model}, CFG {cfg}"


def plain_log_ticks(ax) -> None:
    """Log axes labelled 1, 2, 5, 10, 20 … rather than 10^0, 2×10^0 …"""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


fig, (ours_ax, paper_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
if teacher is not None:
    sampled = teacher[teacher["steps"] > 0]
    for (model, cfg), g in sampled.groupby(["model", "cfg_scale"], sort=False):
        ours_ax.plot(g["nfe"], g["fid"], marker="o", ls="--", label=teacher_label(model, cfg))
    for _, floor in teacher[teacher["steps"] == 0].iterrows():
        ours_ax.axhline(floor["fid"], color="k", lw=1, ls=":", label=f"floor: {floor['model']}")
for name, agg in students.items():
    ours_ax.errorbar(agg["nfe"], agg["fid_mean"], yerr=agg["fid_ci95"], marker="*", ms=10, capsize=3, label=name)
if methods is not None:
    for label, g in methods.dropna(subset=["fid_mean"]).groupby("label", sort=False):
        ours_ax.errorbar(g["nfe"], g["fid_mean"], yerr=g["fid_ci95"], marker="s", ls="none", capsize=3,
                         label=f"methods.yaml: {label}")
if teacher is None and not students and methods is None:
    ours_ax.text(0.5, 0.5, "no results yet", ha="center", transform=ours_ax.transAxes)
else:
    ours_ax.legend(fontsize=7)
ours_ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID ↓", title="ours")
for method, g in PAPER_TABLE_2.groupby("method", sort=False):
    paper_ax.plot(g["steps"], g["FID (paper)"], marker="*" if method == "ADD-M" else "o", label=method)
paper_ax.set(xscale="log", xlabel="steps", ylabel="COCO FID-5k ↓", title="paper, Table 2 (SD1.5-based; not ours)")
paper_ax.legend(fontsize=7, loc="upper right")
plain_log_ticks(ours_ax)
plain_log_ticks(paper_ax)
fig.tight_layout()
plt.show()'''),
    new_markdown_cell("## The paper's Table 2 (the paper's numbers, for reference only)"),
    new_code_cell("PAPER_TABLE_2"),
]

SAMPLES = [
    new_markdown_cell("""\
# Samples per cell

For each ablation, one sample grid per cell (first seed with `samples.npz`) and step count: one row per
class, 10 samples each, as written by the sweep (`<root>/cells/<id>/samples.npz`)."""),
    new_code_cell(
        SETUP
        + """

import matplotlib.pyplot as plt
import numpy as np

from add_bench.tables import ablation_dirs, read_manifest, sample_grid

FOLDERS = ablation_dirs(ROOT)
if not FOLDERS:
    print(f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT}")"""
    ),
    new_code_cell('''\
def cells_with_samples(folder: Path, manifest: dict) -> dict[str, tuple[dict, Path]]:
    """Cell name → (manifest entry, samples.npz) of its first seed that has samples."""
    found = {}
    for c in manifest["cells"]:
        path = folder.parent / "cells" / str(c["id"]) / "samples.npz"
        if c["name"] not in found and path.is_file():
            found[c["name"]] = (c, path)
    return found


def show_grids(folder: Path) -> None:
    manifest = read_manifest(folder)
    cells = cells_with_samples(folder, manifest)
    without = [n for n in dict.fromkeys(c["name"] for c in manifest["cells"]) if n not in cells]
    if without:
        print(f"{folder.name}: no samples.npz yet for {', '.join(without)}")
    if not cells:
        return
    steps = manifest.get("eval_steps") or [1, 2, 4]
    fig, axes = plt.subplots(len(cells), len(steps), figsize=(2.6 * len(steps), 2.8 * len(cells)), squeeze=False)
    for row, (name, (c, path)) in zip(axes, cells.items()):
        with np.load(path) as npz:
            for ax, s in zip(row, steps):
                if f"steps_{s}" in npz:
                    ax.imshow(sample_grid(npz[f"steps_{s}"], npz["labels"]), cmap="gray", vmin=0, vmax=255)
                else:
                    ax.text(0.5, 0.5, "not sampled", ha="center", transform=ax.transAxes)
                ax.set_title(f"{name}{' *' if c.get('default') else ''}: {s} step{'s' * (s != 1)}, seed {c.get('seed')}",
                             fontsize=8)
                ax.axis("off")
    fig.suptitle(f"Table {manifest.get('table', '?')} — {manifest.get('title', folder.name)} (one class per row)")
    fig.tight_layout()
    plt.show()


for folder in FOLDERS:
    show_grids(folder)'''),
]

NOTEBOOKS = {"ablations": ABLATIONS, "methods": METHODS, "samples": SAMPLES}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` with stable cell ids (so regenerating gives the same file)."""
    nb = new_notebook(cells=[nbformat.from_dict(dict(c)) for c in NOTEBOOKS[name]])
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{i}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        atomic_write_text(path, nbformat.writes(build(name)) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Methods: teacher sampling vs the ADD student
#
# FID against the number of network evaluations (NFE) for the DDIM teacher baseline
# (`<root>/teacher/table.csv`, from `python -m add_bench.baseline`) and the ADD students' default cells from
# the ablation folders (one curve per distinct default cell; ADD sampling costs one NFE per step). The
# paper's Table 2 is given below for reference: its numbers are the paper's (SD1.5-scale models, COCO),
# not ours.

# %%
from pathlib import Path

from add_bench.tables import default_results_root

ROOT = default_results_root()  # ADD_BENCH_RESULTS, else your runs/sweeps once a sweep wrote there, else results/
print(f"results root: {ROOT}  (set ADD_BENCH_RESULTS to change)")

import pandas as pd
from IPython.display import display

from add_bench.tables import ablation_dirs, aggregate, load_results

teacher_csv = ROOT / "teacher" / "table.csv"
teacher = pd.read_csv(teacher_csv) if teacher_csv.is_file() else None
if teacher is None:
    print(f"no teacher baseline at {teacher_csv} yet; run python -m add_bench.baseline --out {ROOT / 'teacher'}")
else:
    display(teacher)


# %%
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
    return {
        f"ADD student, default cell of {names[0]}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else ""): agg
        for names, agg in groups.values()
        if len(agg)
    }


students = student_curves(ROOT)
if not students and teacher is None:
    print(
        f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT} "
        "and python -m add_bench.baseline"
    )
# the quality columns both tables below show: FID and alignment with their intervals, recall and coverage
QUALITY = ["fid_mean", "fid_ci95", "align_mean", "align_ci95", "recall_mean", "coverage_mean"]
for name, agg in students.items():
    print(name)
    display(agg[["steps", "nfe", *QUALITY, "intra_fid_mean", "n_seeds"]])

# %% [markdown]
# ## Our Table 2: methods on equal terms
#
# `python -m add_bench.sweep ablations/methods.yaml` runs the teacher with DDIM and DPM-Solver, progressive
# distillation (guided) and ADD with the same teacher, data, evaluation network and seeds; each row at its own
# step count, with its network evaluations per sample (NFE) and sampling seconds per 1000 samples on the CPU.

# %%
methods_csv = ROOT / "methods" / "table.csv"
methods = pd.read_csv(methods_csv) if methods_csv.is_file() else None
if methods is None:
    print(
        f"no method comparison at {methods_csv} yet; run python -m add_bench.sweep ablations/methods.yaml --out {ROOT}"
    )
else:
    shown = [
        c
        for c in (
            "label",
            "steps",
            "nfe",
            "sec_per_1000",
            *QUALITY,
            "collapsed",
            "n_seeds",
            "status",
            "paper_fid",
            "paper_cs",
            "paper_time",
        )
        if c in methods
    ]  # recall, coverage: absent from tables written before them
    display(methods[shown])

# %% [markdown]
# ## FID vs NFE

# %%
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

# The paper's Table 2 (Sauer et al. 2023): SD1.5-based methods, COCO FID-5k / CLIP score, seconds per image
# on an A100. These are the PAPER'S numbers, hard-coded for reference; none of them was measured here.
PAPER_TABLE_2 = pd.DataFrame(
    [
        ("DPM-Solver", 25, 0.88, 20.1, 0.318),
        ("DPM-Solver", 8, 0.34, 31.7, 0.320),
        ("Progressive distillation (guided)", 1, 0.09, 37.2, 0.275),
        ("Progressive distillation (guided)", 2, 0.13, 26.0, 0.297),
        ("Progressive distillation (guided)", 4, 0.21, 26.4, 0.300),
        ("CFG-aware distillation", 8, 0.34, 24.2, 0.300),
        ("InstaFlow-0.9B", 1, 0.09, 23.4, 0.304),
        ("InstaFlow-1.7B", 1, 0.12, 22.4, 0.309),
        ("UFOGen", 1, 0.09, 22.5, 0.311),
        ("ADD-M", 1, 0.09, 19.7, 0.326),
    ],
    columns=["method", "steps", "time s (A100)", "FID (paper)", "CLIP score (paper)"],
)


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
        ours_ax.errorbar(
            g["nfe"],
            g["fid_mean"],
            yerr=g["fid_ci95"],
            marker="s",
            ls="none",
            capsize=3,
            label=f"methods.yaml: {label}",
        )
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
plt.show()

# %% [markdown]
# ## The paper's Table 2 (the paper's numbers, for reference only)

# %%
PAPER_TABLE_2

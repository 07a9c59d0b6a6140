# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ADD ablations: our tables beside the paper's Table 1
#
# For every ablation folder under the results root (`<root>/<ablation>/cells.json`, written by
# `python -m add_bench.sweep`) this notebook shows the tables and plots the sweep wrote (it writes nothing;
# `python -m add_bench.tables <root>/<ablation>` refreshes them), and then asks across ablations: **do our cells rank in the
# same order as the paper's?** Our numbers (FID and alignment on Fashion-MNIST-scale models, or FID / CLIP
# score on the cluster scale) are not comparable in value to the paper's COCO numbers, only in direction.

# %%
import json

from add_bench.tables import default_results_root

ROOT = default_results_root()  # ADD_BENCH_RESULTS, else your runs/sweeps once a sweep wrote there, else results/
print(f"results root: {ROOT}  (set ADD_BENCH_RESULTS to change)")

from add_bench.tables import ablation_dirs

FOLDERS = ablation_dirs(ROOT)
if not FOLDERS:
    print(f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT}")
else:
    print("ablations:", ", ".join(f.name for f in FOLDERS))

# %% [markdown]
# ## Each ablation: table (1 step) and plots

# %%
from IPython.display import Image, Markdown, display

summaries = {}
for folder in FOLDERS:
    if not (folder / "summary.json").is_file():
        print(f"{folder.name}: no tables yet; run python -m add_bench.tables {folder}")
        continue
    display(Markdown((folder / "table.md").read_text()))
    for png in ("fid_vs_alignment.png", "fid_vs_steps.png"):
        if (folder / png).is_file():
            display(Image(filename=str(folder / png)))
    summaries[folder.name] = json.loads((folder / "summary.json").read_text())

# %% [markdown]
# ## Ours vs the paper: same ranking?
#
# Per ablation, over the cells that have both our number and the paper's (at the headline step count):
# Kendall τ between our FID and the paper's FID (1 = same order, −1 = reversed), the same for our alignment
# vs the paper's CLIP score, and every pair of cells with the direction in the paper and in ours.

# %%
import pandas as pd


def agreement_row(name: str, s: dict) -> dict:
    a = s["agreement"]
    fid_pairs = [p["agree"] for p in a["pairs"] if p["metric"] == "fid" and p["agree"] is not None]
    return {
        "ablation": name,
        "table": s["table"],
        "cells compared": a["n_fid"],
        "Kendall τ (FID)": a["kendall_tau_fid"],
        "Kendall τ (alignment vs CS)": a["kendall_tau_align"],
        "FID directions agreeing": f"{sum(fid_pairs)}/{len(fid_pairs)}",
    }


if summaries:
    display(pd.DataFrame([agreement_row(n, s) for n, s in summaries.items()]))
    pairs = pd.DataFrame([{"ablation": n, **p} for n, s in summaries.items() for p in s["agreement"]["pairs"]])
    display(pairs if len(pairs) else "no pair of finished cells with paper numbers yet")
else:
    print("nothing to compare yet")

# %%
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
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, (name, s) in zip(axes.flat, shown.items()):
        for c, ours in compared_cells(s):
            ax.errorbar(
                c["paper"]["fid"],
                ours["mean"],
                yerr=ours["ci95"],
                fmt="*" if c["default"] else "o",
                ms=10 if c["default"] else 6,
                capsize=3,
            )
            ax.annotate(
                c["name"], (c["paper"]["fid"], ours["mean"]), xytext=(4, 4), textcoords="offset points", fontsize=8
            )
        tau = s["agreement"]["kendall_tau_fid"]
        ax.set(
            title=f"Table {s['table']} {name}" + ("" if tau is None else f": τ = {tau:.2f}"),
            xlabel="paper FID (COCO)",
            ylabel="our FID",
        )
        ax.title.set_fontsize(9)
    fig.suptitle("Ours vs paper, FID per cell (* = default): same ranking ⇔ points rise left to right")
    fig.tight_layout()
    plt.show()
else:
    print("no ablation has finished cells with paper numbers yet")

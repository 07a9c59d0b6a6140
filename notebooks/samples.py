# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Samples per cell
#
# For each ablation, one sample grid per cell (first seed with `samples.npz`) and step count: one row per
# class, 10 samples each, as written by the sweep (`<root>/cells/<id>/samples.npz`).

# %%
from pathlib import Path

from add_bench.tables import default_results_root

ROOT = default_results_root()  # ADD_BENCH_RESULTS, else your runs/sweeps once a sweep wrote there, else results/
print(f"results root: {ROOT}  (set ADD_BENCH_RESULTS to change)")

import matplotlib.pyplot as plt
import numpy as np

from add_bench.tables import ablation_dirs, read_manifest, sample_grid

FOLDERS = ablation_dirs(ROOT)
if not FOLDERS:
    print(f"no results under {ROOT} yet; run python -m add_bench.sweep ablations/table1.yaml --out {ROOT}")


# %%
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
                ax.set_title(
                    f"{name}{' *' if c.get('default') else ''}: {s} step{'s' * (s != 1)}, seed {c.get('seed')}",
                    fontsize=8,
                )
                ax.axis("off")
    fig.suptitle(f"Table {manifest.get('table', '?')} — {manifest.get('title', folder.name)} (one class per row)")
    fig.tight_layout()
    plt.show()


for folder in FOLDERS:
    show_grids(folder)

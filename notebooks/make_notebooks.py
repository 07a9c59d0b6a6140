"""Generate the result notebooks (without outputs) from their jupytext sources.

    python notebooks/make_notebooks.py          # notebooks/{ablations,methods,samples}.py → .ipynb

The ``.py`` files (jupytext percent format) are the sources to edit; the ``.ipynb`` files are written
from them with stable cell ids, so that regenerating gives the same files (a test checks they are
current). Each notebook reads the results root from ``ADD_BENCH_RESULTS``; by default the user's own
``runs/sweeps`` when a sweep has written there, else the committed ``results/``. Opening one writes
nothing; it runs to the end when there is nothing there yet, printing what to run first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from add_bench.provenance import atomic_write_text  # noqa: E402

NAMES = ("ablations", "methods", "samples")


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` from ``notebooks/<name>.py``, with stable cell ids and no jupytext metadata."""
    nb = jupytext.read(HERE / f"{name}.py", fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{i}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name in NAMES:
        path = HERE / f"{name}.ipynb"
        atomic_write_text(path, nbformat.writes(build(name)) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

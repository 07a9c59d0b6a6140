"""The result notebooks run headless (nbclient) on an empty results root and on a fake sweep root."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from fake_sweep import make_fake_sweep

from add_bench.provenance import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NAMES = ("ablations", "methods", "samples")  # notebooks/<name>.py (jupytext) → <name>.ipynb


def load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def python3_kernel():
    """The python3 kernel spec, installed for this user if missing; skip if that is impossible."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        r = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no python3 Jupyter kernel and `python -m ipykernel install --user` failed: {r.stderr[-300:]}")
    return "python3"


def run_notebook(name: str, root, monkeypatch, kernel: str):
    """Execute notebooks/<name>.ipynb with ADD_BENCH_RESULTS=root; nbclient raises if any cell raises."""
    monkeypatch.setenv("ADD_BENCH_RESULTS", str(root))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    ).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, images


def test_notebooks_match_generator():
    generator = load_generator()
    for name in NAMES:
        on_disk = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        assert json.loads(nbformat.writes(on_disk)) == json.loads(nbformat.writes(generator.build(name))), (
            f"notebooks/{name}.ipynb is stale: run python notebooks/make_notebooks.py"
        )
        assert not any(c.get("outputs") for c in on_disk.cells), f"{name}.ipynb is committed with outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_without_results(name, tmp_path, monkeypatch, python3_kernel):
    text, _ = run_notebook(name, tmp_path / "empty", monkeypatch, python3_kernel)
    assert "yet; run python -m add_bench." in text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_on_fake_sweep(name, tmp_path, monkeypatch, python3_kernel):
    """On a sweep's results (tables written, as the sweep writes them) each notebook shows them and writes
    nothing: opening a notebook has no side effects."""
    from add_bench.tables import ablation_dirs, write_tables

    root = make_fake_sweep(tmp_path / "sweep")
    for folder in ablation_dirs(root):
        write_tables(folder)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    text, images = run_notebook(name, root, monkeypatch, python3_kernel)
    assert "no results under" not in text and "no tables yet" not in text and images >= 1
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_notebooks_default_to_the_users_own_runs(tmp_path, monkeypatch):
    """Without ADD_BENCH_RESULTS the notebooks read runs/sweeps when a sweep has written there, else results/."""
    from add_bench.tables import default_results_root

    monkeypatch.delenv("ADD_BENCH_RESULTS", raising=False)
    assert default_results_root(tmp_path) == (tmp_path / "results").resolve()
    (tmp_path / "runs" / "sweeps" / "loss_weighting").mkdir(parents=True)
    (tmp_path / "runs" / "sweeps" / "loss_weighting" / "cells.json").write_text("{}")
    assert default_results_root(tmp_path) == (tmp_path / "runs" / "sweeps").resolve()
    monkeypatch.setenv("ADD_BENCH_RESULTS", str(tmp_path / "elsewhere"))
    assert default_results_root(tmp_path) == (tmp_path / "elsewhere").resolve()
    assert all("default_results_root()" in (NOTEBOOKS_DIR / f"{n}.py").read_text() for n in NAMES)

"""add_bench.tables on a fake sweep root with known numbers (see fake_sweep.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from fake_sweep import make_fake_sweep
from PIL import Image

from add_bench.errors import DataError
from add_bench.provenance import REPO_ROOT
from add_bench.tables import aggregate, ci95, load_results, main, read_manifest, sample_grid, write_tables

T_975_1 = 12.706204736  # t_{0.975} with 1 degree of freedom


@pytest.fixture
def root(tmp_path):
    return make_fake_sweep(tmp_path / "sweep")


def table_line(markdown: str, text: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("|") and text in line)


def test_ci95_hand_computed():
    assert ci95([10.0, 12.0]) == pytest.approx(T_975_1)  # s = √2, so t·s/√2 = t
    assert ci95([0.80, 0.84]) == pytest.approx(T_975_1 * 0.02)
    assert ci95([5.0]) == 0.0
    assert math.isnan(ci95([]))
    assert ci95([1.0, 2.0, float("nan")]) == pytest.approx(T_975_1 * 0.5)


def test_load_and_aggregate(root):
    df = load_results(root / "loss_weighting")
    assert len(df) == 3 * 2 * 3  # cells × seeds × step counts (unfinished cells keep one row per planned step)
    assert df.groupby("name", sort=False)["status"].first().to_dict() == {
        "exp": "done",
        "sds": "pending",
        "nfsd": "failed",
    }
    agg = aggregate(df).set_index(["name", "steps"])
    one = agg.loc[("exp", 1)]
    assert (one.fid_mean, one.fid_n, one.n_seeds) == (pytest.approx(11.0), 2, 2)
    assert one.fid_ci95 == pytest.approx(T_975_1)
    assert one.align_mean == pytest.approx(0.82) and one.align_ci95 == pytest.approx(T_975_1 * 0.02)
    assert agg.loc[("exp", 4)].fid_mean == pytest.approx(8.5)
    assert agg.loc[("exp", 4)].fid_ci95 == pytest.approx(T_975_1 * 0.5)
    assert agg.loc[("sds", 1)].status == "pending" and agg.loc[("sds", 1)].fid_n == 0
    assert agg.loc[("nfsd", 1)].status == "failed" and "NaN in the teacher target" in agg.loc[("nfsd", 1)].error
    assert list(dict.fromkeys(agg.reset_index()["name"])) == ["exp", "sds", "nfsd"]  # manifest order


def test_seeds_sharing_one_cell_are_one_measurement(root):
    """A row whose seeds are one cell (the teacher reads no seed) is one measurement: n = 1, no interval."""
    df = load_results(root / "loss_weighting")
    exp = df["name"] == "exp"
    df.loc[exp, "id"] = df.loc[exp, "id"].iloc[0]
    df.loc[exp, "fid"] = df.loc[exp].groupby("steps")["fid"].transform("first")
    one = aggregate(df).set_index(["name", "steps"]).loc[("exp", 1)]
    assert (one.fid_n, one.fid_ci95, one.n_seeds, one.status) == (1, 0.0, 2, "done")


def test_write_tables(root):
    folder = root / "loss_weighting"
    written = write_tables(folder)
    names = {
        "table.md",
        "table.tex",
        "table.csv",
        "table_steps.md",
        "table_steps.csv",
        "fid_vs_alignment.png",
        "fid_vs_steps.png",
        "samples.png",
        "summary.json",
    }
    assert set(written) == names and all((folder / n).is_file() for n in names)
    assert not list(folder.glob(".*tmp"))  # nothing left from the atomic writes
    md = (folder / "table.md").read_text()
    assert md.startswith("# Table 1d — Distillation weighting c(t)\n")
    assert "FID-5000" in md and "compare directions" in md and "abc123" in md and "testhost" in md
    exp = table_line(md, "L_adv + λ·L_distill,exp")
    assert exp.startswith("| *") and "11.00 ± 12.71" in exp and "0.820 ± 0.254" in exp
    assert "20.6" in exp and "0.319" in exp and "2/2" in exp  # the paper's numbers beside ours
    sds = table_line(md, "L_adv + λ·L_distill,sds")
    assert "pending" in sds and "22.3" in sds and not sds.startswith("| *")
    assert "failed: ValueError: NaN in the teacher target" in table_line(md, "L_adv + λ·L_distill,nfsd")
    assert "pending" in table_line((folder / "table_steps.md").read_text(), "distill,sds")

    csv = pd.read_csv(folder / "table.csv")
    assert list(csv["name"]) == ["exp", "sds", "nfsd"] and list(csv["default"]) == [True, False, False]
    assert csv.loc[0, "fid_mean"] == pytest.approx(11) and csv.loc[0, "paper_fid"] == pytest.approx(20.6)
    assert list(csv["status"]) == ["done", "pending", "failed"]
    steps = pd.read_csv(folder / "table_steps.csv")
    assert len(steps) == 9 and set(steps["steps"]) == {1, 2, 4}
    tex = (folder / "table.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule")) and r"L\_adv" in tex
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cells"][0]["steps"]["1"]["fid"] == {"mean": 11.0, "ci95": pytest.approx(T_975_1), "n": 2}
    assert summary["cells"][1]["steps"]["1"]["fid"]["mean"] is None and summary["provenance"]["pending"] == 2
    for png in ("fid_vs_alignment.png", "fid_vs_steps.png", "samples.png"):
        with Image.open(folder / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300


def test_single_seed_and_ranking(root):
    write_tables(root / "teacher_steps")
    md = (root / "teacher_steps" / "table.md").read_text()
    assert "10.00 (n=1)" in table_line(md, "| *")
    assert "Kendall τ = 1.00 over 2 cells" in md  # k4 has no paper number
    agreement = json.loads((root / "teacher_steps" / "summary.json").read_text())["agreement"]
    assert agreement["kendall_tau_fid"] == 1.0
    assert [(p["a"], p["b"], p["agree"]) for p in agreement["pairs"] if p["metric"] == "fid"] == [("k1", "k2", True)]


def test_partial_and_unreadable_results(root):
    (root / "cells" / "default_s1" / "metrics.json").unlink()  # exp: one seed done, one pending
    (root / "cells" / "teac_k2_s0" / "metrics.json").write_text('{"rows": [')  # truncated
    write_tables(root / "loss_weighting")
    exp = table_line((root / "loss_weighting" / "table.md").read_text(), "distill,exp")
    assert "10.00 (n=1)" in exp and "1/2" in exp
    write_tables(root / "teacher_steps")
    assert "failed: unreadable result file" in table_line((root / "teacher_steps" / "table.md").read_text(), "| 2 ")


def test_clip_score_key(tmp_path):
    root = make_fake_sweep(tmp_path, alignment_key="clip_score")
    write_tables(root / "loss_weighting")
    md = (root / "loss_weighting" / "table.md").read_text()
    assert "ours CLIP score" in md and "0.820 ± 0.254" in md and "clean-fid" in md


def test_missing_manifest(tmp_path, capsys):
    with pytest.raises(DataError, match="cells.json"):
        read_manifest(tmp_path)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "cells.json") in err[0]


def test_cli_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "add_bench.tables", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(tmp_path) in lines[0] and lines[0].startswith("error: ")


def test_sample_grid():
    labels = np.array([3, 3, 0])
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (7, 8, 9)])
    grid = sample_grid(images, labels, per_class=10)
    assert grid.shape == (280, 280) and grid.dtype == np.uint8
    assert grid[3 * 28, 0] == 7 and grid[3 * 28, 28] == 8 and grid[0, 0] == 9 and grid[0, 28] == 0


def test_method_table_rows_at_their_own_step_counts(tmp_path):
    root = make_fake_sweep(tmp_path / "sweep")
    table = (root / "methods" / "table.md").read_text()
    assert "each row at its own step count" in table and "SD1.5-based methods (Table 2)" in table
    csv = pd.read_csv(root / "methods" / "table.csv")
    # the default cell of seed 0: FID 10 at 1 step, 8 at 4 steps; NFE and sampling time of each row
    assert list(csv["steps"]) == [1, 4] and list(csv["fid_mean"]) == [10.0, 8.0]
    assert list(csv["nfe"]) == [1, 4] and list(csv["sec_per_1000"]) == [3.2, 12.8] and csv["paper_time"][0] == 0.09
    steps = (root / "methods" / "table_steps.md").read_text()
    assert "FID @1" in steps and "FID @4" in steps
    # add1 and add4 are one cell (one training): one row in the every-step table and its CSV, not two copies
    assert len([line for line in steps.splitlines() if line.startswith("|") and "ADD" in line]) == 1
    steps_csv = pd.read_csv(root / "methods" / "table_steps.csv")
    assert list(steps_csv["name"]) == ["add1"] * 3 and list(steps_csv["fid_mean"]) == [10.0, 9.0, 8.0]
    assert steps_csv["default"].all()


def test_rows_sharing_a_cell_merge_their_labels_in_the_every_step_table():
    from add_bench.tables import one_row_per_cell

    df = pd.DataFrame(
        {"name": ["pd1", "pd4", "cfg", "add", "pd1", "pd4", "cfg"], "id": ["p0", "p0", "p0", "a0", "p1", "p1", "p1"]}
    )  # two seeds of the progressive cell
    agg = pd.DataFrame(
        {
            "order": [0, 1, 2, 3],
            "name": ["pd1", "pd4", "cfg", "add"],
            "steps": [1, 1, 1, 1],
            "label": ["PD", "PD", "CFG-aware", "ADD"],
            "default": [False, False, False, True],
        }
    )
    out = one_row_per_cell(df, agg)
    assert list(out["name"]) == ["pd1", "add"] and list(out["label"]) == ["PD / CFG-aware", "ADD"]
    assert list(out["default"]) == [False, True]


def test_sample_panels_show_each_rows_grid_or_say_it_has_none(tmp_path):
    from add_bench.tables import first_grid

    root = make_fake_sweep(tmp_path / "sweep")
    grid = first_grid(["default_s0"], root / "cells", 1)
    with np.load(root / "cells" / "default_s0" / "samples.npz") as z:
        first_of_class_3 = z["steps_1"][np.flatnonzero(z["labels"] == 3)[0]]
    assert grid.shape == (280, 280) and (grid[84:112, :28] == first_of_class_3).all()  # class 3 = grid row 3
    assert first_grid(["default_s0"], root / "cells", 8) is None  # not sampled at 8 steps
    assert first_grid(["no_such_cell", "default_s0"], root / "cells", 1) is not None  # the next seed's grid
    # cluster scale: the labels are COCO image ids, so the samples are tiled in order, 10 per grid row
    coco = root / "cells" / "coco"
    coco.mkdir()
    images = np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(coco / "samples.npz", steps_1=images, labels=np.arange(139, 159))
    grid = first_grid(["coco"], root / "cells", 1)
    assert grid.shape == (80, 80, 3) and (grid[8:16, 16:24] == images[12]).all() and not grid[16:].any()


def test_method_rows_show_whole_nfe_and_their_own_steps():
    from add_bench.tables import headline_table

    head = pd.DataFrame(
        [
            {
                "default": False,
                "label": "DPM-Solver",
                "steps": 25,
                "row_steps": 25,
                "nfe": 50.0,
                "sec_per_1000": 120.0,
                "fid_mean": 0.68,
                "fid_ci95": 0.0,
                "fid_n": 1,
                "align_mean": 0.94,
                "align_ci95": 0.0,
                "align_n": 1,
                "paper_fid": 20.1,
                "paper_cs": 0.318,
                "paper_time": 0.88,
                "n_seeds": 1,
                "status": "done",
                "error": None,
            }
        ]
    )
    row = headline_table(head, "align. prob", {}).iloc[0]
    assert (row["steps"], row["NFE"], row["s / 1000 samples (ours, CPU)"]) == ("25", "50", "120")
    assert row["paper s / image (A100)"] == "0.88" and row["ours FID ↓"] == "0.68 (n=1)"


def test_tables_show_the_within_class_diversity_of_each_cells_grid(tmp_path):
    root = make_fake_sweep(tmp_path / "sweep")
    # seed 1 of the default cell collapsed: every sample of a class is the same image
    z = dict(np.load(root / "cells" / "default_s1" / "samples.npz"))
    first = {c: np.flatnonzero(z["labels"] == c)[0] for c in range(10)}
    for key in [k for k in z if k.startswith("steps_")]:
        z[key] = z[key][[first[c] for c in z["labels"]]]
    np.savez_compressed(root / "cells" / "default_s1" / "samples.npz", **z)
    write_tables(root / "loss_weighting")
    csv = pd.read_csv(root / "loss_weighting" / "table.csv")
    uniform = 255 / np.sqrt(12) / 255  # std of uniform random pixels (seed 0's grids)
    assert csv.loc[0, "div_mean"] == pytest.approx(uniform / 2, abs=0.01)  # mean of ≈0.29 (seed 0) and 0 (seed 1)
    assert "ours diversity ↑" in (root / "loss_weighting" / "table.md").read_text()


def test_recall_coverage_intra_fid_columns_with_not_measured_and_collapse_flags(root):
    """Cells evaluated with the diversity-aware metrics show them; cells from before show n/m; a row below
    COLLAPSE_RECALL is flagged."""
    from add_bench import tables

    folder = root / "loss_weighting"
    m_path = root / "cells" / "default_s0" / "metrics.json"
    m = json.loads(m_path.read_text())
    recalls = {1: 0.05, 2: 0.3, 4: 0.5}
    for row in m["rows"]:
        row |= {"recall": recalls[row["steps"]], "coverage": 0.4, "intra_fid": 12.0}
    m_path.write_text(json.dumps(m))
    write_tables(folder)
    md = (folder / "table.md").read_text()
    exp = table_line(md, "L_adv + λ·L_distill,exp")
    assert "0.050 (n=1)" in exp and "0.400 (n=1)" in exp  # seed 0 measured, seed 1 not: one seed counts
    assert "collapsed" in exp and 0.05 < tables.COLLAPSE_RECALL
    steps_md = (folder / "table_steps.md").read_text()
    assert "recall @4" in steps_md and "intra-FID @2" in steps_md and "12.00 (n=1)" in steps_md
    csv = pd.read_csv(folder / "table.csv")
    assert csv.loc[csv["name"] == "exp", "collapsed"].item() == True  # noqa: E712
    # a finished cell without the metrics (evaluated before them): not measured, never "pending"
    m["rows"] = [{k: v for k, v in r.items() if k not in ("recall", "coverage", "intra_fid")} for r in m["rows"]]
    m_path.write_text(json.dumps(m))
    write_tables(folder)
    exp = table_line((folder / "table.md").read_text(), "L_adv + λ·L_distill,exp")
    assert exp.count("n/m") == 3  # recall, coverage, collapse flag
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cells"][0]["steps"]["1"]["recall"]["n"] == 0


def test_cluster_tables_leave_out_the_embedded_diversity_columns(tmp_path):
    """A CLIP-score sweep (cluster scale) has no recall, coverage or intra-FID: no n/m columns for them."""
    folder = make_fake_sweep(tmp_path / "sweep", alignment_key="clip_score") / "loss_weighting"
    write_tables(folder)
    for name in ("table.md", "table_steps.md"):
        text = (folder / name).read_text()
        assert "CLIP score" in text and "recall" not in table_line(text, "setting") and "n/m" not in text

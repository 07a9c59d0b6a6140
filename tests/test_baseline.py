"""The teacher baseline command: rows cached per setting, the table covers every teacher measured so far."""

import json
import shutil

import pandas as pd
import pytest
import torch

from add_bench import baseline, metrics
from add_bench.config import EvalConfig, load


def eval_cfg(assets):
    return load(
        EvalConfig,
        overrides=[
            f"evalnet={assets['evalnet']}",
            f"evalnet_ssl={assets['evalnet_ssl']}",
            f"data.root={assets['data']}",
            "data.val_size=50",
            "data.download=false",
            "num_samples=60",
            "batch_size=30",
        ],
    )


def test_table_keeps_every_teacher_measured_so_far(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    cfg, out = eval_cfg(tiny_assets), tmp_path / "teacher"
    a = tiny_assets["teacher"]
    b = str(shutil.copytree(a, tmp_path / "teacher_b"))
    first = baseline.run([a], out, cfg, steps=(1, 2), cfg_search_samples=10)
    assert len(first) == 1 + 2 * 2  # floor + (no CFG, best CFG) × 2 step counts
    baseline.run([b], out, cfg, steps=(1,), cfg_search_samples=10)  # a later run for another teacher only
    table = pd.read_csv(out / "table.csv")
    assert table["model"].value_counts().to_dict() == {"real data (train split)": 1, a: 4, b: 2}
    assert table["steps"].iloc[0] == 0  # the floor row first
    assert (table["threads"] == torch.get_num_threads()).all()  # each row's timing says on how many threads
    md = (out / "table.md").read_text()
    assert a in md and b in md
    assert len(list((out / "rows").glob("*.json"))) == 1 + 4 + 2 + 2  # rows + 2 CFG searches, all under out/rows
    assert sorted(p.name for p in (tmp_path / "teacher_b").iterdir()) == ["card.json", "scheduler", "unet"]
    # a re-run finds every row stored and recomputes nothing: the same numbers
    again = baseline.run([a], out, cfg, steps=(1, 2), cfg_search_samples=10)
    assert [r["fid"] for r in again] == [r["fid"] for r in first]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["wall_time_s"] >= 0  # this run's time, beside the stored rows' own
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json") if "cfg_search" not in p.name]
    assert prov["rows_wall_time_s"] == pytest.approx(sum(r["provenance"]["wall_time_s"] for r in rows), abs=0.06)
    assert prov["rows_wall_time_s"] > 0


def test_next_scale_brackets_the_best_cfg_scale():
    assert baseline.next_scale({"1.5": 1.0, "2.0": 2.0, "3.0": 3.0}) == 1.25  # best on the low edge: halfway to 1
    assert baseline.next_scale({"1.25": 0.5, "1.5": 1.0, "2.0": 2.0}) == 1.125
    assert baseline.next_scale({"1.125": 0.4, "1.25": 0.5, "1.5": 1.0}) is None  # no lower than 1.125
    assert baseline.next_scale({"1.5": 3.0, "2.0": 2.0, "3.0": 1.0}) == 4.0  # best on the high edge: one more
    assert baseline.next_scale({"5.0": 2.0, "6.0": 1.0}) is None  # no higher than 6
    assert baseline.next_scale({"1.5": 2.0, "2.0": 1.0, "3.0": 3.0}) is None  # inside the grid: done


def test_a_stored_search_whose_best_lies_on_the_edge_is_extended(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    cfg, a = eval_cfg(tiny_assets), tiny_assets["teacher"]
    path = tmp_path / "search.json"
    earlier = {"wall_time_s": 5.0, "git_commit": "0" * 40}
    path.write_text(
        json.dumps(
            {
                "teacher": a,
                "steps": 50,
                "num_samples": 10,
                "seed": cfg.seed + 1,
                "val_fid": {"1.5": 0.0, "2.0": 1.0, "3.0": 2.0},
                "best_cfg_scale": 1.5,
                "provenance": earlier,
            }
        )
    )
    search = baseline.stored_cfg_search(path, a, cfg, 10)
    # only 1.25 is measured (1.5's FID of 0 cannot be beaten, and 1.5 is then inside the grid)
    assert list(search["val_fid"]) == ["1.5", "2.0", "3.0", "1.25"]
    assert search["val_fid"]["1.5"] == 0.0 and search["val_fid"]["1.25"] > 0
    assert search["best_cfg_scale"] == 1.5
    assert search["provenance"]["extends"] == earlier and search["provenance"]["wall_time_s"] > 5.0
    assert json.loads(path.read_text()) == search
    assert baseline.stored_cfg_search(path, a, cfg, 10) == search  # inside the grid now: read, not recomputed
    fresh = baseline.stored_cfg_search(path, a, cfg, 12)  # other sample counts: searched anew
    assert set(fresh["val_fid"]) >= {"1.5", "2.0", "3.0"} and "extends" not in fresh["provenance"]


def test_an_interrupted_cfg_search_goes_on_from_its_measured_scales(tiny_assets, tmp_path, monkeypatch):
    """Each measured scale is written beside the search (``.partial``, never read as a row); a search
    interrupted after one scale measures only the others when re-run, and its wall time includes the first."""
    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "stats")
    cfg, a = eval_cfg(tiny_assets), tiny_assets["teacher"]
    path = tmp_path / "rows" / "t_cfg_search.json"
    path.parent.mkdir()
    partial = path.with_name(path.name + ".partial")
    real_generate, calls = baseline.generate, []

    def interrupted_after_one(*args):
        calls.append(args[-1])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_generate(*args)

    monkeypatch.setattr(baseline, "generate", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        baseline.stored_cfg_search(path, a, cfg, 10)
    first = json.loads(partial.read_text())
    assert list(first["val_fid"]) == ["1.5"] and first["wall_time_s"] > 0 and not path.exists()
    assert baseline.stored_rows(path.parent) == []  # the partial search is not a table row

    calls.clear()
    monkeypatch.setattr(baseline, "generate", lambda *args: calls.append(args[-1]) or real_generate(*args))
    search = baseline.stored_cfg_search(path, a, cfg, 10)
    assert 1.5 not in calls and calls[:2] == [2.0, 3.0]  # only the scales the interrupted search had not measured
    assert search["val_fid"]["1.5"] == first["val_fid"]["1.5"] and set(search["val_fid"]) >= {"1.5", "2.0", "3.0"}
    assert search["provenance"]["wall_time_s"] > first["wall_time_s"]
    assert not partial.exists() and json.loads(path.read_text()) == search

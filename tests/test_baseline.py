"""The teacher baseline command: rows cached per setting, the table covers every teacher measured so far."""
import json
import shutil

import pandas as pd
import pytest
import torch

from add_bench import baseline, metrics
from add_bench.config import EvalConfig, load


def eval_cfg(assets):
    return load(EvalConfig, overrides=[f"evalnet={assets['evalnet']}", f"data.root={assets['data']}",
                                       "data.val_size=50", "data.download=false", "num_samples=20", "batch_size=10"])


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
    assert sorted(p.name for p in (tmp_path / "teacher_b").iterdir()) == ["card.json", "model.safetensors"]
    # a re-run finds every row stored and recomputes nothing: the same numbers
    again = baseline.run([a], out, cfg, steps=(1, 2), cfg_search_samples=10)
    assert [r["fid"] for r in again] == [r["fid"] for r in first]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["wall_time_s"] >= 0  # this run's time, beside the stored rows' own
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json") if "cfg_search" not in p.name]
    assert prov["rows_wall_time_s"] == pytest.approx(sum(r["provenance"]["wall_time_s"] for r in rows), abs=0.06)
    assert prov["rows_wall_time_s"] > 0

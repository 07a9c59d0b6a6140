"""python -m add_bench.curve: one run per seed evaluated at several lengths equals separate cells of those lengths."""

import json

import pandas as pd
import pytest
import torch
from test_train import cfg_for

from add_bench import curve
from add_bench.errors import ConfigError
from add_bench.networks.unets import weights_file
from add_bench.train import train


def test_a_curve_point_is_the_cell_of_that_length(tiny_assets, tmp_path):
    cfg = cfg_for(tiny_assets)
    df = curve.run_curve(cfg, [2, 4], [0], tmp_path / "out", tmp_path / "work")
    assert sorted(set(df["length"])) == [2, 4] and set(df["steps"]) == {1, 2, 4}
    assert df["fid"].notna().all() and df["recall"].notna().all()
    # the student at 4 steps of the curve (2, exported and evaluated, then resumed) = a fresh 4-step cell
    fresh = train(cfg_for(tiny_assets, steps=4), tmp_path / "fresh")
    from safetensors.torch import load_file

    (curve_student,) = (tmp_path / "work").glob("*/seed0/student")
    a, b = load_file(weights_file(curve_student)), load_file(weights_file(fresh))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a re-run finds every row and trains nothing; another config in the same folder is refused
    rows = sorted(p.name for p in (tmp_path / "out" / "rows").glob("*.json"))
    assert rows == ["seed0_2steps.json", "seed0_4steps.json"]
    assert curve.run_curve(cfg, [2, 4], [0], tmp_path / "out", tmp_path / "work").equals(df)
    # how a seed is run (threads, log interval) is not what the curve computes: the same folder accepts it
    rerun = cfg_for(tiny_assets, threads=1, log_every=3)
    assert curve.check_same_curve(rerun, tmp_path / "out") == curve.check_same_curve(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match="differs in loss"):
        curve.run_curve(
            cfg_for(tiny_assets, **{"loss.lambda_distill": 1.0}), [2], [0], tmp_path / "out", tmp_path / "w"
        )
    curve.write_outputs(df, tmp_path / "out", cfg, [0], 1.0)
    assert json.loads((tmp_path / "out" / "curve.json").read_text())["knee"] is None  # one seed: no interval
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0


def test_a_length_dependent_schedule_is_refused(tiny_assets, tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule"):
        curve.run_curve(cfg_for(tiny_assets, **{"optim.lr_schedule": "cosine"}), [2], [0], tmp_path, tmp_path)


def test_knee_is_the_shortest_length_within_the_best_ones_interval():
    rows = [  # length, fid mean, ci, recall mean, ci
        (300, 30.0, 1.0, 0.10, 0.02),
        (600, 12.0, 1.0, 0.40, 0.05),
        (900, 10.5, 0.5, 0.45, 0.05),
        (1800, 10.0, 1.0, 0.47, 0.05),
        (2400, 10.2, 1.0, 0.30, 0.05),
    ]
    summary = pd.DataFrame(
        [
            {"steps": 1, "length": n, "n": 3, "fid_mean": f, "fid_ci95": fc, "recall_mean": r, "recall_ci95": rc}
            for n, f, fc, r, rc in rows
        ]
    )
    assert curve.knee(summary) == 900  # 600's FID is outside 10.0 + 1.0; 900 is within, and its recall too
    assert curve.knee(summary, steps=4) is None
    assert curve.knee(summary.assign(n=[3, 3, 1, 3, 3])) is None  # a length with one seed has no interval


def test_a_curve_made_before_a_field_was_added_is_continued_and_another_value_is_refused(tiny_assets, tmp_path):
    """A stored curve config without a field added to the schema later (config.added) is the same curve as
    the current config with that field at the value it reproduces; any other value is another curve."""
    cfg = cfg_for(tiny_assets)
    name = curve.check_same_curve(cfg, tmp_path / "new")
    old = curve.curve_config(cfg)
    del old["precision"], old["micro_batch_size"]  # both added in schema 8
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old, default=str))
    assert curve.check_same_curve(cfg, tmp_path / "old") == name  # the same training work folder
    cfg.precision = "bf16"
    with pytest.raises(ConfigError, match=r"another config \(differs in precision\)"):
        curve.check_same_curve(cfg, tmp_path / "old")

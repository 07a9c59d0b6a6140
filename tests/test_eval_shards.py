"""Evaluation resumable by shard (evaluate --shards, a sweep cell's eval_shards/): an evaluation interrupted
after its first shard resumes without sampling that shard again, and scores what an uninterrupted one does."""

from __future__ import annotations

import json

import pytest

from add_bench import evaluate as evaluate_mod
from add_bench.config import EvalConfig, load
from add_bench.errors import ConfigError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    from add_bench import metrics

    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "cache" / "fid_stats")


def interrupt_after_first_shard(monkeypatch) -> None:
    """The process is 'killed' right after the first shard is on disk."""
    save = evaluate_mod.Shards.save

    def save_then_die(self, k, *args):
        save(self, k, *args)
        raise KeyboardInterrupt(f"killed after shard {k}")

    monkeypatch.setattr(evaluate_mod.Shards, "save", save_then_die)


def count_saves(monkeypatch) -> list:
    saved: list = []
    save = evaluate_mod.Shards.save

    def counted(self, k, *args):
        saved.append((self.folder.name, k))
        save(self, k, *args)

    monkeypatch.setattr(evaluate_mod.Shards, "save", counted)
    return saved


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "sec_per_1000"} for r in rows]


def test_an_interrupted_evaluation_resumes_from_its_shards(tiny_assets, tmp_path, monkeypatch, cache):
    overrides = [
        "num_samples=60",
        "batch_size=20",  # 3 shards
        f"evalnet={tiny_assets['evalnet']}",
        f"evalnet_ssl={tiny_assets['evalnet_ssl']}",
        f"data.root={tiny_assets['data']}",
        "data.download=false",
    ]
    cfg = load(EvalConfig, overrides=overrides)
    teacher = tiny_assets["teacher"]
    # the ADD sampler re-noises between steps from the sampling generator: its state is part of a shard
    plain = evaluate_mod.evaluate(teacher, [2], cfg, "add", device="cpu")

    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            evaluate_mod.evaluate(teacher, [2], cfg, "add", device="cpu", shards=tmp_path / "shards")
    folder = tmp_path / "shards" / "add_2steps_cfg1"
    first = folder / "shard_00000.npz"
    assert sorted(p.name for p in folder.iterdir()) == ["shard_00000.npz", "spec.json"]
    written = first.stat().st_mtime_ns

    saved = count_saves(monkeypatch)
    resumed = evaluate_mod.evaluate(teacher, [2], cfg, "add", device="cpu", shards=tmp_path / "shards")
    assert saved == [("add_2steps_cfg1", 1), ("add_2steps_cfg1", 2)]  # the finished shard is not sampled again
    assert first.stat().st_mtime_ns == written
    assert without_timing(resumed["rows"]) == without_timing(plain["rows"])  # the samples of a run without shards

    saved.clear()  # all finished: nothing is sampled, the same scores
    again = evaluate_mod.evaluate(teacher, [2], cfg, "add", device="cpu", shards=tmp_path / "shards")
    assert saved == [] and without_timing(again["rows"]) == without_timing(plain["rows"])

    other = load(EvalConfig, overrides=overrides + ["batch_size=30"])
    with pytest.raises(ConfigError, match=r"add_2steps_cfg1: shards made with batch_size=20, now 30; accepted: the sa"):
        evaluate_mod.evaluate(teacher, [2], other, "add", device="cpu", shards=tmp_path / "shards")


def test_a_sweep_cell_killed_during_evaluation_resumes_it_without_retraining(tiny_assets, tmp_path, monkeypatch, cache):
    from test_sweep import ablation_file, tiny_preset

    from add_bench import sweep
    from add_bench import train as train_mod

    preset = tiny_preset(tiny_assets, tmp_path)  # eval: 60 samples in batches of 30, at 1 and 2 steps: 4 shards
    abl = ablation_file(tmp_path, preset, cells=[{"name": "exp", "default": True}])
    (cell,) = sweep.load_ablations(abl)[0].cells
    assert sweep.main([str(abl), "--out", str(tmp_path / "whole"), "--workers", "1"]) == 0
    whole = json.loads((tmp_path / "whole" / "cells" / cell.id / "metrics.json").read_text())

    out = tmp_path / "out"
    wd = out / "cells" / cell.id
    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            sweep.main([str(abl), "--out", str(out), "--workers", "1"])
    assert sweep.cell_status(wd) == "trained"  # trained (trained.json), not evaluated
    (first,) = wd.glob("eval_shards/*_1steps_*/shard_00000.npz")
    log = (wd / "log.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("the cell trained again")

    monkeypatch.setattr(train_mod, "add_step", no_training)
    saved = count_saves(monkeypatch)
    assert sweep.main([str(abl), "--out", str(out), "--workers", "1"]) == 0
    assert sweep.cell_status(wd) == "done" and (wd / "log.jsonl").read_text() == log
    assert sorted(saved) == [(first.parent.name, 1), (first.parent.name.replace("_1steps", "_2steps"), 0)] + [
        (first.parent.name.replace("_1steps", "_2steps"), 1)
    ]
    assert not (wd / "eval_shards").exists()  # removed once metrics.json is written (only a resume reads them)
    metrics = json.loads((wd / "metrics.json").read_text())
    assert without_timing(metrics["rows"]) == without_timing(whole["rows"])

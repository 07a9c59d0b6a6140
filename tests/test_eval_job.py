"""A cell in two phases (sweep.train_cell, sweep.evaluate_cell) and evaluation as its own SLURM job
(slurm.eval_job): the phases equal the inline cell and resume each on its own; the sweep submits a training
array and an evaluation array that waits for it, with the flags checked through a fake sbatch.
tests/test_slurm.py runs the two arrays on the real local cluster."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import yaml
from test_eval_shards import count_saves, interrupt_after_first_shard, without_timing
from test_sweep import ablation_file, tiny_preset

from add_bench import sweep
from add_bench import train as train_mod
from add_bench.errors import ConfigError, DataError
from add_bench.launchers import EVAL_JOBS_FILE, JOBS_FILE, SlurmConfig, dependency, eval_request, slurm_request

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    from add_bench import metrics

    monkeypatch.setattr(metrics, "STATS_CACHE", tmp_path / "cache" / "fid_stats")


def no_training(*args, **kwargs):
    raise AssertionError("the cell trained again")


def comparable(metrics: dict) -> dict:
    """metrics.json without what differs between two runs of one cell: timings, dates, machine, folders."""
    rows = without_timing(metrics["rows"])
    last = {k: v for k, v in metrics["train"]["last_log"].items() if "time" not in k}
    return {
        "rows": rows,
        "keys": list(metrics),
        "kind": metrics["kind"],
        "num_samples": metrics["num_samples"],
        "cell": metrics["cell"],
        "method": metrics["method"],
        "train": (metrics["train"]["steps"], last),
        "inputs": metrics["inputs"],
        "config": metrics["provenance"]["config"],
    }


def test_train_then_evaluate_equals_the_inline_cell_and_each_phase_resumes(tiny_assets, tmp_path, monkeypatch, cache):
    preset = tiny_preset(tiny_assets, tmp_path)  # eval: 60 samples in batches of 30 at 1 and 2 steps: 4 shards
    abl = ablation_file(tmp_path, preset, cells=[{"name": "exp", "default": True}])
    ablations = sweep.load_ablations(abl)
    (cell,) = ablations[0].cells
    assert sweep.main([str(abl), "--out", str(tmp_path / "inline"), "--workers", "1"]) == 0
    inline = tmp_path / "inline" / "cells" / cell.id

    out = tmp_path / "phases"
    sweep.prepare(ablations, out)
    wd = out / "cells" / cell.id
    record = sweep.train_cell(cell.id, str(wd))
    assert sweep.cell_status(wd) == "trained" and not (wd / "metrics.json").exists()
    assert json.loads((wd / sweep.TRAINED).read_text()) == record
    assert record["checkpoints"] == {"1": str(wd / "student"), "2": str(wd / "student")}
    assert (record["sampler"], record["train_steps"]) == ("add", 3)
    written = (wd / sweep.TRAINED).read_text()

    monkeypatch.setattr(train_mod, "add_step", no_training)  # from here on nothing trains
    assert sweep.train_cell(cell.id, str(wd)) == record  # a trained cell: its record, nothing run
    assert (wd / sweep.TRAINED).read_text() == written

    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            sweep.evaluate_cell(cell.id, str(wd))
    assert sweep.cell_status(wd) == "trained"
    saved = count_saves(monkeypatch)
    metrics = sweep.evaluate_cell(cell.id, str(wd))  # resumes from the first shard
    assert sorted(saved) == [("add_1steps_cfg1", 1), ("add_2steps_cfg1", 0), ("add_2steps_cfg1", 1)]
    assert sweep.cell_status(wd) == "done" and not (wd / "eval_shards").exists()
    assert json.loads((wd / "metrics.json").read_text()) == metrics

    reference = json.loads((inline / "metrics.json").read_text())
    assert comparable(metrics) == comparable(reference)
    assert metrics["checkpoint"] == str(wd / "student") and reference["checkpoint"] == str(inline / "student")
    with np.load(wd / "samples.npz") as a, np.load(inline / "samples.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["labels", "steps_1", "steps_2"]
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    inline_record = json.loads((inline / sweep.TRAINED).read_text())  # the inline cell wrote the same record
    assert {k: v for k, v in inline_record.items() if k not in ("checkpoints", "wall_time_s", "train_wall_time_s")} == {
        k: v for k, v in record.items() if k not in ("checkpoints", "wall_time_s", "train_wall_time_s")
    }

    before = (wd / "metrics.json").stat().st_mtime_ns
    saved.clear()
    assert sweep.train_cell(cell.id, str(wd)) == metrics == sweep.evaluate_cell(cell.id, str(wd))  # done: skipped
    assert saved == [] and (wd / "metrics.json").stat().st_mtime_ns == before


def test_evaluating_a_cell_that_is_not_trained_is_recorded_as_its_error(tiny_assets, tmp_path, cache):
    preset = tiny_preset(tiny_assets, tmp_path)
    ablations = sweep.load_ablations(ablation_file(tmp_path, preset, cells=[{"name": "exp", "default": True}]))
    sweep.prepare(ablations, tmp_path / "out")
    (cell,) = ablations[0].cells
    wd = tmp_path / "out" / "cells" / cell.id
    with pytest.raises(DataError, match=r"trained.json: not found; the cell is not trained \(its training phase"):
        sweep.evaluate_cell(cell.id, str(wd))
    assert sweep.cell_status(wd) == "failed"
    assert "trained.json: not found" in json.loads((wd / "error.json").read_text())["error"]


def test_the_evaluation_request_and_its_config_errors(tmp_path):
    cfg = slurm_request(
        {"gpus_per_node": 4, "tasks_per_node": 4, "timeout_min": 240, "additional_parameters": {"qos": "low"}},
        ["eval_job=true", "eval.timeout_min=30", "eval.mem_gb=16", "eval.additional_parameters.comment=eval"],
    )
    assert cfg.eval_job is True and cfg.eval == {
        "timeout_min": 30,
        "mem_gb": 16,
        "additional_parameters": {"comment": "eval"},
    }
    request = eval_request(cfg)
    assert (request.timeout_min, request.mem_gb, request.gpus_per_node) == (30, 16, 1)  # one GPU of training's 4
    assert (request.nodes, request.tasks_per_node, request.partition) == (1, 1, "debug")
    assert request.additional_parameters == {"qos": "low", "comment": "eval"}
    assert eval_request(SlurmConfig(cpus_per_task=3)).gpus_per_node == 0  # a CPU request stays one
    for overrides, message in [
        (["eval_job=maybe"], r"eval_job"),
        (["eval.nodes=2"], r"slurm.eval.nodes=2: evaluation runs as one process; accepted: 1 \(or leave it out\)"),
        (["eval.gpus=1"], r"slurm.eval.gpus: unknown key; accepted: partition, timeout_min, cpus_per_task, gpus_per"),
        (["eval.timeout_min=0"], r"slurm.eval.timeout_min=0: must be a positive integer"),
        (["eval.additional_parameters.dependency=afterok:1"], r"writes --dependency of the evaluation array itself"),
        (["eval.additional_parameters.time=5"], r"slurm.eval.additional_parameters.time: .*set slurm.timeout_min"),
    ]:
        with pytest.raises(ConfigError, match=message):
            slurm_request({}, overrides)
    (tmp_path / "launch").mkdir()
    (tmp_path / "p.yaml").write_text("steps: 3\n")
    (tmp_path / "launch" / "p.yaml").write_text("slurm: {eval_job: true, eval: {tasks_per_node: 2}}")
    with pytest.raises(ConfigError, match=r"launch/p.yaml: slurm.eval.tasks_per_node=2: evaluation runs as one pro"):
        sweep.launch_profile(tmp_path / "p.yaml")
    assert dependency(["7_0", "7_1", "7_2"]) == "aftercorr:7" and dependency(["8"]) == "afterok:8"
    with pytest.raises(ValueError, match=r"expected the job ids of one array"):
        dependency(["7_0", "9_1"])


def fake_sbatch(folder: Path, monkeypatch, refuse: str = "") -> Path:
    """``sbatch`` (keeps each script, answers job ids 100, 101, ...; exits 1 for a script holding ``refuse``),
    ``scancel`` (appends its arguments to scancel.txt) and ``srun`` on PATH."""
    bin_dir, scripts = folder / "bin", folder / "sbatch_scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    refusal = f'if [ -n "{refuse}" ] && grep -q -- "{refuse}" "$1"; then echo "refused" >&2; exit 1; fi\n'
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\n{refusal}n=$(cat {folder}/next 2>/dev/null || echo 100)\necho $((n + 1)) > {folder}/next\n"
        f'cp "$1" {scripts}/$n.sh\necho "Submitted batch job $n"\n'
    )
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {folder}/scancel.txt\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "scancel", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def submitted_job(cells: Path, job_id: str):
    """The CellJob submitit pickled for ``job_id``."""
    return cloudpickle.loads((cells / "slurm_logs" / job_id / f"{job_id}_submitted.pkl").read_bytes()).function


def test_the_sweep_submits_an_evaluation_array_after_the_training_array(tiny_assets, tmp_path, monkeypatch, capsys):
    """slurm.eval_job: a training array of train_cell, then an evaluation array of evaluate_cell asking for
    slurm.eval's request, task i after training task i (aftercorr), cancelled when that fails; both arrays'
    ids recorded; --status shows a trained cell whose evaluation runs as evaluating."""
    import add_bench.launchers as launchers

    scripts = fake_sbatch(tmp_path, monkeypatch)
    preset = tiny_preset(tiny_assets, tmp_path)
    (tmp_path / "launch").mkdir()
    profile = {
        "slurm": {"gpus_per_node": 2, "tasks_per_node": 2, "timeout_min": 30, "eval_job": True, "eval": {"mem_gb": 3}}
    }
    (tmp_path / "launch" / preset.name).write_text(yaml.safe_dump(profile))
    abl = ablation_file(
        tmp_path, preset, cells=[{"name": "a", "default": True}, {"name": "b", "set": {"loss.lambda_distill": 1.0}}]
    )
    a, b = (c.id for c in sweep.load_ablations(abl)[0].cells)
    out = tmp_path / "out"
    assert sweep.main([str(abl), "--out", str(out), "--launcher", "slurm", "--slurm", "eval.timeout_min=7"]) == 0
    assert "evaluation, each after its cell's training: 101_0, 101_1" in capsys.readouterr().err
    cells = out / "cells"
    assert json.loads((cells / JOBS_FILE).read_text()) == {a: "100_0", b: "100_1"}
    assert json.loads((cells / EVAL_JOBS_FILE).read_text()) == {a: "101_0", b: "101_1"}
    train, evaluation = ((scripts / f"{n}.sh").read_text() for n in (100, 101))
    for flag in ("--gpus-per-node=2", "--ntasks-per-node=2", "--time=30", "--job-name=add-bench"):
        assert f"#SBATCH {flag}\n" in train, (flag, train)
    assert "--dependency" not in train
    for flag in ("--gpus-per-node=1", "--ntasks-per-node=1", "--time=7", "--mem=3GB", "--job-name=add-bench-eval"):
        assert f"#SBATCH {flag}\n" in evaluation, (flag, evaluation)
    assert "#SBATCH --dependency=aftercorr:100\n" in evaluation and "#SBATCH --kill-on-invalid-dep=yes\n" in evaluation
    for job_id, fn, gpus, processes in (("100_1", sweep.train_cell, 2, 2), ("101_1", sweep.evaluate_cell, 1, 1)):
        job = submitted_job(cells, job_id)
        assert (job.fn, job.cell_id, job.gpus_per_node, job.processes) == (fn, b, gpus, processes)

    (cells / a / sweep.TRAINED).write_text("{}")  # a trained, its evaluation running; b still training
    states = {"100_0": "COMPLETED", "100_1": "RUNNING", "101_0": "RUNNING", "101_1": "PENDING"}
    monkeypatch.setattr(
        launchers, "_run", lambda cmd: "\n".join(f"{j}|{s}" for j, s in states.items()) if cmd[0] == "squeue" else None
    )
    assert sweep.main([str(abl), "--out", str(out), "--status"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["a"].endswith(f"{a}  evaluating  slurm: job 100_0 COMPLETED, evaluation 101_0 RUNNING"), lines
    assert lines["b"].endswith(f"{b}  new  slurm: job 100_1 RUNNING, evaluation 101_1 PENDING"), lines
    states["101_0"] = "PENDING"
    assert sweep.main([str(abl), "--out", str(out), "--status"]) == 0
    assert f"{a}  trained  slurm:" in capsys.readouterr().out  # trained, waiting for its evaluation

    (cells / a / sweep.TRAINED).unlink()
    assert sweep.main([str(abl), "--out", str(out), "--launcher", "slurm", "--slurm", "eval_job=false"]) == 0
    assert json.loads((cells / JOBS_FILE).read_text()) == {a: "102_0", b: "102_1"}
    assert json.loads((cells / EVAL_JOBS_FILE).read_text()) == {}  # the old evaluation jobs are forgotten
    assert submitted_job(cells, "102_0").fn is sweep.run_cell


def test_a_refused_evaluation_array_cancels_its_training_array(tiny_assets, tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, refuse="add-bench-eval")
    preset = tiny_preset(tiny_assets, tmp_path)
    abl = ablation_file(tmp_path, preset)
    argv = [str(abl), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--slurm", "eval_job=true"]
    argv += ["eval.partition=nosuch"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the submission of the default SLURM request with --slurm eval_job=true" in err, err
    assert (
        "(evaluation: slurm.eval) (slurm.partition='nosuch'" in err
        and "the training jobs 100_0, 100_1 were cancel" in err
    )
    assert (tmp_path / "scancel.txt").read_text().split() == ["100_0", "100_1"]

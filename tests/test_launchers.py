"""status_slurm without a cluster: sacct, squeue and the result files are faked (tests/test_slurm.py
runs the real thing)."""

import json
import pickle
import re
import sys
from pathlib import Path

import cloudpickle
import pytest

import add_bench.launchers as launchers
from add_bench.launchers import JOBS_FILE, LOGS_DIR, status_slurm

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # cell functions run in submitit's job processes

SACCT = """JobID|State
7_0|COMPLETED
7_0.batch|COMPLETED
7_1|CANCELLED by 1000
7_[2-3%4]|PENDING
"""


def fake_slurm(monkeypatch, sacct: str | None, squeue: str | None) -> None:
    """``_run`` answers sacct and squeue with the given outputs (None: the command is missing or fails)."""
    monkeypatch.setattr(launchers, "_run", lambda cmd: {"sacct": sacct, "squeue": squeue}[cmd[0]])


def sweep_folder(tmp_path, jobs: dict[str, str], results: dict[str, bytes]):
    (tmp_path / JOBS_FILE).write_text(json.dumps(jobs))
    for job_id, content in results.items():
        (tmp_path / LOGS_DIR / job_id).mkdir(parents=True)
        (tmp_path / LOGS_DIR / job_id / f"{job_id}_0_result.pkl").write_bytes(content)
    return tmp_path


def test_sacct_states_with_array_ranges_then_squeue(tmp_path, monkeypatch):
    fake_slurm(monkeypatch, SACCT, "8_0|RUNNING\n9_0|PENDING\n")
    ids = {"a": "7_0", "b": "7_1", "c": "7_2", "d": "7_3", "e": "8_0"}
    assert status_slurm(sweep_folder(tmp_path, ids, {})) == {
        "a": "COMPLETED",
        "b": "CANCELLED",
        "c": "PENDING",
        "d": "PENDING",
        "e": "RUNNING",
    }


@pytest.mark.parametrize(
    ("content", "state"),
    [
        (pickle.dumps(("success", {"ok": True})), "COMPLETED"),
        (pickle.dumps(("error", "Traceback: boom")), "FAILED"),
        (b"not a pickle", "UNKNOWN"),
    ],
)
def test_result_file_when_slurm_forgot_the_job(tmp_path, monkeypatch, content, state):
    fake_slurm(monkeypatch, None, "")
    folder = sweep_folder(tmp_path, {"cell": "5_1", "lost": "5_2"}, {"5_1": content})
    assert status_slurm(folder) == {"cell": state, "lost": "UNKNOWN"}


# ------------------------------------------------------------------------------ launch profiles
def test_slurm_overrides_take_any_sbatch_flag_and_name_what_they_refuse():
    from add_bench.errors import ConfigError
    from add_bench.launchers import slurm_request

    cfg = slurm_request(
        {"gpus_per_node": 4, "additional_parameters": {"qos": "low"}},
        [
            "additional_parameters.account=abc",
            "additional_parameters.qos=high",
            "additional_parameters.constraint=a100",
            "additional_parameters.exclusive=true",
            "mem_gb=128",
        ],
    )
    assert (cfg.gpus_per_node, cfg.mem_gb, cfg.partition) == (4, 128, "debug")  # profile, command line, default
    assert cfg.additional_parameters == {"qos": "high", "account": "abc", "constraint": "a100", "exclusive": True}
    with pytest.raises(ConfigError, match=r"--slurm: unknown config key 'account'; accepted keys: additional_param"):
        slurm_request({}, ["account=abc"])
    with pytest.raises(ConfigError, match=r"additional_parameters.<flag>=<value> \(e.g. additional_parameters.acc"):
        slurm_request({}, ["constraint=a100"])
    with pytest.raises(
        ConfigError, match=r"additional_parameters.mem: the launcher writes --mem itself \(set slurm.mem_gb"
    ):
        slurm_request({}, ["additional_parameters.mem=8G"])
    with pytest.raises(ConfigError, match=r"additional_parameters.partition: the launcher writes --partition itself"):
        slurm_request({}, ["additional_parameters.partition=gpu"])
    assert slurm_request({"mem_gb": 64}, ["~mem_gb"]).mem_gb == 4  # back to SlurmConfig's default


def fake_slurm_commands(folder, monkeypatch):
    """``sbatch`` (copies the script it is given, answers a job id) and ``srun`` on PATH: what submitit asks
    sbatch for, without a cluster."""
    import os
    import stat

    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = folder / "sbatch_scripts"
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/$(date +%s%N).sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_a_presets_launch_profile_reaches_sbatch_under_the_command_line(tiny_assets, tmp_path, monkeypatch):
    """SlurmConfig defaults < the preset's launch profile < --slurm: the flags submitit writes for the array."""
    import yaml
    from test_sweep import ablation_file, tiny_preset

    from add_bench import sweep

    scripts = fake_slurm_commands(tmp_path, monkeypatch)
    preset = tiny_preset(tiny_assets, tmp_path)
    (tmp_path / "launch").mkdir()
    profile = {"slurm": {"gpus_per_node": 2, "timeout_min": 30, "mem_gb": 3, "additional_parameters": {"qos": "low"}}}
    (tmp_path / "launch" / preset.name).write_text(yaml.safe_dump(profile))
    abl = ablation_file(tmp_path, preset)
    argv = [str(abl), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--slurm", "mem_gb=5"]
    argv += ["additional_parameters.account=abc", "additional_parameters.exclusive=true"]
    assert sweep.main(argv) == 0
    (script,) = [p.read_text() for p in scripts.iterdir()]
    flags = {line.split("=")[0]: line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert flags["#SBATCH --gpus-per-node"] == "#SBATCH --gpus-per-node=2"  # the profile
    assert flags["#SBATCH --time"] == "#SBATCH --time=30"  # the profile
    assert flags["#SBATCH --mem"] == "#SBATCH --mem=5GB"  # the command line over the profile
    assert flags["#SBATCH --cpus-per-task"] == "#SBATCH --cpus-per-task=2"  # SlurmConfig's default
    assert flags["#SBATCH --partition"] == "#SBATCH --partition=debug"
    assert flags["#SBATCH --qos"] == "#SBATCH --qos=low" and flags["#SBATCH --account"] == "#SBATCH --account=abc"
    assert "#SBATCH --exclusive" in flags and flags["#SBATCH --array"] == "#SBATCH --array=0-1%2"
    jobs = json.loads((tmp_path / "out" / "cells" / JOBS_FILE).read_text())
    assert sorted(jobs.values()) == ["4242_0", "4242_1"]


def test_device_auto_in_a_cell_that_asked_for_gpus_is_an_error_without_one(tmp_path, monkeypatch):
    import torch

    from add_bench.distributed import EXPECT_GPU_ENV, resolve_device
    from add_bench.errors import ConfigError
    from add_bench.launchers import CellJob

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node whose GPU torch does not see
    monkeypatch.setenv(EXPECT_GPU_ENV, "")  # restored (unset) after the test; CellJob sets it in this process
    assert resolve_device("auto") == torch.device("cpu")  # a cell that asked for no GPU: the CPU, as before
    job = CellJob(lambda cell, wd: {"device": str(resolve_device("auto"))}, "c", str(tmp_path / "c"), 0, "profile x")
    assert job() == {"device": "cpu"}
    job = CellJob(lambda cell, wd: {"device": str(resolve_device("auto"))}, "c", str(tmp_path / "c"), 1, "profile x")
    with pytest.raises(ConfigError, match=r"device='auto': profile x asks for gpus_per_node=1, but no CUDA device"):
        job()
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU on purpose stays possible


def training_cell(cell_id: str, workdir: str) -> dict:
    """Train the config in ``workdir`` (each run appends its process id to ``pids``)."""
    import os

    from add_bench import train
    from add_bench.config import TrainConfig, load

    with open(Path(workdir) / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    student = train.train(load(TrainConfig, Path(workdir) / "config.yaml"), Path(workdir), progress=False)
    return {"student": str(student)}


def test_a_cell_job_saves_its_step_on_the_requeue_signal_and_resumes_exactly(tiny_assets, tmp_path, monkeypatch):
    """A CellJob under submitit's own job environment (its local executor: the handlers of a SLURM job, the
    requeue a restart of the task) gets USR2 mid-training: the cell checkpoints the step it is at before
    submitit requeues it, the requeued run resumes there, and the weights equal an uninterrupted run's."""
    import os
    import signal
    import time

    import submitit
    import torch
    from conftest import tiny_train_overrides
    from omegaconf import OmegaConf

    from add_bench import checkpoint, train
    from add_bench.config import TrainConfig, load
    from add_bench.launchers import CellJob
    from add_bench.networks.unets import weights_file
    from add_bench.provenance import REPO_ROOT

    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    cfg = load(TrainConfig, overrides=tiny_train_overrides(tiny_assets, steps=24, ckpt_every=1000))
    wd, log = tmp_path / "cell", tmp_path / "cell" / "log.jsonl"
    wd.mkdir()
    (wd / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(CellJob(training_cell, "cell", str(wd)))
    deadline = time.time() + 300
    while not log.is_file() or len(log.read_text().splitlines()) < 3:
        assert time.time() < deadline and job.get_info()["jobState"] == "RUNNING", job.stderr()
        time.sleep(0.02)
    os.kill(int((wd / "pids").read_text().split()[0]), signal.SIGUSR2)
    result = job.result()
    err, out = job.stderr() or "", job.stdout() or ""
    saved = re.search(r"SIGUSR2 at step (\d+)/24: checkpoint saved", err)
    assert saved and int(saved.group(1)) >= 3, err
    assert err.index(saved.group(0)) < err.index("Caught signal SIGUSR2"), err  # saved, then submitit's handler
    assert "Requeued job" in out and f"resuming {wd} at step {saved.group(1)}\n" in err, (out, err)
    assert len((wd / "pids").read_text().split()) == 2  # one requeue
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == list(range(1, 25))
    full = train.train(cfg, tmp_path / "full", progress=False)
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(wd)
    for obj in ("student", "ema", "discriminator"):
        for k, v in a["objects"][obj].items():
            assert torch.equal(v, b["objects"][obj][k]), (obj, k)
    assert weights_file(full).read_bytes() == weights_file(Path(result["student"])).read_bytes()


def test_a_cell_of_several_tasks_asks_sbatch_for_them_and_srun_ends_them_together(tmp_path, monkeypatch):
    """slurm.nodes × slurm.tasks_per_node: the flags of the job, srun --kill-on-bad-exit, one task per GPU."""
    from add_bench.errors import ConfigError
    from add_bench.launchers import SlurmConfig, processes_per_cell, slurm_request, submit_slurm

    scripts = fake_slurm_commands(tmp_path, monkeypatch)
    cfg = slurm_request({"gpus_per_node": 4, "tasks_per_node": 4}, ["nodes=2"])
    assert processes_per_cell(cfg) == 8
    submit_slurm([("c", lambda cell, wd: {})], tmp_path / "out", cfg)
    (script,) = [p.read_text() for p in scripts.iterdir()]
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    with pytest.raises(
        ConfigError, match=r"slurm.tasks_per_node=2 with slurm.gpus_per_node=1: a cell runs one process"
    ):
        SlurmConfig(gpus_per_node=1, tasks_per_node=2)
    with pytest.raises(ConfigError, match=r"slurm.nodes=0: must be a positive integer"):
        SlurmConfig(nodes=0)
    with pytest.raises(ConfigError, match=r"additional_parameters.ntasks_per_node: .* \(set slurm.tasks_per_node\)"):
        slurm_request({}, ["additional_parameters.ntasks_per_node=2"])

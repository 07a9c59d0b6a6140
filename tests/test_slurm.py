"""add_bench.launchers against a REAL single-node SLURM cluster on this machine, and run_local.

Run:  python -m pytest tests/test_slurm.py -x -q          (as root; about 2.5-5 minutes)
      python -m pytest tests -m "not slurm"                (everything except the cluster tests)

The module-scoped ``slurm_cluster`` fixture runs ``scripts/slurm_cluster.sh`` (idempotent: it starts
munged, slurmctld and slurmd when they are not running, installing slurm-wlm/munge with apt-get if
slurmctld is missing) and stops the cluster again afterwards only if it was not running before.
The SLURM tests are skipped, with the reason, when not root or when the cluster does not come up.

Cell functions are module-level and pickled *by value* (cloudpickle), because the array tasks run
``python -m submitit.core._submit`` where this test module is not importable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from add_bench.errors import ConfigError
from add_bench.launchers import (
    SbatchRefused,
    SlurmConfig,
    check_launcher,
    retry_transient,
    run_local,
    status_slurm,
    submit_slurm,
    thread_plan,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# ------------------------------------------------------------------------------ cell functions
def tiny_cell(cell_id: str, workdir: str) -> dict:
    """Sleeps a little (so the submit call can be seen not to wait), then writes result.json."""
    time.sleep(4)
    result = {
        "cell": cell_id,
        "square": len(cell_id) ** 2,
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "cpus": os.environ.get("SLURM_CPUS_PER_TASK"),
    }
    tmp = Path(workdir) / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, Path(workdir) / "result.json")
    return result


def resumable_cell(cell_id: str, workdir: str) -> dict:
    """First run: writes a checkpoint marker and then 'trains' for longer than the time limit.
    A later run finds the marker and finishes. Every run appends a line to runs.txt."""
    wd = Path(workdir)
    with open(wd / "runs.txt", "a") as f:
        f.write(
            json.dumps(
                {
                    "t": time.time(),
                    "job": os.environ.get("SLURM_JOB_ID"),
                    "restarts": os.environ.get("SLURM_RESTART_COUNT", "0"),
                }
            )
            + "\n"
        )
    runs = len((wd / "runs.txt").read_text().splitlines())
    if not (wd / "ckpt.json").exists():
        (wd / "ckpt.json").write_text(json.dumps({"step": 1}))
        for _ in range(400):  # ~200 s, much more than timeout_min=1
            time.sleep(0.5)
        return {"cell": cell_id, "resumed": False, "runs": runs}  # only if never interrupted
    result = {
        "cell": cell_id,
        "resumed": True,
        "runs": runs,
        "step": json.loads((wd / "ckpt.json").read_text())["step"],
    }
    (wd / "result.json").write_text(json.dumps(result))
    return result


def good_cell(cell_id: str, workdir: str) -> dict:
    import torch

    (Path(workdir) / "done").write_text("ok")
    return {
        "cell": cell_id,
        "ok": True,
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "bar_line": os.environ.get("TQDM_POSITION"),
    }


def bad_cell(cell_id: str, workdir: str) -> dict:
    raise ValueError(f"boom in {cell_id}")


# ------------------------------------------------------------------------------------- helpers
def _cluster(action: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


def _logs(folder: Path) -> str:
    """The tail of every submitit log under folder/slurm_logs, for assertion messages."""
    parts = []
    for p in sorted((folder / "slurm_logs").rglob("*_log.*")):
        parts.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)[-6000:]


def _wait_for(paths: list[Path], timeout_s: float, folder: Path) -> float:
    start = time.monotonic()
    while not all(p.exists() for p in paths):
        if time.monotonic() - start > timeout_s:
            states = status_slurm(folder)
            pytest.fail(
                f"not all of {[str(p) for p in paths]} within {timeout_s:.0f}s; states {states}\n" + _logs(folder)
            )
        time.sleep(1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start a cluster with scripts/slurm_cluster.sh, which needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurmctld is not installed and apt-get is not available to install slurm-wlm")
    was_running = _cluster("status", timeout=30).returncode == 0
    try:
        out = _cluster("start")
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/slurm_cluster.sh did not finish within 600 s (apt-get or daemons hung)")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the SLURM cluster did not come up: {last}")
    yield out.stdout.strip()
    if not was_running:
        _cluster("stop", timeout=60)


@pytest.fixture
def cancel_after():
    """Job ids appended here are scancel'ed at teardown (no 200 s sleeper is left behind on failure)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


# --------------------------------------------------------------------------------------- tests
@pytest.mark.slurm
def test_submit_array_returns_at_once_and_runs(slurm_cluster, tmp_path, cancel_after):
    folder = tmp_path / "sweep"
    cells = [(f"cell{i}", tiny_cell) for i in range(3)]
    cfg = SlurmConfig(timeout_min=5, cpus_per_task=1, mem_gb=0.25, array_parallelism=3)

    start = time.monotonic()
    ids = submit_slurm(cells, folder, cfg)
    took = time.monotonic() - start
    cancel_after.extend(ids)
    results = [folder / cid / "result.json" for cid, _ in cells]
    early = [p.exists() for p in results]
    states_at_return = status_slurm(folder)

    assert took < 10, f"submit_slurm took {took:.1f}s; it must not wait for the jobs"
    assert not all(early), "all cells had finished when submit_slurm returned: it waited for them"
    assert len(ids) == 3
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_{i}" for i in range(3)], f"not one job array: {ids}"
    assert json.loads((folder / "slurm_jobs.json").read_text()) == {f"cell{i}": ids[i] for i in range(3)}
    assert set(states_at_return) == {"cell0", "cell1", "cell2"}
    assert not all(s == "COMPLETED" for s in states_at_return.values()), states_at_return

    _wait_for(results, 120, folder)
    for i, p in enumerate(results):
        r = json.loads(p.read_text())
        assert r["cell"] == f"cell{i}" and r["square"] == 25
        assert r["array_task"] == str(i) and r["cpus"] == "1"
    deadline = time.monotonic() + 30  # the result file is written a moment before the task ends
    while (states := status_slurm(folder)) and set(states.values()) != {"COMPLETED"} and time.monotonic() < deadline:
        time.sleep(1)
    assert set(states.values()) == {"COMPLETED"}, states


@pytest.mark.slurm
def test_timeout_requeues_and_cell_resumes(slurm_cluster, tmp_path, cancel_after):
    """timeout_min=1 with USR2 20 s before the limit: submitit requeues, the second run resumes."""
    folder = tmp_path / "sweep"
    cfg = SlurmConfig(timeout_min=1, cpus_per_task=1, mem_gb=0.25, max_num_timeout=2, signal_delay_s=20)
    start = time.monotonic()
    ids = submit_slurm([("slow", resumable_cell)], folder, cfg)
    cancel_after.extend(ids)
    wd = folder / "slow"

    seen_states = set()
    deadline = start + 210
    while not (wd / "result.json").exists():
        if time.monotonic() > deadline:
            pytest.fail(
                f"no result after {time.monotonic() - start:.0f}s; states seen {seen_states}; runs:\n"
                + ((wd / "runs.txt").read_text() if (wd / "runs.txt").exists() else "none\n")
                + _logs(folder)
            )
        state = status_slurm(folder)["slow"]
        seen_states.add(state)
        if state in FINAL_STATES - {"COMPLETED"}:
            pytest.fail(f"job ended as {state} instead of being requeued\n" + _logs(folder))
        time.sleep(2)
    elapsed = time.monotonic() - start

    result = json.loads((wd / "result.json").read_text())
    runs = (wd / "runs.txt").read_text().splitlines()
    assert result["resumed"] is True and result["step"] == 1
    assert len(runs) >= 2, runs
    assert json.loads(runs[-1])["restarts"] != "0", runs  # SLURM_RESTART_COUNT: a requeue, not a new job
    log = _logs(folder)
    assert "Requeued job" in log or "requeue" in log.lower(), log
    print(f"\nrequeue test: result after {elapsed:.0f}s, {len(runs)} runs, states seen {sorted(seen_states)}")


def test_run_local_failing_cell_does_not_stop_others(tmp_path):
    cells = [("bad", bad_cell), ("good", good_cell)]
    results = run_local(cells, workers=2, folder=tmp_path)
    assert list(results) == ["bad", "good"]
    assert results["good"]["ok"] is True and (tmp_path / "good" / "done").read_text() == "ok"
    assert results["good"]["pid"] != os.getpid()  # ran in a worker process
    cores = len(os.sched_getaffinity(0))
    assert results["good"]["threads"] == max(1, cores // 2)
    assert results["bad"].startswith("error: ValueError: boom in bad"), results["bad"]

    seq = run_local(cells, workers=1, folder=tmp_path / "seq")
    assert seq["good"]["ok"] is True and seq["good"]["pid"] == os.getpid()
    assert seq["bad"] == "error: ValueError: boom in bad"


def paired_cell(cell_id: str, workdir: str) -> dict:
    """good_cell, once two cells have started (so that two workers run; the third cell waits for neither)."""
    Path(workdir, "started").touch()
    deadline = time.time() + 60
    while cell_id != "c" and len(list(Path(workdir).parent.glob("*/started"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    return good_cell(cell_id, workdir)


def test_thread_plan_gives_a_short_last_round_all_cores():
    assert thread_plan(3, 2, 2) == [1, 1, 2]  # 3 cells on 2 workers: the third runs alone
    assert thread_plan(4, 2, 2) == [1, 1, 1, 1]
    assert thread_plan(14, 2, 2) == [1] * 14
    assert thread_plan(5, 2, 8) == [4, 4, 4, 4, 8]
    assert thread_plan(7, 3, 12) == [4] * 6 + [12]
    assert thread_plan(8, 3, 12) == [4] * 6 + [6, 6]
    assert thread_plan(3, 4, 2) == [1, 1, 1]  # more workers than cores: never 0 threads
    assert thread_plan(0, 2, 2) == []


def test_run_local_workers_follow_the_thread_plan_on_their_own_bar_lines(tmp_path, monkeypatch):
    import add_bench.launchers as launchers

    monkeypatch.setattr(launchers, "usable_cores", lambda: 4)
    cells = [(c, paired_cell) for c in "abc"]
    results = run_local(cells, workers=2, folder=tmp_path)
    assert [results[c]["threads"] for c in "abc"] == [2, 2, 4]
    assert {results[c]["bar_line"] for c in "abc"} == {"1", "2"}  # line 0 is the parent's cells bar
    assert len({results[c]["pid"] for c in "abc"}) == 2


def test_workers_option():
    from add_bench.sweep import parse_workers

    assert parse_workers("auto") == len(os.sched_getaffinity(0))
    assert parse_workers("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match=rf"--workers '{re.escape(bad)}': must be a positive integer or 'auto'"):
            parse_workers(bad)


def sleepy_cell(cell_id: str, workdir: str) -> dict:
    (Path(workdir) / "pid").write_text(str(os.getpid()))
    time.sleep(120)
    return {"ok": True}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_local_workers_end_with_the_sweep_process(tmp_path):
    """A sweep killed with SIGKILL (no handler can run) leaves no worker training on, orphaned."""
    import signal

    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_slurm import sleepy_cell; "
        "from add_bench.launchers import run_local; "
        f"run_local([('a', sleepy_cell), ('b', sleepy_cell)], workers=2, folder={str(tmp_path)!r})"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not all((tmp_path / c / "pid").exists() for c in "ab"):
            assert time.time() < deadline and parent.poll() is None, "workers did not start"
            time.sleep(0.5)
        workers = [int((tmp_path / c / "pid").read_text()) for c in "ab"]
        assert all(_alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived the sweep process"
    finally:
        parent.kill()
        for c in "ab":
            if (tmp_path / c / "pid").exists():
                try:
                    os.kill(int((tmp_path / c / "pid").read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.slurm  # the check is on this test's own node id too (a -k selection may leave no other)
def test_the_cluster_tests_run_in_one_test_process(request):
    """Under ``--dist loadgroup`` every slurm-marked test carries the one group in its node id (xdist schedules
    a group on one process): tests split over processes would each start the cluster with their own module
    fixture, and the first to finish would stop it under the others' running jobs."""
    if not request.config.getvalue("loadgroup"):  # set in xdist's test processes under --dist loadgroup
        pytest.skip("not in a test process of --dist loadgroup")
    marked = [item.nodeid for item in request.session.items if item.get_closest_marker("slurm")]
    assert request.node.nodeid in marked and all(nodeid.endswith("@slurm") for nodeid in marked), marked


def test_a_submission_refused_for_an_unreachable_controller_is_tried_again(capsys):
    """sbatch's transient controller errors are retried after each wait; the answer of the first accepted
    submission is returned, and a refusal of the request itself (or a transient one after the last wait) is
    raised at once."""
    answers = [
        SbatchRefused(
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
        ),
        SbatchRefused("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"),
        ["12_0", "12_1"],
    ]
    waited = []

    def submit():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry_transient(submit, waits=(5, 15, 30), sleep=waited.append) == ["12_0", "12_1"]
    assert waited == [5, 15] and not answers
    assert "Unable to contact slurm controller; submitting again in 5 s" in capsys.readouterr().err

    def always(message):
        def submit():
            raise SbatchRefused(f"sbatch: error: Batch job submission failed: {message}")

        return submit

    waited.clear()
    with pytest.raises(SbatchRefused, match="Invalid partition"):
        retry_transient(always("Invalid partition name specified"), waits=(5,), sleep=waited.append)
    assert waited == []
    with pytest.raises(SbatchRefused, match="Unable to contact"):
        retry_transient(
            always("Unable to contact slurm controller (connect failure)"), waits=(5, 15), sleep=waited.append
        )
    assert waited == [5, 15]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"launcher='foo': unknown; accepted: local, slurm"):
        check_launcher("foo")
    with pytest.raises(ConfigError, match=r"slurm\.timeout_min=0"):
        SlurmConfig(timeout_min=0)
    with pytest.raises(ConfigError, match=r"signal_delay_s=90"):
        SlurmConfig(timeout_min=1, signal_delay_s=90)
    with pytest.raises(ConfigError, match=r"duplicate cell id"):
        run_local([("a", good_cell), ("a", good_cell)])


@pytest.mark.slurm
def test_sweep_on_slurm_with_a_cell_warned_before_its_time_limit(
    slurm_cluster, tiny_assets, tmp_path, cancel_after, monkeypatch
):
    """The real sweep command on the local cluster: one array, submission returns at once, --status works;
    the slow cell gets SLURM's pre-timeout signal (USR2, delivered with ``scancel --signal`` as slurmctld
    delivers it ``signal_delay_s`` before the limit: to the job's steps), saves a checkpoint, is requeued,
    resumes from that checkpoint and finishes. The request comes from the preset's launch profile
    (launch/<preset>.yaml) under the command line's --slurm, and the slow cell checkpoints only on the signal
    (its ckpt_every is beyond its steps), so the requeued run continues where the signal stopped the first.
    (A real time limit reached: ``test_timeout_requeues_and_cell_resumes``.)"""
    import yaml
    from test_sweep import tiny_preset

    from add_bench import sweep

    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    preset = tiny_preset(tiny_assets, tmp_path, **{"eval.num_samples": 60})
    slow_steps = 150  # the signal comes after its first few steps, whatever this machine's speed
    (tmp_path / "launch").mkdir()
    profile = {
        "slurm": {"timeout_min": 1, "signal_delay_s": 15, "cpus_per_task": 1, "mem_gb": 1, "max_num_timeout": 30}
    }
    (tmp_path / "launch" / preset.name).write_text(yaml.safe_dump(profile))
    abl = tmp_path / "mini.yaml"
    abl.write_text(
        yaml.safe_dump(
            {
                "name": "mini",
                "table": "1d",
                "base": str(preset),
                "seeds": [0],
                "eval_steps": [1],
                "cells": [
                    {"name": "fast", "default": True},
                    {"name": "slow", "set": {"steps": slow_steps, "ckpt_every": 10 * slow_steps, "log_every": 1}},
                ],
            }
        )
    )
    out = tmp_path / "out"
    start = time.monotonic()
    assert (
        sweep.main(
            [
                str(abl),
                "--out",
                str(out),
                "--launcher",
                "slurm",
                "--slurm",
                "timeout_min=2",  # over the profile's 1
                "additional_parameters.comment=add-bench-launch-profile",  # an sbatch flag without a field
            ]
        )
        == 0
    )
    assert time.monotonic() - start < 30  # returned with the job ids, did not wait for the cells
    jobs = json.loads((out / "cells" / "slurm_jobs.json").read_text())
    cancel_after.extend(jobs.values())
    assert len({j.split("_")[0] for j in jobs.values()}) == 1  # one job array
    cells = {c.name: c.id for c in sweep.load_ablations(abl)[0].cells}
    assert sweep.main([str(abl), "--out", str(out), "--status"]) == 0
    slow = out / "cells" / cells["slow"]
    deadline = time.monotonic() + 300
    while len((slow / "log.jsonl").read_text().splitlines() if (slow / "log.jsonl").exists() else []) < 3:
        if time.monotonic() > deadline or (slow / "error.json").exists():
            pytest.fail("the slow cell did not start training\n" + _logs(out / "cells"))
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", jobs[cells["slow"]]], check=True, capture_output=True)
    deadline = time.monotonic() + 600
    while not all(sweep.cell_status(out / "cells" / i) == "done" for i in cells.values()):
        if time.monotonic() > deadline or any((out / "cells" / i / "error.json").exists() for i in cells.values()):
            pytest.fail(
                "sweep cells did not finish: "
                + json.dumps({n: sweep.cell_status(out / "cells" / i) for n, i in cells.items()})
                + "\n"
                + _logs(out / "cells")
            )
        time.sleep(3)
    steps = [json.loads(l)["step"] for l in (slow / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, slow_steps + 1))  # resumed, nothing lost or repeated
    logs = "".join(p.read_text(errors="replace") for p in (out / "cells" / "slurm_logs").rglob("*_log.err"))
    assert "resuming" in logs  # the requeued run continued from its checkpoint
    assert re.search(r"SIGUSR2 at step \d+/\d+: checkpoint saved", logs), logs[-3000:]  # saved on SLURM's warning
    (script,) = [p.read_text() for p in (out / "cells" / "slurm_logs").rglob("*_submission.sh")]
    for flag in (
        "--time=2",
        "--signal=USR2@15",
        "--cpus-per-task=1",
        "--mem=1GB",
        "--comment=add-bench-launch-profile",
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert sweep.main([str(abl), "--out", str(out), "--collect"]) == 0
    assert (out / "mini" / "table.md").is_file()


@pytest.mark.slurm
def test_a_cell_of_two_tasks_requeued_on_usr2_equals_the_uninterrupted_cell(
    slurm_cluster, tiny_assets, tmp_path, cancel_after, monkeypatch
):
    """A launch profile with tasks_per_node=2: the sweep submits the cell as one job of two SLURM tasks (CPU,
    gloo, the process group from the SLURM environment). SLURM's pre-timeout USR2 (``scancel --signal``, as
    slurmctld delivers it: to every task) stops both processes at the same step with a checkpoint; the job is
    requeued, both resume, process 0 evaluates, and every loss and weight equals the same cell's trained
    uninterrupted by two local processes (``--procs-per-cell 2``; two processes against one:
    tests/test_distributed.py)."""
    import torch
    import yaml
    from test_sweep import ablation_file, tiny_preset

    from add_bench import checkpoint, sweep

    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))
    steps = 60
    # two local batches of 8 (BatchNormLocal's groups); a checkpoint only on the signal
    preset = tiny_preset(tiny_assets, tmp_path, batch_size=16, steps=steps, ckpt_every=1000)
    (tmp_path / "launch").mkdir()
    profile = {"slurm": {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 2, "tasks_per_node": 2}}
    (tmp_path / "launch" / preset.name).write_text(yaml.safe_dump(profile))
    abl = ablation_file(tmp_path, preset, cells=[{"name": "exp", "default": True}])
    (cell,) = sweep.load_ablations(abl)[0].cells
    out = tmp_path / "slurm"
    assert sweep.main([str(abl), "--out", str(out), "--launcher", "slurm"]) == 0
    cancel_after.extend(json.loads((out / "cells" / "slurm_jobs.json").read_text()).values())
    two, one = out / "cells" / cell.id, tmp_path / "local" / "cells" / cell.id
    deadline = time.monotonic() + 300
    while len((two / "log.jsonl").read_text().splitlines() if (two / "log.jsonl").exists() else []) < 3:
        if time.monotonic() > deadline:
            pytest.fail("the two-task cell did not start training\n" + _logs(out / "cells"))
        time.sleep(0.2)
    (job,) = json.loads((out / "cells" / "slurm_jobs.json").read_text()).values()
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)
    local = [str(abl), "--out", str(tmp_path / "local"), "--procs-per-cell", "2"]
    assert sweep.main(local) == 0  # meanwhile: the same two processes, locally and uninterrupted
    _wait_for([two / "metrics.json"], 300, out / "cells")
    (script,) = [p.read_text() for p in (out / "cells" / "slurm_logs").rglob("*_submission.sh")]
    assert "#SBATCH --ntasks-per-node=2\n" in script and "--kill-on-bad-exit=1" in script
    assert list((out / "cells" / "slurm_logs").rglob("*_1_log.err"))  # the second task ran
    rows = [[json.loads(r) for r in (wd / "log.jsonl").read_text().splitlines()] for wd in (one, two)]
    assert [r["step"] for r in rows[1]] == list(range(1, steps + 1))  # one writer, every step once
    errors = "".join(p.read_text(errors="replace") for p in (out / "cells" / "slurm_logs").rglob("*_log.err"))
    assert re.search(r"SIGUSR2 at step \d+/60: checkpoint saved", errors) and "resuming" in errors, errors[-3000:]
    for a, b in zip(*rows):  # exact resume: the requeued cell is the uninterrupted one, number for number
        assert [b[k] for k in ("loss_g", "loss_distill", "loss_d")] == [
            a[k] for k in ("loss_g", "loss_distill", "loss_d")
        ]
    a, b = checkpoint.load(one), checkpoint.load(two)
    for k, v in a["objects"]["ema"].items():
        torch.testing.assert_close(b["objects"]["ema"][k], v, rtol=0, atol=0)
    logs = "".join(p.read_text(errors="replace") for p in (out / "cells" / "slurm_logs").rglob("*_log.out"))
    assert json.loads((two / "metrics.json").read_text())["rows"], logs[-3000:]


@pytest.mark.slurm
def test_sweep_with_evaluation_as_a_job_after_training(
    slurm_cluster, tiny_assets, tmp_path, cancel_after, capsys, monkeypatch
):
    """slurm.eval_job in the launch profile: the sweep submits a training array and an evaluation array whose
    task i waits for training task i (aftercorr). Both good cells end done with metrics, each evaluated by its
    own job; the cell whose training fails has its evaluation cancelled (not left pending for good) and reads
    failed."""
    import yaml
    from test_sweep import ablation_file, tiny_preset

    from add_bench import sweep
    from add_bench.launchers import EVAL_JOBS_FILE, JOBS_FILE

    monkeypatch.setenv("ADD_BENCH_CACHE", str(tmp_path / "cache"))  # the jobs inherit it (sbatch --export=ALL)
    preset = tiny_preset(tiny_assets, tmp_path)
    (tmp_path / "launch").mkdir()
    profile = {
        "slurm": {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 1, "eval_job": True, "eval": {"timeout_min": 3}}
    }
    (tmp_path / "launch" / preset.name).write_text(yaml.safe_dump(profile))
    empty = tmp_path / "empty_teacher"  # a folder, so the sweep submits the cell; training it fails
    empty.mkdir()
    rows = [
        {"name": "a", "default": True},
        {"name": "b", "set": {"loss.lambda_distill": 1.0}},
        {"name": "broken", "set": {"teacher.network": str(empty), "student.network": str(empty)}},
    ]
    abl = ablation_file(tmp_path, preset, cells=rows)
    ids = {c.name: c.id for c in sweep.load_ablations(abl)[0].cells}
    out, start = tmp_path / "out", time.monotonic()
    assert sweep.main([str(abl), "--out", str(out), "--launcher", "slurm"]) == 0
    cells = out / "cells"
    trains, evals = (json.loads((cells / name).read_text()) for name in (JOBS_FILE, EVAL_JOBS_FILE))
    cancel_after.extend([*trains.values(), *evals.values()])
    assert set(trains) == set(evals) == set(ids.values())
    assert len({j.split("_")[0] for j in trains.values()} | {j.split("_")[0] for j in evals.values()}) == 2
    waiting = status_slurm(cells, EVAL_JOBS_FILE)
    assert set(waiting.values()) == {"PENDING"}, waiting  # each evaluation waits for its training

    good, broken = [cells / ids[n] for n in ("a", "b")], cells / ids["broken"]
    deadline = time.monotonic() + 300
    while not (
        all(sweep.cell_status(wd) == "done" for wd in good)
        and status_slurm(cells, EVAL_JOBS_FILE)[broken.name] not in ("PENDING", "RUNNING")
    ):
        if time.monotonic() > deadline:
            states = {n: sweep.cell_status(cells / i) for n, i in ids.items()}
            pytest.fail(f"cells {states}, evaluation jobs {status_slurm(cells, EVAL_JOBS_FILE)}\n" + _logs(cells))
        time.sleep(1)
    took = time.monotonic() - start
    for wd in good:
        metrics = json.loads((wd / "metrics.json").read_text())
        assert [r["steps"] for r in metrics["rows"]] == [1, 2] and (wd / sweep.TRAINED).is_file()
    assert sweep.cell_status(broken) == "failed" and not (broken / sweep.TRAINED).exists()
    assert "CheckpointError" in json.loads((broken / "error.json").read_text())["error"]
    deadline = time.monotonic() + 30  # the result file is written a moment before the task ends
    while set(status_slurm(cells, EVAL_JOBS_FILE).values()) - {"COMPLETED", "CANCELLED"}:
        assert time.monotonic() < deadline, status_slurm(cells, EVAL_JOBS_FILE)
        time.sleep(1)
    for name, wd in zip(("a", "b"), good):  # evaluated by its evaluation job: its log holds the scores
        (log,) = (cells / "slurm_logs" / evals[wd.name]).glob("*_log.err")
        assert re.search(r"steps=2 sampler=add .*fid=", log.read_text()), (name, log.read_text()[-2000:])
    capsys.readouterr()
    assert sweep.main([str(abl), "--out", str(out), "--status"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert re.search(
        rf"done  slurm: job {trains[ids['a']]} COMPLETED, evaluation {evals[ids['a']]} COMPLETED$", lines["a"]
    )
    assert re.search(
        rf"failed  slurm: job {trains[broken.name]} FAILED, evaluation {evals[broken.name]} CANCELLED$", lines["broken"]
    ), lines["broken"]
    print(f"\nevaluation-job sweep: 2 cells done, the broken one's evaluation cancelled, {took:.0f} s after submission")

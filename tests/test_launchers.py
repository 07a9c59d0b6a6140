"""status_slurm without a cluster: sacct, squeue and the result files are faked (tests/test_slurm.py
runs the real thing)."""

import json
import pickle

import pytest

import add_bench.launchers as launchers
from add_bench.launchers import JOBS_FILE, LOGS_DIR, status_slurm

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

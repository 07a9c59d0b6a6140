"""Atomic writes and the provenance stored beside every result (config, git commit, seed, time, machine)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when tracked files differ from it."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = run("rev-parse", "HEAD") or "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "add_bench")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The code a process runs is the code it imported: a sweep worker started before a later commit still
# runs the older code, so provenance names the commit read when this module was first imported.
IMPORTED_COMMIT = git_commit()


def machine() -> dict[str, Any]:
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def provenance(config: Any = None, seed: int | None = None, wall_time_s: float | None = None,
               command: str | None = None, **extra: Any) -> dict[str, Any]:
    from add_bench.config import to_dict

    return {
        "command": command,
        "git_commit": IMPORTED_COMMIT,  # the code this process runs (HEAD at import), not HEAD now
        "seed": seed,
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": None if config is None else to_dict(config),
        **extra,
    }


def resolve_weights(name_or_path: str | Path) -> Path:
    """A shipped network by name (add_bench/weights/<name>) or any folder path."""
    p = Path(name_or_path)
    if p.is_dir() or os.sep in str(name_or_path):
        return p
    return WEIGHTS_DIR / str(name_or_path)

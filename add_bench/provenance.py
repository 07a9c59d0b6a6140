"""Atomic writes and the provenance stored beside every result (config, git commit, seed, time, machine)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

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
        "load_average_1m": round(os.getloadavg()[0], 2),  # > torch_threads: something else was running
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def provenance(
    config: Any = None,
    seed: int | None = None,
    wall_time_s: float | None = None,
    command: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------ weights versions
_BLOB_CACHE: dict[tuple[str, int, int], str] = {}


def blob_id(path: str | Path) -> str:
    """Git's object id of a file's content (what ``git hash-object`` prints): a content hash that also
    names the file's version in this repository's history."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _BLOB_CACHE:
        h = hashlib.sha1(f"blob {st.st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _BLOB_CACHE[key] = h.hexdigest()
    return _BLOB_CACHE[key]


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def weights_versions(folders: dict[str, Path]) -> dict[str, dict[str, str]]:
    """``{role: {"path": folder, "blob": blob_id(its weights file), "aliases": [...]}}`` for the shipped-format
    weights folders (``unet/diffusion_pytorch_model.safetensors`` or ``model.safetensors`` beside a card.json);
    ``aliases`` are the blobs of the same tensors in an earlier layout (the card's ``converted_from``). Stable
    Diffusion pipeline folders, hub names and seeded random networks are left out."""
    from add_bench.networks.unets import read_card, weights_file

    out = {}
    for role, folder in folders.items():
        path = weights_file(folder)
        if (
            path.is_file()
            and (Path(folder) / "card.json").is_file()
            and not (Path(folder) / "model_index.json").is_file()
        ):
            card = read_card(folder)
            aliases = [card["converted_from"]["blob"]] if "converted_from" in card else []
            out[role] = {"path": display_path(folder), "blob": blob_id(path), "aliases": aliases}
    return out


@functools.lru_cache(maxsize=4096)
def blob_at_commit(commit: str, repo_path: str) -> str | None:
    """The blob id of ``repo_path`` (repository-relative) at ``commit``; None when unknown (no git, no such
    commit or file, a path outside the repository)."""
    commit = commit.removesuffix("+dirty")
    if not commit or commit == "unknown" or Path(repo_path).is_absolute():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{commit}:{repo_path}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None

"""Training checkpoints with exact resume: modules, optimisers, step and every RNG state.

One file per run (``checkpoint.pt``), replaced atomically, so a kill at any moment leaves the last
good checkpoint. A resumed run continues bit-exactly on CPU because all randomness in the loops
comes from one ``torch.Generator`` whose state is saved here. ``keep`` > 1 keeps that many checkpoints as
``checkpoint-<step>.pt`` (``checkpoint.pt`` a hard link to the newest, no second copy); 0 keeps every one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from add_bench.errors import CheckpointError, ConfigError
from add_bench.provenance import atomic_path

FILENAME = "checkpoint.pt"
NUMBERED = "checkpoint-{step:08d}.pt"  # the kept checkpoints when keep != 1


def check_keep(keep: int) -> int:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ConfigError(f"keep_checkpoints={keep!r}: must be an integer ≥ 0 (1 = the newest only, 0 = every one)")
    return keep


def save(
    folder: str | Path,
    step: int,
    objects: dict[str, Any],
    generator: torch.Generator,
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """``objects``: name → anything with ``state_dict()`` (modules, optimisers, EMA). ``keep``: how many
    checkpoints stay in ``folder`` (1: checkpoint.pt replaced; K > 1: the K newest numbered ones; 0: all)."""
    path = Path(folder) / FILENAME
    state = {
        "step": step,
        "objects": {k: v.state_dict() for k, v in objects.items()},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    if check_keep(keep) == 1:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path
    numbered = Path(folder) / NUMBERED.format(step=step)
    with atomic_path(numbered) as tmp:
        torch.save(state, tmp)
    with atomic_path(path) as tmp:  # checkpoint.pt: the newest, replaced in one rename
        tmp.unlink()
        try:
            os.link(numbered, tmp)
        except OSError:  # a filesystem without hard links: a copy
            shutil.copyfile(numbered, tmp)
    rotate(Path(folder), keep)
    return path


def kept(folder: Path) -> list[Path]:
    """The numbered checkpoints in ``folder``, oldest first."""
    return sorted(folder.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def rotate(folder: Path, keep: int) -> None:
    """Delete the numbered checkpoints older than the ``keep`` newest (0: keep all)."""
    if keep > 0:
        for old in kept(folder)[:-keep]:
            old.unlink()


def load(folder_or_file: str | Path) -> dict[str, Any]:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or not {"step", "objects", "generator"} <= set(state):
        raise CheckpointError(f"{path}: not an add-bench checkpoint (expected keys step, objects, generator)")
    return state


def restore(state: dict[str, Any], objects: dict[str, Any], generator: torch.Generator) -> int:
    """Load a checkpoint's states into ``objects`` and ``generator``; return the step to continue from."""
    missing = set(objects) - set(state["objects"])
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(sorted(missing))}")
    for k, obj in objects.items():
        try:
            obj.load_state_dict(state["objects"][k])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint entry '{k}' does not fit ({str(e).splitlines()[0][:160]})") from None
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def exists(folder: str | Path) -> bool:
    return (Path(folder) / FILENAME).is_file()


class EMA:
    """Exponential moving average of a module's parameters and buffers (the weights that ship)."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup_steps: int = 0):
        import copy

        self.decay, self.warmup_steps = decay, warmup_steps
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)

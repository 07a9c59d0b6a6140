"""Training checkpoints with exact resume: modules, optimisers, step and every RNG state.

One file per run (``checkpoint.pt``), replaced atomically, so a kill at any moment leaves the last
good checkpoint. A resumed run continues bit-exactly on CPU because all randomness in the loops
comes from one ``torch.Generator`` whose state is saved here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from add_bench.errors import CheckpointError
from add_bench.provenance import atomic_path

FILENAME = "checkpoint.pt"


def save(
    folder: str | Path,
    step: int,
    objects: dict[str, Any],
    generator: torch.Generator,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``objects``: name → anything with ``state_dict()`` (modules, optimisers, EMA)."""
    path = Path(folder) / FILENAME
    state = {
        "step": step,
        "objects": {k: v.state_dict() for k, v in objects.items()},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


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

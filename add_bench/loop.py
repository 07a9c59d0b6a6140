"""Small pieces shared by the training loops: learning-rate schedule, JSONL log, thread count."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then ``schedule``: cosine decay to base·min_ratio at ``total``,
    or constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


LR_SCHEDULES = ("constant", "cosine")


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, step: int) -> None:
        """Keep only rows up to ``step`` (on resume, so that no step is logged twice)."""
        if self.path.is_file():
            from add_bench.provenance import atomic_write_text

            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(r + "\n" for r in rows))

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


class Run:
    """A resumable run in a work folder: exact resume from ``checkpoint.pt``, ``log.jsonl`` trimmed to
    the resumed step, wall time across resumptions, periodic checkpoints and a time budget.

    The caller owns the loop and advances ``run.step``; ``end_of_step`` checkpoints when due and says
    whether to stop early (budget used up, a checkpoint written).

    Several processes (``procs``, :mod:`add_bench.distributed`): all of them load the checkpoint, each
    restores its own generator; process 0 writes it, holding every process's generator state."""

    def __init__(
        self,
        workdir: Path,
        objects: dict[str, Any],
        generator: torch.Generator,
        total: int,
        ckpt_every: int,
        budget_minutes: float = 0,
        procs: Any = None,
    ):
        import sys
        import time

        from add_bench import checkpoint
        from add_bench.distributed import Processes

        self.workdir, self.objects, self.generator = Path(workdir), objects, generator
        self.procs = procs or Processes()
        self.total, self.ckpt_every, self.budget_s = total, ckpt_every, budget_minutes * 60
        self.step, self._wall_before = 0, 0.0
        if checkpoint.exists(self.workdir):
            state = checkpoint.load(self.workdir)
            self.step = checkpoint.restore(state, objects, generator)
            generators = state["extra"].get("generators")
            if self.procs.world > 1 or generators:
                if not generators or len(generators) != self.procs.world:
                    from add_bench.errors import CheckpointError

                    raise CheckpointError(
                        f"{self.workdir}: checkpoint written by {len(generators or [0])} process(es), "
                        f"resumed with {self.procs.world}; resume with the same number"
                    )
                generator.set_state(generators[self.procs.rank])
            self._wall_before = state["extra"].get("wall_time_s", 0.0)
            if self.procs.is_writer:
                print(f"resuming {self.workdir} at step {self.step}", file=sys.stderr)
        self.log = JsonlLog(self.workdir / "log.jsonl")
        if self.procs.is_writer:
            self.log.truncate(self.step)  # rows written after the checkpoint we resume from are written again
        self._start = time.time()

    @property
    def wall_time_s(self) -> float:
        import time

        return self._wall_before + time.time() - self._start

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def save(self) -> None:
        from add_bench import checkpoint
        from add_bench.distributed import gather_objects

        extra = {"wall_time_s": self.wall_time_s}
        if self.procs.world > 1:
            extra["generators"] = gather_objects(self.generator.get_state())  # a collective: every process
        if self.procs.is_writer:
            checkpoint.save(self.workdir, self.step, self.objects, self.generator, extra)

    def end_of_step(self) -> bool:
        """Checkpoint when due; return True when the budget is used up before the end (stop now)."""
        import sys
        import time

        from add_bench.distributed import any_process

        out_of_time = any_process(self.budget_s > 0 and time.time() - self._start > self.budget_s)
        if self.step % self.ckpt_every == 0 or self.done or out_of_time:
            self.save()
        if out_of_time and not self.done:
            print(
                f"time budget used at step {self.step}/{self.total}; re-run the same command to resume "
                f"from {self.workdir}",
                file=sys.stderr,
            )
            return True
        return False

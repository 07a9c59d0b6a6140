"""Small pieces shared by the training loops: learning-rate schedule, JSONL log, thread count."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to base·min_ratio at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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

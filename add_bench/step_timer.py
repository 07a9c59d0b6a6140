"""Time and record ADD steps of one source tree: the probe ``python -m add_bench.bench --against REF`` runs in
this tree and in a git worktree of REF, so that old and new code are measured in the same run.

It uses only the API every version since ad44643 has (``config.load``, ``data.load_split``,
``loop.set_threads``, ``train.build_networks`` / ``optimisers`` / ``add_step``), seeds everything from the
config's seed, takes batch i as rows [i·B, (i+1)·B) of the training split, and prints one JSON line:
the wall time of each step and the loss values each step logged.

    python -c "import runpy; runpy.run_path('add_bench/step_timer.py', run_name='__main__')" STEPS WARMUP key=value ...
"""

from __future__ import annotations

import json
import sys
import time


def timed_add_steps(overrides: list[str], steps: int, warmup: int) -> dict:
    """``warmup`` untimed then ``steps`` timed ADD steps of the config ``overrides`` describe; their losses."""
    import torch

    from add_bench.config import TrainConfig, load
    from add_bench.data import load_split
    from add_bench.loop import set_threads
    from add_bench.train import add_step, build_networks, optimisers

    cfg = load(TrainConfig, overrides=overrides)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg)
    x, y = load_split("train", cfg.data.root, cfg.data.val_size, cfg.data.split_seed, cfg.data.download).tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt_s, opt_d = optimisers(nets, cfg)
    b = cfg.batch_size
    seconds, losses = [], []
    for step in range(warmup + steps):
        rows = slice(step * b, (step + 1) * b)
        start = time.perf_counter()
        log = add_step(nets, cfg, x[rows], y[rows], gen, opt_s, opt_d, step)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
        losses.append({k: float(v) for k, v in log.items() if k.startswith("loss")})
    return {"seconds": seconds, "losses": losses, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(timed_add_steps(sys.argv[3:], int(sys.argv[1]), int(sys.argv[2]))))

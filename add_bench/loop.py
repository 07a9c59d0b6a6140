"""What the training loops share: the loop itself (:func:`drive`), a resumable run, learning-rate schedule,
JSONL log, thread count."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
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
    """The run's log: one JSON row per logged step in ``log.jsonl``, and the same numbers (plus images) as
    TensorBoard events in ``tensorboard/`` beside it unless ``tensorboard=False`` (``tensorboard --logdir``
    on a runs folder shows every cell). The event writer opens on the first row, so processes that never
    write create no files; rows past ``purge_step`` left by an interrupted run are dropped by TensorBoard."""

    def __init__(self, path: Path, tensorboard: bool = True, purge_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard, self.purge_step, self._writer = tensorboard, purge_step, None

    def truncate(self, step: int) -> None:
        """Keep only rows up to ``step`` (on resume, so that no step is logged twice)."""
        if self.path.is_file():
            from add_bench.provenance import atomic_write_text

            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(r + "\n" for r in rows))

    def events(self):
        """The TensorBoard writer (None when off)."""
        if self.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self.purge_step)
        return self._writer

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        writer = self.events()
        if writer is not None and "step" in row:
            for key, value in row.items():
                if (
                    key not in ("step", "wall_time_s")
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    writer.add_scalar(key, value, row["step"])
            writer.flush()

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A (C, H, W) image in [0, 1] (e.g. a sample grid) as a TensorBoard image event."""
        writer = self.events()
        if writer is not None:
            writer.add_image(tag, image, step)
            writer.flush()


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


class Run:
    """A resumable run in a work folder: exact resume from ``checkpoint.pt``, ``log.jsonl`` trimmed to
    the resumed step, wall time across resumptions, periodic checkpoints (the ``keep_checkpoints`` newest
    kept: :func:`add_bench.checkpoint.save`) and a time budget.

    The caller owns the loop and advances ``run.step``; ``end_of_step`` checkpoints when due and says
    whether to stop early (budget used up, a checkpoint written).

    Several processes (``procs``, :mod:`add_bench.distributed`): all of them load the checkpoint and restore
    the one generator they share (each draws the global batch's numbers: distributed.rows); process 0
    writes it after checking that every process's generator is still the same. (A checkpoint of an older
    version, one generator per process, resumes only with as many processes.)"""

    def __init__(
        self,
        workdir: Path,
        objects: dict[str, Any],
        generator: torch.Generator,
        total: int,
        ckpt_every: int,
        budget_minutes: float = 0,
        procs: Any = None,
        tensorboard: bool = True,
        keep_checkpoints: int = 1,
    ):
        import sys
        import time

        from add_bench import checkpoint
        from add_bench.distributed import Processes

        self.workdir, self.objects, self.generator = Path(workdir), objects, generator
        self.procs = procs or Processes()
        self.total, self.ckpt_every, self.budget_s = total, ckpt_every, budget_minutes * 60
        self.keep = checkpoint.check_keep(keep_checkpoints)
        self.step, self._wall_before = 0, 0.0
        if checkpoint.exists(self.workdir):
            state = checkpoint.load(self.workdir)
            self.step = checkpoint.restore(state, objects, generator)
            generators = state["extra"].get("generators")  # older versions: one stream per process
            if generators:
                if len(generators) != self.procs.world:
                    from add_bench.errors import CheckpointError

                    raise CheckpointError(
                        f"{self.workdir}: checkpoint written by {len(generators)} process(es) with one random "
                        f"stream each (an older version), resumed with {self.procs.world}; resume with the same number"
                    )
                generator.set_state(generators[self.procs.rank])
            self._wall_before = state["extra"].get("wall_time_s", 0.0)
            if self.procs.is_writer:
                print(f"resuming {self.workdir} at step {self.step}", file=sys.stderr)
        self.log = JsonlLog(self.workdir / "log.jsonl", tensorboard, purge_step=self.step + 1)
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

    def checkpoint_due(self, completed: int) -> bool:
        """Whether the step that completes ``completed`` steps ends with a scheduled checkpoint."""
        return completed % self.ckpt_every == 0 or completed >= self.total

    def log_samples(self, tag: str, grid: Callable[[], torch.Tensor], step: int) -> None:
        """The image ``grid()`` (e.g. :func:`add_bench.diffusion.sample_grid`) as TensorBoard image ``tag``,
        made only on the writing process with TensorBoard on."""
        if self.procs.is_writer and self.log.tensorboard:
            self.log.image(tag, grid(), step)

    def save(self) -> None:
        from add_bench import checkpoint
        from add_bench.distributed import check_same_stream

        extra = {"wall_time_s": self.wall_time_s}
        if self.procs.world > 1:
            check_same_stream(self.step, self.generator)  # a collective: every process
        if self.procs.is_writer:
            checkpoint.save(self.workdir, self.step, self.objects, self.generator, extra, self.keep)

    def end_of_step(self, signalled: int | None = None) -> bool:
        """Checkpoint when due, or now when a process got a stop signal (``signalled``: its number, from
        :class:`StopSignals`); return True when the budget is used up or a signal came before the end (stop now)."""
        import signal
        import sys
        import time

        from add_bench.distributed import any_process

        out_of_time = any_process(self.budget_s > 0 and time.time() - self._start > self.budget_s)
        stop = any_process(signalled is not None)
        if self.checkpoint_due(self.step) or out_of_time or stop:
            self.save()
        if (out_of_time or stop) and not self.done:
            if out_of_time:
                why = "time budget used"
            else:
                why = signal.Signals(signalled).name if signalled else "a stop signal to another process"
            print(
                f"{why} at step {self.step}/{self.total}: checkpoint saved; re-run the same command (or a requeued "
                f"job) resumes from {self.workdir}",
                file=sys.stderr,
            )
            return True
        return False


class StopSignals:
    """While a training loop runs, SIGUSR1 or SIGUSR2 (the warning SLURM sends before a time limit or a
    preemption: submitit asks for USR2) make the run checkpoint at the end of the current step and stop. When
    the loop is left, the handler installed before (submitit's: requeue the job, then exit) gets the signal;
    without one the loop just returns unfinished, as on a used-up time budget. Outside the loop (start-up,
    evaluation) the signal goes to that handler at once. Main thread only (signals are delivered there)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                self.previous[sig] = signal.signal(sig, self.note)
        return self

    def note(self, signum: int, frame: Any) -> None:
        self.pending = signum

    def __exit__(self, kind: Any, *rest: Any) -> None:
        import signal

        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handler = previous.get(self.pending)
        if kind is None and callable(handler):  # the checkpoint is written: now the requeue
            handler(self.pending, None)


def drive(
    run: Run,
    step_fn: Callable[[int], dict[str, Any]],
    desc: str,
    log_every: int,
    *,
    progress: bool = True,
    postfix: Sequence[str] = ("loss",),
    log_at: Callable[[int], bool] | None = None,
    log_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> bool:
    """The loop every trainer shares. ``step_fn(step)`` makes one update from ``step`` (counted from 0) and
    returns that step's log row (a callable value is computed only if the row is written). Then: the
    progress bar (``postfix`` keys), a JSONL row every ``log_every`` completed steps, at the end and where
    ``log_at(completed)`` says (``log_row`` may rewrite it first, on every process), ``after_step(completed)``,
    and Run.end_of_step's checkpoints, time budget and stop signals (:class:`StopSignals`). Returns True when
    the run is finished, False when it stopped on its budget or a signal (call again to resume)."""
    from tqdm import tqdm

    bar = tqdm(
        total=run.total, initial=run.step, desc=desc, dynamic_ncols=True, disable=not (progress and run.procs.is_writer)
    )
    try:
        with StopSignals() as signals:
            while not run.done:
                row = step_fn(run.step)
                run.step += 1
                bar.update(1)
                bar.set_postfix(
                    {k: f"{row[k]:.4f}" if isinstance(row[k], float) else row[k] for k in postfix if k in row}
                )
                if run.step % log_every == 0 or run.done or (log_at is not None and log_at(run.step)):
                    row = {k: v() if callable(v) else v for k, v in row.items()}
                    row = log_row(row) if log_row is not None else row
                    if run.procs.is_writer:
                        run.log.write(step=run.step, wall_time_s=round(run.wall_time_s, 2), **row)
                if after_step is not None:
                    after_step(run.step)
                if run.end_of_step(signals.pending):
                    return False
            return True
    finally:
        bar.close()


class RunningMean:
    """The exponential moving average of a loss shown on the progress bar (``loss_avg``)."""

    def __init__(self, rate: float = 0.02):
        self.rate, self.value = rate, None

    def __call__(self, x: float) -> float:
        self.value = x if self.value is None else (1 - self.rate) * self.value + self.rate * x
        return self.value


def start_pretraining(
    workdir: Path, objects: dict[str, Any], gen: torch.Generator, cfg: Any, budget_minutes: float, what: str
) -> tuple[Run, RunningMean]:
    """A pre-training run (a teacher, a feature network) of ``cfg.steps`` with a checkpoint every
    ``cfg.ckpt_every``, announced on stderr as ``what``, and the moving average of its loss."""
    import sys

    run = Run(workdir, objects, gen, cfg.steps, cfg.ckpt_every, budget_minutes, tensorboard=cfg.tensorboard)
    print(what, file=sys.stderr)
    return run, RunningMean()


def pretraining_batch(step: int, opt: torch.optim.Optimizer, cfg: Any, n: int, gen: torch.Generator) -> torch.Tensor:
    """The start of pre-training step ``step``: ``opt``'s learning rate (``cfg.warmup_steps`` of warm-up, then
    cosine decay to ``cfg.min_lr_ratio``), and the indices of the step's ``cfg.batch_size`` images among ``n``."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    return torch.randint(0, n, (cfg.batch_size,), generator=gen)


def clipped_update(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    params,
    grad_clip: float,
    loss_avg: RunningMean,
    where: str,
    before_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """A pre-training update: stop on a non-finite loss (``where`` says what and how to resume), backward,
    ``before_step()``, clip the gradient norm to ``grad_clip``, step. Returns the step's log row."""
    if not torch.isfinite(loss):
        from add_bench.errors import TrainingDiverged

        raise TrainingDiverged(f"loss is {loss.item()} {where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    value = loss.item()
    return {"loss": value, "loss_avg": loss_avg(value), "grad_norm": gnorm.item(), "lr": opt.param_groups[0]["lr"]}

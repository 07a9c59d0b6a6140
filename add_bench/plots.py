"""A cell's training curves: ``log.jsonl`` → ``training.png`` beside it.

    python -m add_bench.plots CELL_FOLDER [CELL_FOLDER ...]

Panels: the student's losses (L = L_adv^G + λ·L_distill, Eq. 1), the discriminator's hinge loss (Eq. 3),
the lazy R1 term at the steps it ran, the student's gradient norm from L_adv^G alone and from λ·L_distill
alone (log scale), their ratio adv/distill (log scale), and the share of x̂θ the discriminator calls fake
per student timestep s. ``add_bench.train`` writes it when a cell finishes training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from add_bench.errors import DataError, command_line

Row = dict[str, Any]

# (title, log scale, x key, {log key: legend label}) per panel; a d_fake_acc_s<τ> panel follows them
PANELS = (
    ("student losses", False, "step", {"loss_g": "L (Eq. 1)", "loss_g_adv": "L_adv^G", "loss_distill": "L_distill"}),
    ("discriminator loss", False, "step", {"loss_d": "L_adv^D hinge"}),
    ("R1 term (lazy: r1_every·γ·R1)", True, "r1_step", {"loss_r1": "loss_r1"}),
    (
        "student gradient norm",
        True,
        "step",
        {
            "grad_norm_student_adv": "from L_adv^G",
            "grad_norm_student_distill": "from λ·L_distill",
            "grad_norm_student": "from L (before clipping)",
        },
    ),
    ("gradient ratio adv / distill", True, "step", {"grad_ratio_adv_distill": "‖∇θ L_adv^G‖ / ‖∇θ λ·L_distill‖"}),
)
FAKE_ACC_PREFIX = "d_fake_acc_s"


def read_log(path: Path) -> list[Row]:
    """The rows of a ``log.jsonl``; DataError naming the file when it is missing or a line is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (give the work folder of a cell that has trained)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number} is not valid JSON ({e})") from None
    return rows


def series(rows: list[Row], x_key: str, key: str, log_scale: bool) -> tuple[list[float], list[float]]:
    """(x, y) of ``key`` over the rows that have it, finite (and positive on a log scale), each x once."""
    points: dict[float, float] = {}
    for row in rows:
        x, y = row.get(x_key), row.get(key)
        if x is not None and isinstance(y, (int, float)) and math.isfinite(y) and (y > 0 or not log_scale):
            points[x] = y
    return list(points), list(points.values())


def plot_panel(ax, rows: list[Row], title: str, log_scale: bool, x_key: str, labels: dict[str, str]) -> None:
    """One panel: a line per logged key; a grey note when the log holds none of them."""
    from add_bench.tables import empty_panel

    drawn = 0
    for key, label in labels.items():
        xs, ys = series(rows, x_key, key, log_scale)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
            drawn += 1
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if not drawn:
        empty_panel(ax, f"not logged: {', '.join(labels)}")
        return
    if log_scale:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def fake_accuracy_labels(rows: list[Row]) -> dict[str, str]:
    """{d_fake_acc_s<τ>: "s = τ"} for the student timesteps in the log, largest τ first."""
    keys = {k for row in rows for k in row if k.startswith(FAKE_ACC_PREFIX)}
    return {k: f"s = {k[len(FAKE_ACC_PREFIX) :]}" for k in sorted(keys, key=lambda k: -int(k[len(FAKE_ACC_PREFIX) :]))}


def plot_training(log_path: Path, path: Path) -> Path:
    """``training.png`` at ``path`` from the rows of ``log_path`` (written atomically)."""
    from add_bench.tables import new_figure, save_figure

    rows = read_log(log_path)
    fig = new_figure((15, 8))
    axes = fig.subplots(2, 3).ravel()
    for ax, panel in zip(axes, PANELS):
        plot_panel(ax, rows, *panel)
    acc_ax = axes[len(PANELS)]
    plot_panel(
        acc_ax,
        rows,
        "discriminator: share of x̂θ called fake, per s",
        False,
        "step",
        fake_accuracy_labels(rows) or {FAKE_ACC_PREFIX + "<τ>": ""},
    )
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[len(PANELS) - 1].axhline(1.0, color="grey", lw=0.8, ls=":")
    fig.suptitle(str(Path(log_path).parent.name))
    fig.tight_layout()
    return save_figure(fig, path)


def write_training_plot(workdir: Path) -> Path | None:
    """``<workdir>/training.png`` from ``<workdir>/log.jsonl``; on any error a warning line on stderr and None
    (a plot never fails the cell)."""
    workdir = Path(workdir)
    try:
        return plot_training(workdir / "log.jsonl", workdir / "training.png")
    except Exception as e:  # noqa: BLE001 - reported, and the cell's training stands
        print(f"warning: {workdir / 'training.png'} not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


@command_line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("cells", nargs="+", type=Path, help="work folders holding a log.jsonl")
    for cell in p.parse_args(argv).cells:
        print(f"wrote {plot_training(cell / 'log.jsonl', cell / 'training.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

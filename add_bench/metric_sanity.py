"""The metric sanity ladder: generators built from real images, scored like a student.

    python -m add_bench.metric_sanity --out results/metric_sanity [--num-samples 5000] [--teachers teacher_small]

Each rung is a "generator" whose failure is known by construction: 1, 2, 5, 20 or 100 distinct training
images per class repeated to the sample count (the sets nested: the first n of one fixed order per class),
the class-mean image, Gaussian-blurred real images (two strengths), real images with 20% of the labels
wrong, and held-out real images (the validation split). A metric that sees mode collapse orders the
repeated rungs: held-out real < 100 < 20 < 5 < 2 < 1 image per class. Teacher rows (DDIM, with the CFG
the teacher targets use) put real generators on the same scale.

Every diversity-aware metric is computed in three feature spaces: the self-supervised embedding
``evalnet_ssl`` (the suite's choice), the evaluation classifier's penultimate features (``evalnet``, the
space of the suite's FID) and raw pixels, so the choice of space is justified by the same table.
The command also times the new metrics against generating 5k one-step samples (a ratio, same run).

Writes ``<out>/ladder.json`` (rows, checks, timing, provenance), ``table.md``, ``table.csv``, ``ladder.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from add_bench.config import EvalConfig, load
from add_bench.data import NUM_CLASSES, balanced_indices, load_split
from add_bench.errors import ConfigError, command_line
from add_bench.metrics import (
    KNN_K,
    EmbedNetFeatures,
    EvalNetScorer,
    IntraFID,
    ManifoldMetrics,
    SampleSet,
    embedded_metrics,
    reference_of_test_split,
    score,
    select_metrics,
)
from add_bench.provenance import REPO_ROOT, atomic_write_json, atomic_write_text, provenance

DISTINCT = (100, 20, 5, 2, 1)
BLUR_SIGMAS = (0.75, 1.5)
WRONG_LABEL_SHARE = 0.2
SPACES = ("evalnet_ssl", "evalnet", "pixels")
HEADLINE_SPACE = "evalnet_ssl"
# Checked down the ladder: coverage and intra-FID get strictly worse with fewer distinct images; recall
# cannot fall below 0, where every rung of ≤ 20 repeated images per class sits (a repeated image's k-th
# neighbour is its own copy), so it is checked not to rise. Precision and density measure fidelity, which
# repeated real images keep: they are reported, not checked.
STRICT_KEYS = ("coverage", "intra_fid")
NON_INCREASING_KEYS = ("recall", "recall_uncond")
# the held-out rung ≥ this class-conditional recall, the ≤ 5-images rungs ≤ COLLAPSED_MAX (issue bars)
REAL_MIN_RECALL, COLLAPSED_MAX_RECALL = 0.8, 0.05


@dataclass
class Rung:
    name: str
    make: Callable[[], SampleSet]
    distinct_per_class: int | None = None  # the repeated-image rungs, for the order check and the plot


def balanced(images: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator) -> SampleSet:
    """``per_class`` images of each class, in the label order of samples."""
    order = balanced_indices(labels, per_class, rng)
    return SampleSet(images[order], labels[order])


def repeated(images: np.ndarray, labels: np.ndarray, distinct: int, per_class: int, seed: int) -> SampleSet:
    """``distinct`` images of each class (the first ones of a fixed per-class order, so the rungs nest),
    each repeated to ``per_class`` samples."""
    rng = np.random.default_rng(seed)
    firsts = [rng.permutation(np.flatnonzero(labels == c))[:distinct] for c in range(NUM_CLASSES)]
    idx = np.stack([np.resize(f, per_class) for f in firsts], 1).reshape(-1)
    return SampleSet(images[idx], labels[idx])


def class_means(images: np.ndarray, labels: np.ndarray, per_class: int) -> SampleSet:
    means = (
        np.stack([images[labels == c].astype(np.float64).mean(0) for c in range(NUM_CLASSES)]).round().astype(np.uint8)
    )
    y = np.tile(np.arange(NUM_CLASSES), per_class)
    return SampleSet(means[y], y)


def blurred(real: SampleSet, sigma: float) -> SampleSet:
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(real.images.astype(np.float64), sigma=(0, sigma, sigma), mode="constant")
    return SampleSet(out.round().clip(0, 255).astype(np.uint8), real.labels)


def wrong_labels(real: SampleSet, share: float, seed: int) -> SampleSet:
    """The same images; ``share`` of them carry a random other class's label (so they count as that class)."""
    rng = np.random.default_rng(seed)
    labels = real.labels.copy()
    flip = rng.random(len(labels)) < share
    labels[flip] = (labels[flip] + rng.integers(1, NUM_CLASSES, flip.sum())) % NUM_CLASSES
    return SampleSet(real.images, labels)


def ladder(cfg: EvalConfig, num_samples: int) -> list[Rung]:
    data = cfg.data
    per_class = num_samples // NUM_CLASSES
    train = load_split("train", data.root, data.val_size, data.split_seed, data.download)
    val = load_split("val", data.root, data.val_size, data.split_seed, data.download)
    held_out = lambda: balanced(val.images, val.labels, per_class, np.random.default_rng(cfg.seed))  # noqa: E731
    rungs = [Rung("held-out real (val split)", held_out)]
    rungs += [
        Rung(
            f"{n} real image{'s' * (n > 1)} per class, repeated",
            lambda n=n: repeated(train.images, train.labels, n, per_class, cfg.seed),
            n,
        )
        for n in DISTINCT
        if n < per_class
    ]
    rungs += [Rung("class-mean image", lambda: class_means(train.images, train.labels, per_class))]
    rungs += [
        Rung(f"held-out real, Gaussian blur σ = {s:g} px", lambda s=s: blurred(held_out(), s)) for s in BLUR_SIGMAS
    ]
    rungs += [
        Rung(
            f"held-out real, {WRONG_LABEL_SHARE:.0%} wrong labels",
            lambda: wrong_labels(held_out(), WRONG_LABEL_SHARE, cfg.seed),
        )
    ]
    return rungs


def teacher_rungs(
    teachers: list[str], settings: list[tuple[int, float]], cfg: EvalConfig, num_samples: int
) -> list[Rung]:
    from add_bench.evaluate import generate, load_denoiser

    def make(teacher: str, steps: int, scale: float) -> SampleSet:
        denoiser, _ = load_denoiser(teacher)
        return generate(denoiser, "ddim", steps, num_samples, cfg.seed, cfg.batch_size, scale).samples

    return [
        Rung(f"{t}, DDIM {s} step{'s' * (s > 1)}, CFG {c:g}", lambda t=t, s=s, c=c: make(t, s, c))
        for t in teachers
        for s, c in settings
    ]


def feature_space(cfg: EvalConfig, name: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A feature space's function and id (its weights' hash: the key of its cached reference)."""
    if name == "evalnet_ssl":
        embed = EmbedNetFeatures(cfg.evalnet_ssl)
        return embed, embed.id
    if name == "evalnet":
        scorer = EvalNetScorer(cfg.evalnet)
        return scorer.features, scorer.id
    if name == "pixels":
        return (lambda images: images.reshape(len(images), -1).astype(np.float32) / 255), "pixels"
    raise ConfigError(f"feature space {name!r}: unknown; accepted: {', '.join(SPACES)}")


def space_metrics(cfg: EvalConfig, spaces: tuple[str, ...]) -> dict[str, list]:
    """Per feature space: class-conditional P/R/D/C, unconditional P/R and intra-FID against the test split
    (for evalnet_ssl the suite's own reference: one cache)."""
    out = {}
    for name in spaces:
        ref = reference_of_test_split(*feature_space(cfg, name), cfg.data)
        out[name] = [ManifoldMetrics(ref, name), IntraFID(ref, name)]
    return out


def score_rung(rung: Rung, base_suite: list, spaces: dict[str, list]) -> dict[str, Any]:
    samples = rung.make()
    row: dict[str, Any] = {
        "generator": rung.name,
        "distinct_per_class": rung.distinct_per_class,
        "num_samples": len(samples),
        **score(base_suite, samples),
    }
    for space, suite in spaces.items():
        values = score(suite, samples)
        row |= {f"{k}@{space}": v for k, v in values.items()}
    return row


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ladder's order and the recall bars, measured, for every diversity-aware metric and space."""
    by_name = {r["generator"]: r for r in rows}
    real = by_name["held-out real (val split)"]
    chain = [real] + sorted((r for r in rows if r["distinct_per_class"]), key=lambda r: -r["distinct_per_class"])
    out: dict[str, Any] = {"order": [r["generator"] for r in chain], "monotone": {}}
    spaces = [s for s in SPACES if f"recall@{s}" in real]
    for space in spaces:
        for key in STRICT_KEYS + NON_INCREASING_KEYS:
            values = [r.get(f"{key}@{space}") for r in chain]
            if any(v is None for v in values):
                continue
            if key == "intra_fid":
                ok = all(b > a for a, b in zip(values, values[1:]))
            elif key in STRICT_KEYS:
                ok = all(b < a for a, b in zip(values, values[1:]))
            else:
                ok = all(b <= a for a, b in zip(values, values[1:])) and values[0] > values[-1]
            out["monotone"][f"{key}@{space}"] = ok
    few = [r for r in chain[1:] if r["distinct_per_class"] <= 5]
    out["recall"] = {
        space: {
            "held_out_real": real.get(f"recall@{space}"),
            "max_at_5_or_fewer": max((r[f"recall@{space}"] for r in few), default=None),
            "bars_met": bool(
                real.get(f"recall@{space}", 0) >= REAL_MIN_RECALL
                and all(r[f"recall@{space}"] <= COLLAPSED_MAX_RECALL for r in few)
            ),
        }
        for space in spaces
    }
    one = next((r for r in chain if r["distinct_per_class"] == 1), None)
    teachers = [r for r in rows if r["distinct_per_class"] is None and "DDIM" in r["generator"]]
    if one:
        out["one_image_vs_teachers"] = {
            t["generator"]: {
                f"intra_fid@{space}": bool(one[f"intra_fid@{space}"] > t[f"intra_fid@{space}"]) for space in spaces
            }
            | {"fid": bool(one["fid"] > t["fid"])}
            for t in teachers
        }
    return out


def time_overhead(cfg: EvalConfig, teacher: str, num_samples: int) -> dict[str, float]:
    """Seconds to generate ``num_samples`` one-step samples (DDIM, one network evaluation, as a 1-step
    student) and to compute the new metrics on them (reference statistics already cached), same run."""
    from add_bench.evaluate import generate, load_denoiser

    denoiser, _ = load_denoiser(teacher)
    g = generate(denoiser, "ddim", 1, num_samples, cfg.seed, cfg.batch_size, 1.0, progress=False)
    registry = embedded_metrics(cfg)
    new = select_metrics(registry, ["prdc", "intra_fid"])
    old = select_metrics(registry, ["fid", "alignment"])
    score(new + old, g.samples)  # loads the networks and the cached reference
    fresh = SampleSet(g.samples.images.copy(), g.samples.labels)  # not the embedding's remembered array
    start = time.perf_counter()
    score(new, fresh)
    new_s = time.perf_counter() - start
    start = time.perf_counter()
    score(old, fresh)
    old_s = time.perf_counter() - start
    return {
        "generate_1step_s": round(g.seconds, 3),
        "new_metrics_s": round(new_s, 3),
        "fid_alignment_s": round(old_s, 3),
        "new_over_generate": round(new_s / g.seconds, 4),
        "threads": torch.get_num_threads(),
        "num_samples": num_samples,
    }


def run(
    out: Path,
    cfg: EvalConfig,
    num_samples: int,
    teachers: list[str],
    teacher_settings: list[tuple[int, float]],
    timing: bool = True,
    command: str | None = None,
    spaces: tuple[str, ...] = SPACES,
) -> dict[str, Any]:
    if num_samples % NUM_CLASSES or num_samples // NUM_CLASSES <= KNN_K:
        raise ConfigError(
            f"--num-samples {num_samples}: needs a multiple of {NUM_CLASSES} with more than {KNN_K} per class"
        )
    start = time.time()
    print(f"metric sanity ladder → {out}", file=sys.stderr)
    base_suite = select_metrics(embedded_metrics(cfg), ["fid", "alignment", "diversity"])
    metrics_by_space = space_metrics(cfg, spaces)
    rungs = ladder(cfg, num_samples) + teacher_rungs(teachers, teacher_settings, cfg, num_samples)
    from tqdm import tqdm

    rows = []
    for rung in tqdm(rungs, desc="ladder", dynamic_ncols=True):
        rows.append(score_rung(rung, base_suite, metrics_by_space))
    result = {
        "num_samples": num_samples,
        "k": KNN_K,
        "headline_space": HEADLINE_SPACE,
        "spaces": list(spaces),
        "rows": rows,
        "checks": checks(rows),
    }
    if timing and teachers:
        result["timing"] = time_overhead(cfg, teachers[0], num_samples)
    result["provenance"] = provenance(
        cfg, cfg.seed, time.time() - start, command=command or "python -m add_bench.metric_sanity"
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ladder.json", result)
    write_ladder_tables(result, out)
    return result


def write_ladder_tables(result: dict[str, Any], out: Path) -> None:
    import pandas as pd

    from add_bench.tables import new_figure, save_figure, to_markdown

    df = pd.DataFrame(result["rows"])
    atomic_write_text(out / "table.csv", df.to_csv(index=False, float_format="%.5g"))
    cols = ["generator", "fid", "align_acc", "diversity"] + [
        f"{k}@{HEADLINE_SPACE}" for k in ("recall", "coverage", "precision", "density", "intra_fid")
    ]
    show = df[cols].copy()
    for c in cols[1:]:
        show[c] = show[c].map(lambda v: f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
    spaces = result["spaces"]
    compare = df[["generator"] + [f"{k}@{s}" for s in spaces for k in ("recall", "coverage", "intra_fid")]].copy()
    for c in compare.columns[1:]:
        compare[c] = compare[c].map(lambda v: f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
    ch = result["checks"]
    mono = [f"| `{k}` | {'yes' if v else 'no'} |" for k, v in ch["monotone"].items()]
    bars = [
        f"| {s} | {v['held_out_real']:.3f} | {v['max_at_5_or_fewer']:.3f} | {'yes' if v['bars_met'] else 'no'} |"
        for s, v in ch["recall"].items()
    ]
    vs = [
        f"| {t} | " + " | ".join("yes" if v[k] else "no" for k in ("fid", *(f"intra_fid@{s}" for s in spaces))) + " |"
        for t, v in ch.get("one_image_vs_teachers", {}).items()
    ]
    lines = [
        "# Metric sanity ladder",
        "",
        f"Generators built from real Fashion-MNIST images, {result['num_samples']} balanced samples each, scored "
        f"against the 10k test split like a student. `fid`, `align_acc`: the evaluation classifier (`evalnet`); "
        f"`diversity`: within-class pixel std; `@{HEADLINE_SPACE}`: class-conditional k-NN metrics (k = "
        f"{result['k']}; precision/recall: Kynkäänniemi et al. 2019; density/coverage: Naeem et al. 2020) and "
        "per-class FID (`intra_fid`, Miyato & Koyama 2018) in the self-supervised embedding. Produced by "
        "`python -m add_bench.metric_sanity`; numbers in `ladder.json`, every column in `table.csv`.",
        "",
        to_markdown(show),
        "",
        "## The same metrics in three feature spaces",
        "",
        "`evalnet_ssl`: self-supervised embedding (the suite's choice); `evalnet`: classifier penultimate "
        "features (the space of the suite's FID); `pixels`: raw 784-d images.",
        "",
        to_markdown(compare),
        "",
        "## Checks",
        "",
        "Coverage and intra-FID get strictly worse down the ladder, recall never rises (it bottoms out at 0) "
        + " < ".join(
            ["held-out real"]
            + [
                f"{n}/class"
                for n in sorted(
                    {r["distinct_per_class"] for r in result["rows"] if r["distinct_per_class"]}, reverse=True
                )
            ]
        )
        + ":",
        "",
        "| metric@space | monotone |",
        "|---|---|",
        *mono,
        "",
        f"Class-conditional recall: held-out real ≥ {REAL_MIN_RECALL}, every rung of ≤ 5 images per class "
        f"≤ {COLLAPSED_MAX_RECALL}:",
        "",
        "| space | held-out real | max at ≤ 5 / class | bars met |",
        "|---|---|---|---|",
        *bars,
        "",
    ]
    if vs:
        lines += [
            "One real image per class scores worse than the teacher rows (higher is worse):",
            "",
            "| teacher row | FID (evalnet) | " + " | ".join(f"intra-FID@{s}" for s in spaces) + " |",
            "|---|---|" + "---|" * len(spaces),
            *vs,
            "",
        ]
    if "timing" in result:
        t = result["timing"]
        lines += [
            f"Metric overhead (same run, {t['threads']} threads): generating {t['num_samples']} one-step samples "
            f"took {t['generate_1step_s']:.2f} s; the new metrics (prdc + intra_fid, reference cached) "
            f"{t['new_metrics_s']:.2f} s = {t['new_over_generate']:.1%} of that; FID + alignment "
            f"{t['fid_alignment_s']:.2f} s.",
            "",
        ]
    atomic_write_text(out / "table.md", "\n".join(lines))
    fig = new_figure((13, 3.6))
    axes = fig.subplots(1, 4)
    chain = df[df["distinct_per_class"].notna()].sort_values("distinct_per_class")
    real = df[df["generator"] == "held-out real (val split)"].iloc[0]
    for ax, key, title in zip(
        axes,
        ("recall", "coverage", "intra_fid", None),
        ("class-cond. recall ↑", "class-cond. coverage ↑", "intra-FID ↓", "FID (evalnet) ↓"),
    ):
        for space in spaces if key else ("",):
            col = f"{key}@{space}" if key else "fid"
            scale = 1 if key != "intra_fid" else 1 / max(real[col], 1e-12)
            line = ax.plot(chain["distinct_per_class"], chain[col] * scale, marker="o", label=space or "evalnet")[0]
            ax.axhline(real[col] * scale, color=line.get_color(), ls="--", lw=1)
        ax.set(
            xscale="log",
            xlabel="distinct real images per class",
            title=title + (" (÷ held-out real)" if key == "intra_fid" else ""),
        )
        ax.legend(fontsize=7)
    fig.suptitle("Metric sanity ladder: dashed = held-out real images", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "ladder.png")


def parse_setting(text: str) -> tuple[int, float]:
    try:
        steps, scale = text.split(":")
        return int(steps), float(scale)
    except ValueError:
        raise ConfigError(f"--teacher-settings {text!r}: expected STEPS:CFG, e.g. 4:2") from None


@command_line(ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m add_bench.metric_sanity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=str(REPO_ROOT / "results" / "metric_sanity"))
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--teachers", nargs="*", default=["teacher_small"])
    p.add_argument("--teacher-settings", nargs="*", default=["1:2", "4:2", "4:1"], help="STEPS:CFG per teacher row")
    p.add_argument("--no-timing", action="store_true", help="skip the metric-overhead timing")
    p.add_argument("--spaces", nargs="+", default=list(SPACES), choices=SPACES, help="feature spaces to compare")
    p.add_argument("overrides", nargs="*", help="EvalConfig overrides key=value")
    a = p.parse_intermixed_args(argv)
    cfg = load(EvalConfig, overrides=a.overrides)
    settings = [parse_setting(s) for s in a.teacher_settings]
    command = shlex.join(["python", "-m", "add_bench.metric_sanity", *(argv if argv is not None else sys.argv[1:])])
    run(Path(a.out), cfg, a.num_samples, a.teachers, settings, not a.no_timing, command, tuple(a.spaces))
    print(f"wrote {a.out}/ladder.json, table.md, table.csv, ladder.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

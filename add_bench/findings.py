"""``docs/findings.md``: what the committed results say, generated from ``results/`` and nothing else.

    python -m add_bench.tables --report [--results results] [--report-out docs/findings.md]

Every number in the document is read from a results folder by this module (the ablation manifests and
their cells, ``teacher/rows``, ``metric_sanity/ladder.json``); the prose around them only says what is
measured. The test suite regenerates the file and fails when the committed one differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from add_bench import tables as T
from add_bench.config import load_yaml
from add_bench.provenance import REPO_ROOT, atomic_write_text

# The paper's Table 1, in its order (a, b, …): the files ablations/table1.yaml includes; any other ablation
# folder is Table 2 (``methods``) or a probe.
TABLE1 = tuple(Path(f).stem for f in load_yaml(REPO_ROOT / "ablations" / "table1.yaml")["include"])
METHODS = "methods"
MULTI_STEP = 4  # the second step count of the Table 1 overview


@dataclass
class Ablation:
    """One ablation folder, aggregated as ``python -m add_bench.tables`` aggregates it."""

    name: str
    manifest: dict
    df: pd.DataFrame
    agg: pd.DataFrame
    head: pd.DataFrame
    align_name: str

    @classmethod
    def read(cls, folder: Path) -> Ablation:
        manifest = T.read_manifest(folder)
        df = T.load_results(folder)
        agg = T.aggregate(df)
        head, _ = T.headline(agg)
        return cls(folder.name, manifest, df, agg, head, T.ALIGNMENT_NAMES[T.alignment_of(df)])

    @property
    def title(self) -> str:
        return T.table_title(self.manifest)

    def at(self, name: str, steps: int):
        rows = self.agg[(self.agg["name"] == name) & (self.agg["steps"] == steps)]
        return None if rows.empty else rows.iloc[0]


def apart(a, b, metric: str = "fid") -> bool:
    """Do two rows' 95% intervals of ``metric`` not overlap (both measured on ≥ 2 seeds)?"""
    if min(a[f"{metric}_n"], b[f"{metric}_n"]) < 2:
        return False
    lo_a, hi_a = a[f"{metric}_mean"] - a[f"{metric}_ci95"], a[f"{metric}_mean"] + a[f"{metric}_ci95"]
    lo_b, hi_b = b[f"{metric}_mean"] - b[f"{metric}_ci95"], b[f"{metric}_mean"] + b[f"{metric}_ci95"]
    return hi_a < lo_b or hi_b < lo_a


def fid_text(row) -> str:
    return T.fmt(row["fid_mean"], row["fid_ci95"], row["fid_n"], 2) or T.missing_text(row)


def against_default(ab: Ablation) -> list[str]:
    """Per non-default row of the headline table: better / worse than the default row by FID with the
    intervals apart, or within seed noise; and the paper's direction for the same pair."""
    default = ab.head[ab.head["default"]]
    if default.empty:
        return []
    d = default.iloc[0]
    lines = []
    for _, r in ab.head[~ab.head["default"]].iterrows():
        if r["fid_n"] == 0:
            lines.append(f"- {r['label']}: {T.missing_text(r)}")
            continue
        ours = "better" if r["fid_mean"] < d["fid_mean"] else "worse"
        if min(r["fid_n"], d["fid_n"]) < 2:
            verdict = "fewer than 2 seeds, no interval yet"
        elif apart(r, d):
            verdict = f"{ours} than the default, intervals apart"
        else:
            verdict = "within seed noise of the default"
        paper = ""
        if pd.notna(r["paper_fid"]) and pd.notna(d["paper_fid"]) and r["paper_fid"] != d["paper_fid"]:
            paper = f"; paper: {'better' if r['paper_fid'] < d['paper_fid'] else 'worse'}"
        lines.append(f"- {r['label']}: FID {fid_text(r)} against {fid_text(d)}: {verdict}{paper}")
    return lines


def agreement_line(ab: Ablation) -> str:
    pairs = [p for p in T.ranking_agreement(ab.head)["pairs"] if p["metric"] == "fid" and p["agree"] is not None]
    if not pairs:
        return "No pair of rows with both our FID and the paper's."
    agree = sum(p["agree"] for p in pairs)
    return f"Pairwise FID directions agreeing with the paper: {agree} of {len(pairs)}."


def table1_overview(abls: list[Ablation]) -> str:
    rows, seen = [], set()
    for ab in abls:
        table = ab.manifest.get("table", "")
        for _, r in ab.head.iterrows():
            if (table, r["label"]) in seen:  # two ablations of one paper table share their default row
                continue
            seen.add((table, r["label"]))
            multi = ab.at(r["name"], MULTI_STEP)
            rows.append(
                {
                    "Table": table,
                    "row": r["label"] + (" *" if r["default"] else ""),
                    "1-step FID ↓": fid_text(r),
                    f"{ab.align_name} ↑": T.metric_text(r, "align", 3),
                    "recall ↑": T.metric_text(r, "recall", 3),
                    "collapse": T.collapse_text(r),
                    f"{MULTI_STEP}-step FID ↓": fid_text(multi) if multi is not None else "—",
                    "paper FID / CS": f"{T.paper_number(r['paper_fid'], 1)} / {T.paper_number(r['paper_cs'], 3)}",
                    "seeds": f"{r['fid_n']}/{r['n_seeds']}",
                }
            )
    return T.to_markdown(pd.DataFrame(rows))


def direction(r, d) -> str | None:
    """A row against its table's default row, judged against the paper's direction for the same pair:
    reproduced / opposite (intervals apart), within seed noise, fewer than 2 seeds; None without a paper pair."""
    if r["fid_n"] == 0 or pd.isna(r["paper_fid"]) or pd.isna(d["paper_fid"]) or r["paper_fid"] == d["paper_fid"]:
        return None
    if min(r["fid_n"], d["fid_n"]) < 2:
        return "fewer than 2 seeds"
    if not apart(r, d):
        return "within seed noise"
    same = (r["fid_mean"] < d["fid_mean"]) == (r["paper_fid"] < d["paper_fid"])
    return "reproduced" if same else "opposite"


def table1_verdict(abls: list[Ablation]) -> list[str]:
    """How many of the paper's Table 1 directions (each row against its table's default row, by 1-step FID) are
    reproduced or opposite with 95% intervals apart, or unresolved; and how many rows are collapsed."""
    verdicts: dict[str, list[str]] = {}
    collapsed, measured, default_seen = 0, 0, False
    gaps, widths, default_width = [], [], None
    for ab in abls:
        default = ab.head[ab.head["default"]]
        for _, r in ab.head.iterrows():
            if r["recall_n"] and not (r["default"] and default_seen):  # the shared default row counts once
                default_seen |= bool(r["default"])
                measured += 1
                collapsed += bool(r["recall_mean"] < T.COLLAPSE_RECALL)
            if default.empty or r["default"]:
                continue
            v = direction(r, default.iloc[0])
            if v:
                verdicts.setdefault(v, []).append(f"{ab.manifest.get('table', '')} {r['label']}")
            if v == "within seed noise":
                gaps.append(abs(r["fid_mean"] - default.iloc[0]["fid_mean"]))
                widths.append(r["fid_ci95"])
                default_width = default.iloc[0]["fid_ci95"]
    if not verdicts:
        return []
    order = ("reproduced", "opposite", "within seed noise", "fewer than 2 seeds")
    total = sum(len(v) for v in verdicts.values())
    lines = [f"The paper's {total} directions of Table 1 (each row against its table's default, by 1-step FID):", ""]
    for name in order:
        if name in verdicts:
            lines.append(f"- {name}: {len(verdicts[name])} ({'; '.join(verdicts[name])})")
    lines += [
        "",
        f"Rows collapsed at 1 step (recall < {T.COLLAPSE_RECALL}): {collapsed} of {measured} with recall measured.",
        "",
    ]
    if gaps:
        lines += [
            f"The {len(gaps)} row(s) within seed noise: their 1-step FID is {np.median(gaps):.2f} from the default's "
            f"(median; at most {max(gaps):.2f}), while a row's 95% interval is ±{np.median(widths):.2f} (median; "
            f"the default's ±{default_width:.2f})"
            + (
                ": every row collapsed, and which modes a seed's student keeps moves its FID more than the "
                "ablated choice does."
                if collapsed == measured
                else "."
            ),
            "",
        ]
    return lines


def section(ab: Ablation, heading: str) -> list[str]:
    out = [f"### {heading}", "", f"`results/{ab.name}/table.md`. {agreement_line(ab)}", ""]
    diffs = against_default(ab)
    return out + (diffs + [""] if diffs else [])


def teacher_rows(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "teacher" / "rows").glob("*.json"))]


# Table 2's extension arm with both extension terms (ablations/methods.yaml; its weights chosen in the
# denoising_anchor probe), set against its teacher beside the paper recipe's default cell
EXTENSION_ROW = "add_reg_anchor1"
EXTENSION_HEADER = (
    "Table 2's ADD + regression + denoising anchor arm (an extension: `ablations/probes/denoising_anchor.yaml`)"
)


def equal_nfe_lines(
    root: Path, default: Ablation | None, row: str | None = None, name: str = "ADD", header: str | None = None
) -> list[str]:
    """An ADD row (``row``; None: the ablation's default row) against its own teacher at equal network
    evaluations (best teacher row with NFE ≤ the student's steps, CFG counted as two evaluations)."""
    if default is None:
        return []
    if row is None:
        d_row = default.head[default.head["default"]]
        row = str(d_row.iloc[0]["name"]) if not d_row.empty else None
    teacher = default_teacher(root, default)
    rows = [r for r in teacher_rows(root) if r.get("model") == teacher and r.get("fid") is not None]
    if row is None or not rows:
        return []
    lines, measured = [], {}
    for steps in (1, 2, MULTI_STEP):
        student = default.at(row, steps)
        best = min((r for r in rows if 0 < r["nfe"] <= steps), key=lambda r: r["fid"], default=None)
        if student is None or best is None or not student["fid_n"]:
            continue
        measured[steps] = student, best
        lines.append(
            f"- {steps} network evaluation{'s' if steps > 1 else ''}: {name} {steps}-step FID {fid_text(student)}; "
            f"{teacher_text(best, steps)}; ratio {student['fid_mean'] / best['fid']:.2f}{inside(student, best)}"
        )
    if MULTI_STEP in measured:
        steps = min(measured, key=lambda s: measured[s][0]["fid_mean"])
        student, best = measured[steps][0], measured[MULTI_STEP][1]
        if steps != MULTI_STEP:
            lines.append(
                f"- within {MULTI_STEP} network evaluations {name}'s best is its {steps}-step sampling, FID "
                f"{fid_text(student)}, against {teacher_text(best, MULTI_STEP)}: ratio "
                f"{student['fid_mean'] / best['fid']:.2f}{inside(student, best)}"
            )
    header = header or "Default cell of Table 1"
    return [f"{header} against `results/teacher` ({teacher}, DDIM, best CFG).", "", *lines] if lines else []


def inside(student, best: dict) -> str:
    """Whether the teacher's FID lies inside the student's 95% interval over seeds (one teacher measurement)."""
    if student["fid_n"] < 2:
        return ""
    within = abs(student["fid_mean"] - best["fid"]) <= student["fid_ci95"]
    return f" (the teacher's {'inside' if within else 'outside'} the student's interval)"


def teacher_text(best: dict, budget: int) -> str:
    steps = f"{best['steps']} step{'s' if best['steps'] > 1 else ''}"
    return f"the teacher's best at ≤ {budget} (DDIM {steps}, CFG {best['cfg_scale']:g}) {best['fid']:.2f}"


def teacher_references(root: Path, teacher: str) -> dict[str, float] | None:
    """A teacher's baseline rows (``results/teacher``) as the references of the ADD bars: its best FID at
    ≤ 1 and ≤ 4 network evaluations, and its best recall at 4 DDIM steps (with or without CFG)."""
    rows = [r for r in teacher_rows(root) if r.get("model") == teacher and r.get("fid") is not None]
    one = [r["fid"] for r in rows if 0 < r["nfe"] <= 1]
    four = [r["fid"] for r in rows if 0 < r["nfe"] <= MULTI_STEP]
    recall = [r["recall"] for r in rows if r["steps"] == MULTI_STEP and r.get("recall") is not None]
    if not (one and four and recall):
        return None
    return {"fid1": min(one), "fid4": min(four), "recall4": max(recall)}


def bar_checks(ref: dict[str, float], fid1: float, fid4: float, recall1: float) -> list[tuple]:
    """The ADD student's three bars against its teacher's references (``teacher_references``), each as
    (text, value, bound, "≤" | "≥", met); a value that was not measured (NaN) is not met."""
    bars = [
        ("1-step FID ≤ 0.5× the teacher's best at 1 evaluation", fid1, 0.5 * ref["fid1"], "≤"),
        ("4-step FID ≤ the teacher's best at ≤ 4 evaluations", fid4, ref["fid4"], "≤"),
        ("1-step recall ≥ 0.5× the teacher's best 4-step recall", recall1, 0.5 * ref["recall4"], "≥"),
    ]
    return [(text, v, b, op, bool(v <= b if op == "≤" else v >= b)) for text, v, b, op in bars]


def default_teacher(root: Path, ab: Ablation) -> str | None:
    """The teacher network of an ablation's default cell, read from the cell's stored config."""
    for cell in ab.df[ab.df["default"]]["id"]:
        path = root / "cells" / cell / "config.yaml"
        if path.is_file():
            return load_yaml(path)["teacher"]["network"]
    return None


def late_grad_ratio(root: Path, ab: Ablation, name: str) -> float:
    """‖∇θ L_adv‖ / ‖∇θ λ·L_distill‖ of a row's finished cells: the median over the last fifth of each cell's
    logged steps (``log.jsonl``), averaged over its seeds; NaN when no finished cell logged both terms."""
    medians = []
    for cell in ab.df[(ab.df["name"] == name) & (ab.df["status"] == "done")]["id"].unique():
        path = root / "cells" / cell / "log.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        ratios = [r["grad_ratio_adv_distill"] for r in rows if "grad_ratio_adv_distill" in r]
        if ratios:
            medians.append(float(pd.Series(ratios[-max(1, len(ratios) // 5) :]).median()))
    return sum(medians) / len(medians) if medians else float("nan")


def bars_rows(root: Path, ab: Ablation, ref: dict[str, float]) -> list[dict]:
    """Per row of an ablation: 1- and 4-step FID and recall, how many of the bars of ``ref`` it meets, the
    late gradient ratio and the seeds (``met`` is None while the row has no finished seed)."""
    rows = []
    for _, r in ab.head.iterrows():
        multi = ab.at(r["name"], MULTI_STEP)
        fid4 = multi["fid_mean"] if multi is not None else float("nan")
        met = sum(c[-1] for c in bar_checks(ref, r["fid_mean"], fid4, r["recall_mean"])) if r["fid_n"] else None
        rows.append(
            {
                "row": r["label"] + (" *" if r["default"] else ""),
                "1-step FID ↓": fid_text(r),
                "1-step recall ↑": T.metric_text(r, "recall", 3),
                f"{MULTI_STEP}-step FID ↓": fid_text(multi) if multi is not None else "—",
                f"{MULTI_STEP}-step recall ↑": T.metric_text(multi, "recall", 3) if multi is not None else "—",
                "bars met": "—" if met is None else f"{met} of 3",
                "‖∇L_adv‖ / ‖∇λL_distill‖": T.paper_number(late_grad_ratio(root, ab, r["name"]), 1),
                "seeds": f"{r['fid_n']}/{r['n_seeds']}",
                "met": met,
                "recall": r["recall_mean"],
                "default": bool(r["default"]),
            }
        )
    return rows


HIDDEN = ("met", "recall", "default")  # bars_rows' keys used for sorting, not shown


def bars_table(root: Path, ab: Ablation) -> list[str]:
    """Every row of an ablation against the bars of its default cell's teacher (1- and 4-step FID, 1-step
    recall), when that teacher has baseline rows with recall in ``results/teacher``."""
    teacher = default_teacher(root, ab)
    ref = teacher_references(root, teacher) if teacher else None
    if ref is None:
        return []
    rows = [{k: v for k, v in r.items() if k not in HIDDEN} for r in bars_rows(root, ab, ref)]
    return [
        f"Against {teacher}'s baseline in `results/teacher`, the bars are 1-step FID ≤ {0.5 * ref['fid1']:.2f}, "
        f"{MULTI_STEP}-step FID ≤ {ref['fid4']:.2f} and 1-step recall ≥ {0.5 * ref['recall4']:.4f} (means over seeds, judged unrounded); the last column is the student's "
        "gradient norm from L_adv over that from λ·L_distill late in training (median of the last fifth of the "
        "logged steps):",
        "",
        T.to_markdown(pd.DataFrame(rows)),
        "",
    ]


def probe_summary(root: Path, probes: list[Ablation]) -> list[str]:
    """The rows of every probe judged against the same teacher's bars, in one table ordered by 1-step recall
    (the bar the default cell misses by the widest margin), the default row once; and which rows meet all three."""
    by_teacher: dict[str, list[tuple[str, dict]]] = {}
    for ab in probes:
        teacher = default_teacher(root, ab)
        ref = teacher_references(root, teacher) if teacher else None
        if ref is None:
            continue
        for r in bars_rows(root, ab, ref):
            if r["met"] is not None and not (
                r["default"] and any(x["default"] for _, x in by_teacher.get(teacher, []))
            ):
                by_teacher.setdefault(teacher, []).append((ab.name, r))
    out = []
    for teacher, rows in by_teacher.items():
        rows.sort(key=lambda pr: -pr[1]["recall"] if pr[1]["recall"] == pr[1]["recall"] else 0.0)
        table = [
            {"probe": "(default)" if r["default"] else probe} | {k: v for k, v in r.items() if k not in HIDDEN}
            for probe, r in rows
        ]
        all_met = [f"{r['row']} (`{probe}`, {r['seeds']} seeds)" for probe, r in rows if r["met"] == 3]
        out += [
            f"### Every probe row on {teacher}, by 1-step recall",
            "",
            T.to_markdown(pd.DataFrame(table)),
            "",
            ("Rows meeting all three bars: " + "; ".join(all_met) + ".") if all_met else "No row meets all three bars.",
            "",
        ]
    return out


def curve_section(root: Path, folder: Path) -> list[str]:
    """One length curve (``python -m add_bench.curve``): 1- and 4-step FID and recall at each training
    length, and at the longest one the ADD student against its teacher's baseline rows."""
    from add_bench.curve import curve_frame, summarise

    teacher = json.loads((folder / "config.json").read_text())["teacher"]["network"]
    summary = summarise(curve_frame(folder))
    table = []
    for length, g in summary.groupby("length"):
        row = {"training steps": length, "seeds": int(g["n"].max())}
        for steps in (1, MULTI_STEP):
            r = g[g["steps"] == steps]
            if not r.empty:
                r = r.iloc[0]
                row[f"{steps}-step FID"] = T.fmt(r.fid_mean, r.fid_ci95, r.n, 2) or "—"
                row[f"{steps}-step recall"] = T.fmt(r.recall_mean, r.recall_ci95, r.n, 3) or "—"
        table.append(row)
    out = [f"### `{folder.name}` (teacher and student init: {teacher})", "", T.to_markdown(pd.DataFrame(table)), ""]
    ref = teacher_references(root, teacher)
    last = summary[summary["length"] == summary["length"].max()].set_index("steps")
    if ref is None or not {1, MULTI_STEP} <= set(last.index):
        return out + [f"No baseline rows of {teacher} with recall in `results/teacher`: no bars.", ""]
    checks = bar_checks(ref, last.loc[1, "fid_mean"], last.loc[MULTI_STEP, "fid_mean"], last.loc[1, "recall_mean"])
    out.append(f"At {int(summary['length'].max())} training steps, against {teacher}'s rows in `results/teacher`:")
    out.append("")
    for text, value, bound, op, met in checks:
        out.append(f"- {text}: {value:.4g} {op} {bound:.4g}? **{'met' if met else 'not met'}**")
    return out + [""]


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float, bool]:
    """Mean ± 95% CI of the per-seed difference a − b, and whether the interval excludes 0 (≥ 2 seeds)."""
    d = (a - b).dropna()
    mean, ci = float(d.mean()), T.ci95(d)
    return mean, ci, len(d) >= 2 and abs(mean) > ci


def handoff_lines(root: Path) -> list[str]:
    """The hand-off ladder (``python -m add_bench.handoff``): per row, step count and rung k, FID and recall, and the
    paired FID difference to rung k − 1 (same cell, same noise and draws): where the student's sampling loses."""
    path = root / "handoff" / "table.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    table, lines = [], []
    for (row, steps), g in df.groupby(["row", "steps"], sort=False):
        fid = g.pivot_table(index="seed", columns="k", values="fid")
        for k in sorted(fid.columns):
            r = g[g["k"] == k]
            entry = {"setting": row, "steps": steps, "rung k": k, "NFE": int(r["nfe"].iloc[0])}
            r = r.drop_duplicates("key") if "key" in r else r  # a row shared by the seeds is one measurement
            entry["FID ↓"] = T.fmt(r["fid"].mean(), T.ci95(r["fid"]), len(r), 2)
            entry["recall ↑"] = T.fmt(r["recall"].mean(), T.ci95(r["recall"]), len(r), 3)
            entry["Δ FID vs k − 1 (paired)"] = "—"
            if k > 0:
                mean, ci, sure = paired(fid[k], fid[k - 1])
                entry["Δ FID vs k − 1 (paired)"] = f"{mean:+.2f} ± {ci:.2f}" + (" *" if sure else "")
            table.append(entry)
        n = int(steps)
        steps_up = {k: paired(fid[k], fid[k - 1]) for k in range(1, n + 1)}
        worst = max(steps_up, key=lambda k: steps_up[k][0])
        mean, ci, sure = steps_up[worst]
        whole = paired(fid[n], fid[1])
        lines.append(
            f"- {row}, {n} steps: the largest paired FID rise is at rung {worst} (the student's step {worst} in "
            f"place of the teacher's): {mean:+.2f} ± {ci:.2f} ({'excludes' if sure else 'includes'} 0); the student "
            f"alone (k = {n}) against its 1-step sample finished by the teacher (k = 1): {whole[0]:+.2f} ± "
            f"{whole[1]:.2f} ({'excludes' if whole[2] else 'includes'} 0; {fid[[1, n]].dropna().shape[0]} seeds)"
        )
    return [
        *ladder_text(table, lines),
        *denoise_lines(
            root / "handoff" / "denoise.csv",
            "One-step denoising of real validation images noised to each of the student's timesteps "
            "(`results/handoff/denoise.md`; each network on its own schedule, the teacher at its training CFG): "
            "where the student's map is worse than its teacher's on real inputs. `*`: the interval excludes 0.",
        ),
    ]


# further one-step denoising tables (``python -m add_bench.handoff ... --no-ladder --out results/<folder>``): folder,
# then what its rows answer
DENOISE_STUDIES = (
    (
        "handoff_loss_terms",
        "The same one-step denoising for Table 1d's students, trained with L_adv only, λ·L_distill only and both "
        "(`results/handoff_loss_terms/denoise.md`, written by `python -m add_bench.handoff ablations/loss_terms.yaml "
        "'seeds=[0,1,2]' --cells adv_only,distill_only,both --no-ladder --out results/handoff_loss_terms`): which "
        "loss term moves the student's map away from its input. L_distill's target is the teacher's denoising of x̂θ "
        "re-noised to an independent t, so nothing in it refers to the student's input x_s. MSE to the clean image "
        "in [−1, 1]. `*`: the interval excludes 0.",
    ),
    (
        "handoff_denoising_anchor",
        "The same one-step denoising for the denoising-anchor probe (`results/handoff_denoising_anchor/denoise.md`, "
        "written by `python -m add_bench.handoff ablations/probes/denoising_anchor.yaml 'seeds=[0,1,2]' --cells "
        "reg,reg_eps16 --no-ladder --out results/handoff_denoising_anchor`): whether the student's own diffusion "
        "loss below τN keeps its low-noise map where its init's was. MSE to the clean image in [−1, 1]. `*`: the "
        "interval excludes 0.",
    ),
)


def denoise_study_lines(root: Path) -> list[str]:
    """The one-step denoising rows of each of :data:`DENOISE_STUDIES` that has been computed."""
    return [line for folder, intro in DENOISE_STUDIES for line in denoise_lines(root / folder / "denoise.csv", intro)]


def ladder_text(table: list[dict], lines: list[str]) -> list[str]:
    return [
        "`results/handoff/table.md`: rung k runs ADD's sampler with the student at its first k timesteps and its "
        "teacher (at its training CFG) at the rest, on the same noise and draws; k = steps is the student's own "
        "sampling, k = 0 the teacher alone. `*`: the paired 95% interval over seeds excludes 0.",
        "",
        T.to_markdown(pd.DataFrame(table)),
        "",
        *lines,
        "",
    ]


def denoise_lines(path: Path, intro: str) -> list[str]:
    """The one-step denoising of real images (a ``denoise.csv`` of ``python -m add_bench.handoff``): per row and
    timestep the student's FID and MSE to the clean image against its teacher's, paired over seeds."""
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    table = []
    for (row, tau), g in df.groupby(["row", "t"], sort=False):
        student, teacher = (g[g["model"] == m].set_index("seed") for m in ("student", "teacher"))
        entry = {"setting": row, "t": tau}
        for name, col, digits in (("FID", "fid", 2), ("MSE", "mse", 4)):
            mean, ci, sure = paired(student[col], teacher[col])
            entry[f"student {name}"] = T.fmt(student[col].mean(), T.ci95(student[col]), len(student), digits)
            entry[f"teacher {name}"] = f"{teacher[col].mean():.{digits}f}"
            entry[f"student − teacher {name} (paired)"] = f"{mean:+.{digits}f} ± {ci:.{digits}f}" + (
                " *" if sure else ""
            )
        if (g["model"] == "init").any():  # where the student started: the same weights, unguided
            entry["init MSE"] = f"{g[g['model'] == 'init']['mse'].mean():.4f}"
        table.append(entry)
    low = df[df["t"] == df["t"].min()]

    def mse(g: pd.DataFrame, model: str) -> float:
        return g[g["model"] == model]["mse"].mean()

    parts, ratios = [], {}
    for row, g in low.groupby("row", sort=False):
        ratios[row] = mse(g, "student") / mse(g, "teacher")
        init = f" and {mse(g, 'student') / mse(g, 'init'):.1f}× its init's" if (g["model"] == "init").any() else ""
        parts.append(f"{ratios[row]:.1f}× its teacher's{init} ({row})")
    summary = (
        f"- At the lowest timestep (t = {int(low['t'].iloc[0])}) the student's MSE to the clean image is "
        + ", ".join(parts)
        + f"; the farthest from its input: {max(ratios, key=ratios.get)}."
    )
    return [intro, "", T.to_markdown(pd.DataFrame(table)), "", summary, ""]


def compute_lines(ab: Ablation) -> list[str]:
    """Each trained method's training compute (teacher evaluations) against the default (ADD) row's."""
    default = ab.head[ab.head["default"]]
    if default.empty or not default["teacher_evals"].iloc[0] > 0:
        return []
    base = float(default["teacher_evals"].iloc[0])
    lines = []
    trained = ab.head[(ab.head["teacher_evals"] > 0) & (ab.head["teacher_evals"] != base)]
    for evals, rows in trained.groupby("teacher_evals", sort=False):  # rows of one training share its count
        labels = " / ".join(dict.fromkeys(rows["label"]))
        lines.append(
            f"- {labels}: {evals / base:.2f}× the teacher evaluations of the default ADD cell's training "
            f"({evals / 1e6:.2f}M against {base / 1e6:.2f}M): {'more' if evals > base else 'less'} compute."
        )
    if not lines:
        return [
            f"Training compute: every trained method spent the default ADD cell's {base / 1e6:.2f}M teacher "
            "evaluations (equal compute).",
            "",
        ]
    return ["Training compute (teacher network evaluations; equal compute = 1×):", "", *lines, ""]


def equal_compute_lines(ab: Ablation) -> list[str]:
    """Rows of different settings trained at the same teacher evaluations and sampled in the same number of
    steps, compared on FID and recall: which wins, and whether the 95% intervals are apart."""
    head = ab.head[(ab.head["teacher_evals"] > 0) & (ab.head["fid_n"] > 0)]
    lines = []
    for (evals, steps), rows in head.groupby(["teacher_evals", "steps"], sort=False):
        rows = rows.drop_duplicates("label")
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a, b = rows.iloc[i], rows.iloc[j]
                parts = []
                for metric, name, lower in (("fid", "FID", True), ("recall", "recall", False)):
                    if not (a[f"{metric}_n"] and b[f"{metric}_n"]):
                        continue
                    better = a if (a[f"{metric}_mean"] < b[f"{metric}_mean"]) == lower else b
                    digits = 2 if metric == "fid" else 3
                    parts.append(
                        f"{name} {T.fmt(a[f'{metric}_mean'], a[f'{metric}_ci95'], a[f'{metric}_n'], digits)} against "
                        f"{T.fmt(b[f'{metric}_mean'], b[f'{metric}_ci95'], b[f'{metric}_n'], digits)}: "
                        f"{better['label']} {'wins, intervals apart' if apart(a, b, metric) else 'ahead, intervals overlap'}"
                    )
                lines.append(
                    f"- {steps} step(s), {int(evals):,} teacher evaluations each: {a['label']} against "
                    f"{b['label']}: " + "; ".join(parts)
                )
    if not lines:
        return []
    return ["At equal training compute and equal sampling steps (mean ± 95% CI over seeds):", "", *lines, ""]


def sanity_lines(root: Path) -> list[str]:
    path = root / "metric_sanity" / "table.md"
    if not path.is_file():
        return ["Not computed: `python -m add_bench.metric_sanity --out results/metric_sanity`."]
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]  # the ladder's headline table (the other spaces: results/metric_sanity/table.md)
    checks = json.loads((root / "metric_sanity" / "ladder.json").read_text()).get("checks", {})
    monotone = checks.get("monotone", {})
    held = [k for k, ok in monotone.items() if ok]
    return table + [
        "",
        f"Metrics that order the real-image ladder correctly: {len(held)} of {len(monotone)} "
        f"({', '.join(sorted(held))}).",
    ]


def bench_lines(root: Path) -> list[str]:
    """What ``python -m add_bench.bench --profile`` and ``--against REF`` measured (``results/bench``)."""
    lines = []
    for path in sorted((root / "bench").glob("against_*.json")):
        d = json.loads(path.read_text())
        t, machine = d["timings"], d["provenance"]["machine"]
        agree = "equal" if t["loss_first_step_over_rtol"] < 0 else f"differ from step {t['loss_first_step_over_rtol']}"
        lines.append(
            f"- This tree's ADD step against {t['ref']}'s (`{path.relative_to(root.parent)}`, {t['threads']} "
            f"thread, same config, seed and batches): {t['s_per_step_current']:.3f} s against "
            f"{t['s_per_step_ref']:.3f} s, **{t['ratio_ref_to_current']:.2f}×**; the losses of every step "
            f"{agree} (largest relative difference {t['loss_max_rel_diff']:.1e}, tolerance {t['loss_rtol']:.0e}). "
            f"Load average {machine.get('load_average_1m', '?')} on {machine['cpu_count']} cores."
        )
    path = root / "bench" / "profile.json"
    if path.is_file():
        t = json.loads(path.read_text())["timings"]
        for name, label in (("add_step", "ADD step"), ("progressive_step", "progressive-distillation step")):
            shares = t[name]["op_classes"]
            text = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
            lines.append(f"- Operators of one {label} (`torch.profiler`, self time): {text}.")
        by_batch = {int(b): v for b, v in t["add_step_s_per_sample_by_batch"].items()}
        lo, hi = min(by_batch), max(by_batch)
        # time per step = fixed + per_sample·B: the fixed part is what less per-operator overhead could remove
        fixed = (by_batch[lo] - by_batch[hi]) / (1 / lo - 1 / hi)
        text = ", ".join(f"{b}: {v * 1e3:.1f} ms" for b, v in by_batch.items())
        batch = json.loads(path.read_text())["batch_size"]
        step = by_batch.get(batch, by_batch[hi]) * batch
        lines += [
            f"- ADD step time per sample by batch size ({text}): a fixed cost of {fixed * 1e3:.0f} ms per step "
            f"(per-operator overhead, what compilation or fusion could remove) is {fixed / step:.0%} of a step at "
            f"batch {batch}; the rest grows with the batch: arithmetic.",
            f"- The same step with the student, teacher and feature network under `torch.compile`: "
            f"{t['ratio_eager_to_compiled']:.2f}× the eager speed; under bf16 autocast (which also changes the "
            f"numbers): {t['ratio_fp32_to_bf16_autocast']:.2f}×.",
        ]
    path = root / "bench" / "local_layout.json"
    if path.is_file():
        t = json.loads(path.read_text())["timings"]
        cores = int(t["cores"])
        lines.append(
            f"- A local sweep's layout: {cores} one-thread workers run "
            f"{t['ratio_workers_to_threads']:.2f}× the ADD steps per second of one worker on {cores} threads."
        )
    return lines


def cluster_plan_lines(root: Path) -> list[str]:
    """What ``python -m add_bench.cost`` estimated for the cluster presets (``results/cluster_plan``)."""
    lines = []
    for path in sorted((root / "cluster_plan").glob("*.json")):
        d = json.loads(path.read_text())
        rows = [r for r in d["rows"] if not r["shared"]]
        big = max(rows, key=lambda r: r["gib"])
        unfit = sum(not r["fits"] for r in rows)
        lines.append(
            f"- `{d['provenance']['command']}`: {d['cells']} cells, **{d['gpu_hours']:.1f} GPU-hours** of training "
            f"on one {d['gpu']} each ({min(r['gpu_hours'] for r in rows):.1f}–{max(r['gpu_hours'] for r in rows):.1f} "
            f"per cell at {rows[0]['steps']} steps); the largest cell ({big['ablation']}/{big['cell']}) ≈ "
            f"{big['gib']:.1f} GiB at micro-batch {big['micro_batch']}; "
            + (f"{unfit} cell(s) do not fit." if unfit else "every cell fits.")
        )
    return lines


def status_lines(abls: list[Ablation]) -> list[str]:
    counts: dict[str, int] = {}
    seen = set()
    for ab in abls:
        for _, r in ab.df.drop_duplicates("id").iterrows():
            if r["id"] not in seen:
                seen.add(r["id"])
                counts[r["status"]] = counts.get(r["status"], 0) + 1
    text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return [
        f"Cells (training runs × seeds) behind these tables: {len(seen)} ({text}). A *stale* cell was computed "
        "on teacher, feature or evaluation weights that have changed since; its numbers are left out."
    ]


def report(root: str | Path = "results") -> str:
    root = Path(root)
    found = {p.name: p for p in T.ablation_dirs(root)}
    abls = {name: Ablation.read(path) for name, path in found.items()}
    table1 = [abls[n] for n in TABLE1 if n in abls]
    probes = [ab for n, ab in sorted(abls.items()) if n not in TABLE1 and n != METHODS]
    out = [
        "# Findings on the embedded benchmark",
        "",
        "Generated by `python -m add_bench.tables --report` from the committed `results/`; the test suite fails "
        "when this file differs from what that command writes. Change the generator (`add_bench/findings.py`) "
        "or the results, never this file. Mean ± 95% CI over seeds (t-distribution); `*` = the paper's default "
        "row; FID and alignment in the evaluation network's space, recall and per-class metrics in the "
        "self-supervised embedding (`results/metric_sanity` shows what each scores on real and collapsed "
        "generators); the paper's numbers are COCO FID / CLIP score of ADD-M on SD2.1: compare directions.",
        "",
        *status_lines(list(abls.values())),
        "",
        "## Table 1: the ablations",
        "",
        table1_overview(table1),
        "",
        *table1_verdict(table1),
    ]
    for ab in table1:
        out += section(ab, ab.title)
    lines: list[str] = []
    for block in (
        equal_nfe_lines(root, abls.get("loss_weighting")),
        equal_nfe_lines(root, abls.get(METHODS), EXTENSION_ROW, "the extension", EXTENSION_HEADER),
    ):
        lines += ([""] if lines and block else []) + block
    if lines:
        out += [
            "## The ADD student against its own teacher at equal network evaluations",
            "",
            *lines,
            "",
        ]
    if METHODS in abls:
        ab = abls[METHODS]
        out += [
            "## Table 2: methods on equal terms",
            "",
            T.to_markdown(T.headline_table(ab.head, ab.align_name, ab.manifest.get("paper_metric_names") or {})),
            "",
            *compute_lines(ab),
            *equal_compute_lines(ab),
        ]
    lines = handoff_lines(root) + denoise_study_lines(root)
    if lines:
        out += ["## Where the student's multi-step sampling loses: the hand-off ladder", "", *lines]
    if probes:
        out += ["## Probes (not paper tables)", ""]
        for ab in probes:
            out += section(ab, ab.title) + bars_table(root, ab)
        out += probe_summary(root, probes)
    curves = sorted(p for p in root.glob("length_curve*") if (p / "config.json").is_file())
    if curves:
        out += ["## Quality against ADD training length", ""]
        for folder in curves:
            out += curve_section(root, folder)
    out += ["## Metric sanity ladder", "", *sanity_lines(root), ""]
    lines = cluster_plan_lines(root)
    if lines:
        out += [
            "## Cluster scale: estimated cost (`python -m add_bench.cost`)",
            "",
            "Estimated from the architecture configs of SD2.1 and SDXL (`add_bench/presets/model_configs`) with "
            "`add_bench.memory` (activations and FLOPs measured on the meta device, a per-GPU throughput table); "
            "nothing here has run on a GPU. Evaluation is not included; one seed.",
            "",
            *lines,
            "",
        ]
    lines = bench_lines(root)
    if lines:
        out += ["## Where the time goes (`python -m add_bench.bench`)", "", *lines, ""]
    return "\n".join(out)


def write_report(root: str | Path = "results", out: str | Path = "docs/findings.md") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, report(root))
    return out

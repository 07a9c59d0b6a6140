"""docs/findings.md is generated from results/ (add_bench.findings) and must be current."""

import json

import pandas as pd

from add_bench import findings
from add_bench.provenance import REPO_ROOT


def row(mean, ci, n, label="x", default=False, paper=None):
    return pd.Series(
        {
            "fid_mean": mean,
            "fid_ci95": ci,
            "fid_n": n,
            "label": label,
            "default": default,
            "paper_fid": paper,
            "status": "done",
        }
    )


def test_intervals_apart_needs_two_seeds_and_no_overlap():
    assert findings.apart(row(10.0, 1.0, 3), row(12.5, 1.0, 3))
    assert not findings.apart(row(10.0, 1.5, 3), row(12.5, 1.5, 3))  # 11.5 ≥ 11.0: they overlap
    assert not findings.apart(row(10.0, 0.0, 1), row(20.0, 0.0, 3))  # one seed: no interval


def test_rows_are_judged_against_the_default_row_and_the_papers_direction():
    head = pd.DataFrame(
        [
            row(15.0, 0.5, 3, "default", True, 20.0),
            row(20.0, 0.5, 3, "worse", paper=25.0),
            row(15.2, 2.0, 3, "same", paper=18.0),
        ]
    )
    ab = findings.Ablation("a", {}, pd.DataFrame(), pd.DataFrame(), head, "align. prob")
    lines = findings.against_default(ab)
    assert lines[0].startswith(
        "- worse: FID 20.00 ± 0.50 against 15.00 ± 0.50: worse than the default, intervals apart; paper: worse"
    )
    assert lines[1].endswith("within seed noise of the default; paper: better")


def test_committed_findings_equal_what_the_report_command_writes(tmp_path, capsys):
    from add_bench.tables import main

    out = tmp_path / "findings.md"
    assert main(["--report", "--results", str(REPO_ROOT / "results"), "--report-out", str(out)]) == 0
    assert out.read_text() == (REPO_ROOT / "docs" / "findings.md").read_text(), (
        "docs/findings.md is out of date: run `python -m add_bench.tables --report`"
    )
    assert main(["--report", "--results", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_table2_states_each_methods_training_compute_against_adds():
    head = pd.DataFrame(
        {
            "label": ["DPM-Solver", "PD", "CFG-aware", "ADD", "ADD"],
            "default": [False, False, False, True, False],
            "teacher_evals": [0, 256000, 256000, 115200, 115200],
        }
    )
    ab = findings.Ablation("methods", {}, pd.DataFrame(), pd.DataFrame(), head, "align. prob")
    lines = [x for x in findings.compute_lines(ab) if x.startswith("- ")]
    assert lines == [
        "- PD / CFG-aware: 2.22× the teacher evaluations of the default ADD cell's training (0.26M against 0.12M): "
        "more compute."
    ]
    equal = head.assign(teacher_evals=[0, 115200, 115200, 115200, 115200])
    (line, _) = findings.compute_lines(findings.Ablation("methods", {}, pd.DataFrame(), pd.DataFrame(), equal, ""))
    assert line.endswith("spent the default ADD cell's 0.12M teacher evaluations (equal compute).")


def test_a_length_curve_is_judged_by_the_bars_against_its_own_teachers_rows(tmp_path):
    import json

    teacher_dir, curve_dir = tmp_path / "teacher" / "rows", tmp_path / "length_curve_x" / "rows"
    teacher_dir.mkdir(parents=True)
    curve_dir.mkdir(parents=True)
    teacher = [(1, 1, 1, 26.0, 0.002), (4, 1, 4, 5.3, 0.51), (2, 2, 4, 6.1, 0.13), (4, 2, 8, 2.4, 0.39)]
    for steps, cfg, nfe, fid, recall in teacher:
        row = {"model": "t", "steps": steps, "cfg_scale": cfg, "nfe": nfe, "fid": fid, "recall": recall}
        (teacher_dir / f"t_{steps}_{cfg}.json").write_text(json.dumps(row))
    (teacher_dir / "other.json").write_text(json.dumps({**row, "model": "u", "fid": 0.1}))  # another teacher
    (tmp_path / "length_curve_x" / "config.json").write_text(json.dumps({"teacher": {"network": "t"}}))
    for length, fid1, rec1 in ((600, 14.0, 0.01), (1200, 12.0, 0.30)):
        rows = [{"steps": 1, "fid": fid1, "recall": rec1}, {"steps": 4, "fid": 6.0, "recall": 0.2}]
        (curve_dir / f"seed0_{length}steps.json").write_text(json.dumps({"length": length, "seed": 0, "rows": rows}))
    lines = findings.curve_section(tmp_path, tmp_path / "length_curve_x")
    bars = [x for x in lines if x.startswith("- ")]
    assert bars == [
        "- 1-step FID ≤ 0.5× the teacher's best at 1 evaluation: 12 ≤ 13? **met**",
        "- 4-step FID ≤ the teacher's best at ≤ 4 evaluations: 6 ≤ 5.3? **not met**",
        "- 1-step recall ≥ 0.5× the teacher's best 4-step recall: 0.3 ≥ 0.255? **met**",
    ]


def test_a_probe_is_judged_by_the_bars_of_its_default_cells_teacher_with_the_late_gradient_ratio(tmp_path):
    import json

    teacher_dir = tmp_path / "teacher" / "rows"
    teacher_dir.mkdir(parents=True)
    for steps, nfe, fid, recall in ((1, 1, 26.0, 0.002), (4, 4, 5.3, 0.5)):
        row_ = {"model": "t", "steps": steps, "cfg_scale": 1, "nfe": nfe, "fid": fid, "recall": recall}
        (teacher_dir / f"t_{steps}.json").write_text(json.dumps(row_))
    for cell, ratios in (("c_default", [30.0] * 8 + [10.0, 12.0]), ("c_other", [1.0, 3.0])):
        (tmp_path / "cells" / cell).mkdir(parents=True)
        (tmp_path / "cells" / cell / "config.yaml").write_text("teacher: {network: t}\n")
        log = [{"step": 10 * i, "grad_ratio_adv_distill": r} for i, r in enumerate(ratios)] + [{"step": 99}]
        (tmp_path / "cells" / cell / "log.jsonl").write_text("\n".join(json.dumps(x) for x in log))

    def agg_row(name, steps, fid, recall, default):
        return {
            "name": name, "label": name, "default": default, "steps": steps, "status": "done", "n_seeds": 1,
            "fid_mean": fid, "fid_ci95": 0.0, "fid_n": 1,
            "recall_mean": recall, "recall_ci95": 0.0, "recall_n": 1,
        }  # fmt: skip

    agg = pd.DataFrame(
        [
            agg_row("default", 1, 12.0, 0.0, True),
            agg_row("default", 4, 7.0, 0.1, True),
            agg_row("other", 1, 12.5, 0.3, False),
            agg_row("other", 4, 5.0, 0.6, False),
        ]
    )
    df = pd.DataFrame(
        {"name": ["default", "other"], "default": [True, False], "id": ["c_default", "c_other"], "status": "done"}
    )
    ab = findings.Ablation("p", {}, df, agg, agg[agg["steps"] == 1], "align. prob")
    assert findings.default_teacher(tmp_path, ab) == "t"
    assert findings.late_grad_ratio(tmp_path, ab, "default") == 11.0  # the median of the last fifth (10, 12)
    lines = findings.bars_table(tmp_path, ab)
    assert "1-step FID ≤ 13.00, 4-step FID ≤ 5.30 and 1-step recall ≥ 0.2500" in lines[0]
    table = lines[2].splitlines()
    assert table[2].split("|")[6:8] == [" 1 of 3     ", "                         11 "]
    assert table[3].split("|")[6:8] == [" 3 of 3     ", "                          3 "]  # 2 rows: the last
    summary = findings.probe_summary(tmp_path, [ab, ab])  # two probes sharing the default cell
    rows = [line for line in summary[2].splitlines()[2:]]
    assert len(rows) == 3  # the default row once, then each probe's other row
    assert [r.split("|")[2].strip() for r in rows] == ["other", "other", "default *"]  # by 1-step recall
    assert summary[4] == "Rows meeting all three bars: other (`p`, 1/1 seeds); other (`p`, 1/1 seeds)."


def test_rows_at_equal_compute_and_steps_are_compared_on_fid_and_recall():
    def r(label, evals, steps, fid, fid_ci, recall, recall_ci):
        return {
            "label": label,
            "teacher_evals": evals,
            "steps": steps,
            **{"fid_mean": fid, "fid_ci95": fid_ci, "fid_n": 3},
            **{"recall_mean": recall, "recall_ci95": recall_ci, "recall_n": 3},
        }

    head = pd.DataFrame(
        [
            r("PD", 38400, 1, 9.8, 0.3, 0.17, 0.01),
            r("ADD", 38400, 1, 11.6, 3.7, 0.003, 0.006),
            r("ADD", 38400, 4, 4.9, 1.9, 0.2, 0.1),  # no other row at 4 steps: no comparison
            r("ADD+reg", 79360, 1, 4.6, 0.2, 0.40, 0.01),
            r("DPM", 0, 1, 5.0, 0.0, 0.5, 0.0),  # not trained: not compared
        ]
    )
    lines = findings.equal_compute_lines(findings.Ablation("methods", {}, pd.DataFrame(), pd.DataFrame(), head, ""))
    assert [x for x in lines if x.startswith("- ")] == [
        "- 1 step(s), 38,400 teacher evaluations each: PD against ADD: FID 9.80 ± 0.30 against 11.60 ± 3.70: "
        "PD ahead, intervals overlap; recall 0.170 ± 0.010 against 0.003 ± 0.006: PD wins, intervals apart"
    ]


def test_table1_directions_are_counted_against_the_paper_with_intervals():
    def r(label, mean, ci, n, paper, recall, default=False):
        return {**row(mean, ci, n, label, default, paper), "recall_mean": recall, "recall_n": n}

    head = pd.DataFrame(
        [
            r("default", 10.0, 0.5, 3, 20.0, 0.001, default=True),
            r("as paper", 14.0, 0.5, 3, 25.0, 0.3),  # worse, paper worse, apart: reproduced
            r("against", 7.0, 0.5, 3, 22.0, 0.001),  # better, paper worse, apart: opposite
            r("noise", 10.4, 1.0, 3, 18.0, 0.001),
            r("one seed", 12.0, 0.0, 1, 30.0, 0.001),
            r("no paper", 5.0, 0.1, 3, None, 0.001),
        ]
    )
    ab = findings.Ablation("a", {"table": "1x"}, pd.DataFrame(), pd.DataFrame(), head, "")
    lines = findings.table1_verdict([ab])
    assert lines[0].startswith("The paper's 4 directions of Table 1")
    assert "- reproduced: 1 (1x as paper)" in lines and "- opposite: 1 (1x against)" in lines
    assert "- within seed noise: 1 (1x noise)" in lines and "- fewer than 2 seeds: 1 (1x one seed)" in lines
    assert "Rows collapsed at 1 step (recall < 0.2): 5 of 6 with recall measured." in lines
    # the one row within noise: 0.4 from the default, its interval ±1.0, the default's ±0.5; not all collapsed
    assert (
        "The 1 row(s) within seed noise: their 1-step FID is 0.40 from the default's (median; at most 0.40), while "
        "a row's 95% interval is ±1.00 (median; the default's ±0.50)."
    ) in lines
    twice = findings.table1_verdict([ab, ab])  # two tables sharing the default row count it once
    assert "Rows collapsed at 1 step (recall < 0.2): 9 of 11 with recall measured." in twice


def test_the_student_against_its_teacher_within_a_budget_of_network_evaluations(tmp_path):
    """Each step count against the teacher's best at ≤ as many evaluations, and the student's best sampling
    within 4 when fewer steps beat its own 4-step sampling; the teacher's value inside or outside the interval."""
    (tmp_path / "cells" / "c0").mkdir(parents=True)
    (tmp_path / "cells" / "c0" / "config.yaml").write_text("teacher: {network: tt}\n")
    (tmp_path / "teacher" / "rows").mkdir(parents=True)
    for steps, cfg, nfe, fid in ((1, 1.0, 1, 30.0), (2, 1.0, 2, 10.0), (4, 1.0, 4, 4.0), (4, 2.0, 8, 2.0)):
        entry = {"model": "tt", "steps": steps, "cfg_scale": cfg, "nfe": nfe, "fid": fid}
        (tmp_path / "teacher" / "rows" / f"tt_{steps}_{cfg}.json").write_text(json.dumps(entry))
    agg = pd.DataFrame(
        [
            {**row(m, ci, 3, "d", True), "name": "d", "steps": s}
            for s, m, ci in ((1, 12.0, 4.0), (2, 3.5, 1.0), (4, 5.0, 0.5))
        ]
    )
    df = pd.DataFrame([{"default": True, "id": "c0"}])
    ab = findings.Ablation("loss_weighting", {}, df, agg, agg[agg["steps"] == 1], "")
    lines = [x for x in findings.equal_nfe_lines(tmp_path, ab) if x.startswith("- ")]
    assert lines == [
        "- 1 network evaluation: ADD 1-step FID 12.00 ± 4.00; the teacher's best at ≤ 1 (DDIM 1 step, CFG 1) 30.00; "
        "ratio 0.40 (the teacher's outside the student's interval)",
        "- 2 network evaluations: ADD 2-step FID 3.50 ± 1.00; the teacher's best at ≤ 2 (DDIM 2 steps, CFG 1) "
        "10.00; ratio 0.35 (the teacher's outside the student's interval)",
        "- 4 network evaluations: ADD 4-step FID 5.00 ± 0.50; the teacher's best at ≤ 4 (DDIM 4 steps, CFG 1) "
        "4.00; ratio 1.25 (the teacher's outside the student's interval)",
        "- within 4 network evaluations ADD's best is its 2-step sampling, FID 3.50 ± 1.00, against the teacher's "
        "best at ≤ 4 (DDIM 4 steps, CFG 1) 4.00: ratio 0.88 (the teacher's inside the student's interval)",
    ]
    # a named row (Table 2's extension arm) under its own name and header
    agg = pd.concat([agg, agg.assign(name="x", fid_mean=agg["fid_mean"] - 2.0, default=False)])
    ab = findings.Ablation("methods", {}, df, agg, agg[agg["steps"] == 1], "")
    named = findings.equal_nfe_lines(tmp_path, ab, row="x", name="the extension", header="Arm x")
    assert named[0] == "Arm x against `results/teacher` (tt, DDIM, best CFG)."
    assert named[-1].startswith("- within 4 network evaluations the extension's best is its 2-step sampling, FID 1.50")

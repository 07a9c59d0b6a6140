"""The hand-off ladder: student at its first k sampling steps, teacher at the rest, on the same noise."""

import copy
import json

import pandas as pd
import pytest
import torch
from test_sweep import ablation_file, env, tiny_preset  # noqa: F401 (env is a fixture)

from add_bench import handoff, sweep
from add_bench.diffusion import sample_add
from add_bench.errors import ConfigError
from add_bench.evaluate import load_denoiser


def two_denoisers(assets):
    teacher, _ = load_denoiser(assets["teacher"])
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def draw(sampler, denoiser, steps, cfg_scale=1.0):
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((6, 1, 28, 28), generator=gen)
    return sampler(denoiser, noise, torch.arange(6) % 10, steps, cfg_scale, gen)


def test_the_end_rungs_are_the_student_and_the_teacher_on_adds_sampler(tiny_assets):
    student, teacher = two_denoisers(tiny_assets)
    own = draw(sample_add, student, 4)
    assert torch.equal(draw(handoff.handoff_sampler(teacher, 1.5, 4), student, 4), own)
    assert torch.equal(draw(handoff.handoff_sampler(teacher, 1.5, 0), student, 4), draw(sample_add, teacher, 4, 1.5))
    mixed = draw(handoff.handoff_sampler(teacher, 1.5, 1), student, 4)
    assert not torch.equal(mixed, own) and not torch.equal(mixed, draw(sample_add, teacher, 4, 1.5))
    with pytest.raises(ConfigError, match="accepted 0..2"):
        draw(handoff.handoff_sampler(teacher, 1.5, 3), student, 2)
    assert handoff.rung_nfe(4, 1, 1.5) == 7 and handoff.rung_nfe(4, 4, 1.5) == 4 and handoff.rung_nfe(4, 0, 1.0) == 4


def test_ladder_of_a_finished_cell_reproduces_its_evaluation_and_resumes(tiny_assets, env):  # noqa: F811
    preset = tiny_preset(tiny_assets, env, **{"teacher.cfg_scale": 1.5, "data.val_size": 60})
    abl = ablation_file(env, preset, cells=[{"name": "exp", "default": True}])
    out, ladder = env / "out", env / "handoff"
    assert handoff.main([str(abl), "--cells", "exp", "--root", str(out), "--out", str(ladder)]) == 2  # not run yet
    sweep.run_sweep(sweep.load_ablations(abl), out)
    args = [str(abl), "--cells", "exp", "--root", str(out), "--out", str(ladder), "--steps", "2", "--threads", "1"]
    assert handoff.main(args) == 0
    df = pd.read_csv(ladder / "table.csv")
    assert sorted(df["k"]) == [0, 1, 2] and list(df.sort_values("k")["nfe"]) == [4, 3, 2]
    own = df[df["k"] == 2].iloc[0]
    assert own["fid"] == own["cell_fid"]  # the same noise and draws as the sweep's own evaluation
    assert df[df["k"] == 1]["fid"].iloc[0] != own["fid"]
    rows = sorted((ladder / "rows").glob("*.json"))
    assert len(rows) == 3 + 3 * 4  # the ladder; student, teacher and init denoising at each of the 4 timesteps
    teacher_alone = [json.loads(p.read_text()) for p in rows if json.loads(p.read_text())["spec"].get("k") == 0]
    assert teacher_alone[0]["spec"]["student"] is None and teacher_alone[0]["provenance"]["git_commit"]
    den = pd.read_csv(ladder / "denoise.csv")
    assert sorted(zip(den["model"], den["t"])) == sorted(
        (m, t) for m in ("student", "teacher", "init") for t in (999, 749, 499, 249)
    )
    by = den.set_index(["model", "t"])
    assert by.loc[("teacher", 249), "mse"] < by.loc[("teacher", 999), "mse"]  # less noise, closer to the clean image
    assert by.loc[("teacher", 249), "nfe"] == 2 and by.loc[("student", 249), "nfe"] == 1  # teacher at CFG 1.5
    assert by.loc[("init", 249), "nfe"] == 1  # the student's starting weights (the teacher's), unguided
    table = [line for line in (ladder / "denoise.md").read_text().splitlines() if line.startswith("| exp ")]
    assert len(table) == 4  # one line per timestep
    stamps = [p.stat().st_mtime_ns for p in rows]
    assert handoff.main(args) == 0  # a re-run scores nothing again
    assert [p.stat().st_mtime_ns for p in rows] == stamps
    assert "largest |FID difference| 0 over 1 cell" in (ladder / "table.md").read_text()
    only = env / "denoise_only"
    args = [str(abl), "--cells", "exp", "--root", str(out), "--out", str(only), "--threads", "1"]
    assert handoff.main([*args, "--no-ladder"]) == 0
    assert len(list((only / "rows").glob("*.json"))) == 3 * 4 and not (only / "table.md").exists()
    assert pd.read_csv(only / "denoise.csv").equals(den)  # the same rows, scored again in another folder
    assert handoff.main([*args, "--no-ladder", "--no-denoise"]) == 2


def test_bad_rows_are_refused_by_name(tiny_assets, env, capsys):  # noqa: F811
    preset = tiny_preset(tiny_assets, env)
    abl = ablation_file(
        env, preset, cells=[{"name": "exp", "default": True}, {"name": "t", "set": {"method": "teacher"}}]
    )
    assert handoff.main([str(abl), "--cells", "nope", "--root", str(env)]) == 2
    assert "--cells nope: no such row" in capsys.readouterr().err
    assert handoff.main([str(abl), "--cells", "t", "--root", str(env)]) == 2
    assert "method 'teacher'" in capsys.readouterr().err
    assert handoff.main([str(abl), "--cells", "exp", "--root", str(env)]) == 2
    assert "is not finished" in capsys.readouterr().err


def test_findings_read_the_ladder_as_paired_differences(tmp_path):
    from add_bench.findings import handoff_lines

    assert handoff_lines(tmp_path) == []  # no ladder: no section
    rows = []
    for seed, shift in enumerate((0.0, 0.1, -0.1)):
        for k, fid in enumerate((3.2, 3.0, 3.5, 4.2, 5.3)):  # k = 0..4: the loss grows with the student's steps
            shift, key = (0.0, "teacher") if k == 0 else (shift, f"{seed}-{k}")  # k = 0: one row for every seed
            rows.append(
                {"row": "ADD", "seed": seed, "key": key, "steps": 4, "k": k, "nfe": 8 - k, "fid": fid + shift}
                | {"recall": 0.5}
            )
    (tmp_path / "handoff").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "handoff" / "table.csv", index=False)
    text = "\n".join(handoff_lines(tmp_path))
    assert "| ADD       |       4 |        2 |" in text and "+0.50 ± 0.00 *" in text  # k = 2 against k = 1
    assert "| ADD       |       4 |        0 |     8 | 3.20 (n=1)  |" in text  # the shared row counts once
    assert (
        "ADD, 4 steps: the largest paired FID rise is at rung 4 (the student's step 4 in place of the teacher's): "
        "+1.10 ± 0.00 (excludes 0); the student alone (k = 4) against its 1-step sample finished by the teacher "
        "(k = 1): +2.30 ± 0.00 (excludes 0; 3 seeds)"
    ) in text


def test_findings_compare_the_students_denoising_with_its_teachers(tmp_path):
    from add_bench.findings import denoise_lines

    rows = [{"row": "ADD", "seed": s, "t": 249, "model": "teacher", "fid": 1.0, "mse": 0.03} for s in range(3)]
    rows += [
        {"row": "ADD", "seed": s, "t": 249, "model": "student", "fid": 3.0 + 0.1 * s, "mse": 0.03 + 0.001 * (s - 1)}
        for s in range(3)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "denoise.csv", index=False)
    text = denoise_lines(tmp_path / "denoise.csv", "intro")
    assert text[0] == "intro"
    table = (line.split("|") for line in "\n".join(text).splitlines())
    [line] = [cells for cells in table if len(cells) > 2 and cells[1].strip() == "ADD"]
    assert [c.strip() for c in line[2:-1]] == [
        "249",
        "3.10 ± 0.25",
        "1.00",
        "+2.10 ± 0.25 *",  # FID worse, the interval excludes 0
        "0.0300 ± 0.0025",
        "0.0300",
        "+0.0000 ± 0.0025",  # MSE within noise
    ]
    assert (
        "- At the lowest timestep (t = 249) the student's MSE to the clean image is 1.0× its teacher's (ADD)"
        in (text[-2])
    )
    rows += [{"row": "ADD", "seed": s, "t": 249, "model": "init", "fid": 1.5, "mse": 0.015} for s in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "denoise.csv", index=False)  # the weights the student started from
    text = denoise_lines(tmp_path / "denoise.csv", "intro")
    assert "init MSE |" in text[2] and text[2].splitlines()[-1].rstrip(" |").endswith("0.0150")
    assert "2.0× its init's (ADD)" in text[-2]
    assert denoise_lines(tmp_path / "none.csv", "intro") == []

"""Table 2's methods: progressive distillation (equations, stages, resume), the teacher sampled as is,
and a method-comparison sweep whose rows each report their own step count."""

import json

import pytest
import torch
from conftest import tiny_train_overrides
from test_sweep import ablation_file, env, tiny_preset  # noqa: F401 (fixture)

from add_bench import checkpoint, methods, progressive, sweep
from add_bench.config import ScheduleConfig, TrainConfig, load
from add_bench.diffusion import Schedule, ddim_step, eps_from_x0
from add_bench.errors import ConfigError
from add_bench.losses import progressive_loss, progressive_target, truncated_snr_weight
from add_bench.networks.unets import weights_file


def cfg_for(assets, **extra):
    return load(TrainConfig, overrides=tiny_train_overrides(assets, **extra))


def test_progressive_target_is_the_x0_whose_one_ddim_step_lands_on_the_teachers_two():
    schedule = Schedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    t, s = torch.tensor([999, 749, 249, 249]), torch.tensor([499, 499, 124, -1])
    z_t, z_next = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    x = progressive_target(z_t, z_next, a_t, s_t, a_s, s_s)
    # the student's DDIM step with x̂0 = x̃: z_s = α_s·x̃ + σ_s·ε̂(z_t, x̃)
    torch.testing.assert_close(ddim_step(x, eps_from_x0(z_t, x, a_t, s_t), a_s, s_s), z_next, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x[3], z_next[3])  # last step (s = clean): the target is the teacher's result


def test_truncated_snr_weighting():
    alpha, sigma = torch.tensor([0.0, 0.6, 0.8, 0.99]), torch.tensor([1.0, 0.8, 0.6, (1 - 0.99**2) ** 0.5])
    w = truncated_snr_weight(alpha, sigma)
    torch.testing.assert_close(w[:2], torch.ones(2))  # SNR ≤ 1 → 1
    torch.testing.assert_close(w[2:], alpha[2:] ** 2 / sigma[2:] ** 2)
    x, y = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    torch.testing.assert_close(progressive_loss(x, y, alpha, sigma), w.mean())


def test_stage_plan_and_nested_timesteps(tiny_assets):
    cfg = cfg_for(
        tiny_assets, **{"progressive.start_steps": 8, "progressive.guided_steps": 5, "progressive.steps_per_stage": 3}
    )
    plan = progressive.stages(cfg)
    assert [(s.name, s.student_steps, s.start, s.end) for s in plan] == [
        ("guided", 8, 0, 5),
        ("halving", 4, 5, 8),
        ("halving", 2, 8, 11),
        ("halving", 1, 11, 14),
    ]
    schedule = Schedule(ScheduleConfig())
    t, mid, nxt = progressive.stage_timesteps(schedule, plan[1])
    assert t.tolist() == [999, 749, 499, 249] and mid.tolist() == [874, 624, 374, 124]
    assert nxt.tolist() == [749, 499, 249, -1]
    t, mid, nxt = progressive.stage_timesteps(schedule, plan[3])
    assert (t.tolist(), mid.tolist(), nxt.tolist()) == ([999], [499], [-1])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"progressive.start_steps": 6}, "progressive.start_steps=6: must be a power of two"),
        ({"eval_steps": [1, 3]}, r"eval_steps=\[1, 3\]: method=progressive has students for \[1, 2, 4, 8\]"),
        ({"progressive.guided_steps": -1}, "progressive.guided_steps=-1"),
    ],
)
def test_progressive_config_errors(tiny_assets, override, message):
    from add_bench.methods import validate

    cfg = cfg_for(tiny_assets, method="progressive", **override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"method": "consistency"}, "method='consistency': unknown; accepted: add, progressive, teacher"),
        (
            {"method": "teacher", "sampling.sampler": "euler"},
            "sampling.sampler='euler': unknown; accepted: add, ddim, dpm_solver",
        ),
    ],
)
def test_method_errors_name_the_key(tiny_assets, override, message):
    from add_bench.methods import validate

    with pytest.raises(ConfigError, match=message):
        validate(cfg_for(tiny_assets, **override))


def pd_cfg(assets):
    return cfg_for(
        assets,
        method="progressive",
        batch_size=4,
        ckpt_every=1,
        eval_steps=[1, 2, 4],
        **{
            "progressive.start_steps": 4,
            "progressive.guided_steps": 2,
            "progressive.steps_per_stage": 2,
            "progressive.warmup_steps": 1,
        },
    )


def test_progressive_run_exports_a_student_per_stage_and_each_learns_from_the_last(tiny_assets, tmp_path):
    cfg = pd_cfg(tiny_assets)
    out = progressive.train_progressive(cfg, tmp_path / "pd", progress=False)
    assert sorted(out) == [1, 2, 4]
    cards = {s: json.loads((f / "card.json").read_text()) for s, f in out.items()}
    assert [cards[s]["steps"] for s in (4, 2, 1)] == [2, 4, 6]  # stage ends: guided 0–2, halvings 2–4, 4–6
    assert cards[4]["stage"] == "guided" and cards[1]["sampling_steps"] == 1
    rows = [json.loads(line) for line in (tmp_path / "pd" / "log.jsonl").read_text().splitlines()]
    assert [r["student_steps"] for r in rows] == [4, 4, 2, 2, 1, 1] and all(r["loss"] > 0 for r in rows)
    # each stage's student moved away from the teacher it started from
    from add_bench.networks.unets import load_state

    teacher = load_state(tiny_assets["teacher"])
    states = {s: load_state(f) for s, f in out.items()}
    for a, b in ((teacher, states[4]), (states[4], states[2]), (states[2], states[1])):
        assert any(not torch.equal(a[k].float(), b[k].float()) for k in a)


def test_progressive_resumed_run_equals_uninterrupted(tiny_assets, tmp_path):
    cfg = pd_cfg(tiny_assets)
    full = progressive.train_progressive(cfg, tmp_path / "full", progress=False)
    steps = []
    while (out := progressive.train_progressive(cfg, tmp_path / "part", budget_minutes=1e-9, progress=False)) is None:
        steps.append(checkpoint.load(tmp_path / "part")["step"])
    assert steps == [1, 2, 3, 4, 5]  # stopped (and resumed) inside every stage and at every boundary
    for s in full:
        assert weights_file(full[s]).read_bytes() == weights_file(out[s]).read_bytes(), s
    assert len((tmp_path / "part" / "log.jsonl").read_text().splitlines()) == 6


def test_a_method_comparison_sweep(tiny_assets, env):  # noqa: F811 (pytest fixture)
    """Teacher rows (DDIM with CFG, DPM-Solver), progressive distillation and ADD in one ablation file,
    each row at its own step count; rows that share a config are one cell."""
    preset = tiny_preset(tiny_assets, env)
    pd = {
        "method": "progressive",
        "eval_steps": [1, 2, 4],
        "progressive.start_steps": 4,
        "progressive.guided_steps": 2,
        "progressive.steps_per_stage": 2,
        "progressive.warmup_steps": 1,
    }
    dpm = {"method": "teacher", "sampling.sampler": "dpm_solver", "eval_steps": [2, 4]}
    cells = [
        {
            "name": "ddim",
            "label": "DDIM, CFG 2",
            "steps": 4,
            "set": {"method": "teacher", "sampling.cfg_scale": 2.0, "eval_steps": [4]},
        },
        {
            "name": "dpm4",
            "label": "DPM-Solver",
            "steps": 4,
            "paper": {"fid": 20.1, "cs": 0.318, "time": 0.88},
            "set": dpm,
        },
        {
            "name": "dpm2",
            "label": "DPM-Solver",
            "steps": 2,
            "paper": {"fid": 31.7, "cs": 0.320, "time": 0.34},
            "set": dpm,
        },
        {"name": "pd1", "label": "PD", "steps": 1, "set": pd},
        {"name": "pd4", "label": "PD guided stage", "steps": 4, "set": pd},
        {"name": "add", "label": "ADD", "steps": 1, "default": True, "paper": {"fid": 19.7, "cs": 0.326, "time": 0.09}},
    ]
    path = ablation_file(env, preset, name="methods", cells=cells)
    (abl,) = sweep.load_ablations(path)
    assert len({c.id for c in abl.cells}) == 4  # ddim, dpm, pd, add
    out = env / "results"
    sweep.run_sweep([abl], out)
    ids = {c.name: c.id for c in abl.cells}
    metrics = {n: json.loads((out / "cells" / i / "metrics.json").read_text()) for n, i in ids.items()}
    assert [(r["steps"], r["sampler"], r["nfe"]) for r in metrics["ddim"]["rows"]] == [(4, "ddim", 8)]  # CFG: 2 NFE
    assert [(r["steps"], r["sampler"]) for r in metrics["dpm4"]["rows"]] == [(2, "dpm_solver"), (4, "dpm_solver")]
    assert metrics["ddim"]["train"]["steps"] == 0 and metrics["pd1"]["train"]["steps"] == 6
    assert [(r["steps"], r["sampler"]) for r in metrics["pd1"]["rows"]] == [(1, "ddim"), (2, "ddim"), (4, "ddim")]
    assert metrics["add"]["method"] == "add" and metrics["add"]["rows"][0]["sampler"] == "add"
    table = (out / "methods" / "table.md").read_text()
    assert "each row at its own step count" in table and "| NFE |" in table.replace("  ", " ").replace("  ", " ")
    csv = (out / "methods" / "table.csv").read_text().splitlines()
    assert len(csv) == 1 + 6
    summary = json.loads((out / "methods" / "summary.json").read_text())
    rows = {c["name"]: c for c in summary["cells"]}
    assert rows["dpm2"]["row_steps"] == 2 and rows["add"]["row_steps"] == 1
    with open(out / "cells" / ids["pd1"] / "samples.npz", "rb") as f:
        import numpy as np

        assert sorted(np.load(f).files) == ["labels", "steps_1", "steps_2", "steps_4"]


def test_a_row_step_count_must_be_evaluated(tiny_assets, env):  # noqa: F811 (pytest fixture)
    preset = tiny_preset(tiny_assets, env)
    path = ablation_file(
        env, preset, cells=[{"name": "dpm", "steps": 8, "set": {"method": "teacher", "eval_steps": [4]}}]
    )
    with pytest.raises(ConfigError, match=r"cells\[0\] \(dpm\): steps=8 is not among the cell's eval_steps=\[4\]"):
        sweep.load_ablations(path)


def test_a_row_that_sets_a_key_its_method_does_not_read_is_refused(tiny_assets, env):  # noqa: F811 (fixture)
    preset = tiny_preset(tiny_assets, env)
    cells = [
        {"name": "pd", "set": {"method": "progressive", "progressive.steps_per_stage": 3, "teacher.cfg_scale": 1.5}},
        {"name": "pd_d2", "set": {"method": "progressive", "discriminator.steps": 2, "loss.lambda_distill": 1.0}},
    ]
    path = ablation_file(env, preset, cells=cells)
    with pytest.raises(
        ConfigError,
        match=r"cells\[1\] \(pd_d2\): discriminator.steps, loss.lambda_distill: not read by method=progressive, so "
        r"setting it changes nothing; the keys method=progressive reads: method, .*seed, .*progressive$",
    ):
        sweep.load_ablations(path)
    path = ablation_file(env, preset, cells=[{"name": "dpm", "set": {"method": "teacher", "batch_size": 64}}])
    with pytest.raises(ConfigError, match=r"\(dpm\): batch_size: not read by method=teacher"):
        sweep.load_ablations(path)
    assert len(sweep.load_ablations(ablation_file(env, preset, cells=cells[:1]))[0].cells) == 1


def test_a_teacher_row_is_one_cell_for_all_its_seeds(tiny_assets, env):  # noqa: F811 (pytest fixture)
    """The teacher reads no seed (its samples come from ``eval.seed``): its seeds share one cell at seed 0;
    a trained method gets a cell per seed."""
    preset = tiny_preset(tiny_assets, env)
    cells = [{"name": "dpm", "set": {"method": "teacher"}}, {"name": "pd", "set": {"method": "progressive"}}]
    [ablation] = sweep.load_ablations(ablation_file(env, preset, cells=cells), ["seeds=[0,1,2]"])
    by_row = {row: [c for c in ablation.cells if c.name == row] for row in ("dpm", "pd")}
    assert [c.seed for c in by_row["dpm"]] == [0, 1, 2]  # the table still lists the row at every seed
    assert len({c.id for c in by_row["dpm"]}) == 1 and {c.config.seed for c in by_row["dpm"]} == {0}
    assert len({c.id for c in by_row["pd"]}) == 3 and [c.config.seed for c in by_row["pd"]] == [0, 1, 2]
    assert not methods.reads("teacher", "seed") and methods.reads("progressive", "seed")


def test_every_key_a_method_reads_is_in_the_schema():
    """``methods.READS`` names real config keys (a renamed field cannot leave the registry behind)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(TrainConfig)
    for method, keys in methods.READS.items():
        for key in keys or ():
            assert OmegaConf.select(schema, key, default="<missing>") != "<missing>", (method, key)
    assert methods.reads("add", "discriminator.steps") and methods.reads("progressive", "progressive.lr")
    assert not methods.reads("teacher", "progressive.lr") and not methods.reads("progressive", "teacher.steps")


@pytest.mark.parametrize(
    "extra",
    [
        {},  # ADD: one guided teacher prediction per image per step
        {"loss.weighting": "nfsd", "teacher.cfg_scale": 1.0},
        {"teacher.steps": 2, "loss.regression_weight": 0.5, "loss.regression_pairs": 8, "loss.regression_steps": 2},
        {"loss.distillation": False},
        {"method": "progressive", "progressive.guided_steps": 2, "progressive.steps_per_stage": 1},
        {"method": "progressive", "progressive.guided_steps": 0, "progressive.steps_per_stage": 1},
    ],
)
def test_teacher_evaluations_counts_what_training_runs(tiny_assets, tmp_path, monkeypatch, extra):
    """Table 2's compute measure equals the images that pass through frozen (teacher) networks in training."""
    from add_bench import methods
    from add_bench.diffusion import Denoiser

    seen = []
    raw = Denoiser.raw

    def counting_raw(self, x_t, t, labels):
        if not any(p.requires_grad for p in self.unet.parameters()):
            seen.append(x_t.shape[0])
        return raw(self, x_t, t, labels)

    monkeypatch.setattr(Denoiser, "raw", counting_raw)
    cfg = cfg_for(tiny_assets, steps=2, tensorboard=False, **extra)
    if cfg.method == "progressive":
        progressive.train_progressive(cfg, tmp_path / "run", progress=False)
    else:
        from add_bench.train import train

        train(cfg, tmp_path / "run", progress=False)
    assert methods.teacher_evaluations(cfg) == sum(seen)
    assert (sum(seen) > 0) == (cfg.method == "progressive" or cfg.loss.distillation)
    if not extra:
        assert sum(seen) == 2 * 8 * 2  # steps × batch × (conditional + unconditional)


def test_table2_rows_at_adds_compute_spend_the_default_add_cells_teacher_evaluations():
    """The rows of ablations/methods.yaml labelled "ADD's compute" are trained at the default ADD cell's teacher
    evaluations: a change of the default cell's length or batch that leaves them behind fails here."""
    from pathlib import Path

    (ab,) = sweep.load_ablations(Path(__file__).resolve().parents[1] / "ablations" / "methods.yaml")
    (add,) = [c for c in ab.cells if c.default]
    equal = [c for c in ab.cells if "ADD's compute" in c.label]
    assert equal and add.config.method == "add" and {c.config.method for c in equal} == {"progressive"}
    for c in equal:
        assert methods.teacher_evaluations(c.config) == methods.teacher_evaluations(add.config), c.name
    extension = [c for c in ab.cells if c.name.startswith("add_reg")]
    equal_reg = [c for c in ab.cells if "ADD + regression's compute" in c.label]
    assert extension and equal_reg and not {c.name for c in equal_reg} & {c.name for c in equal}
    for c in equal_reg:
        assert methods.teacher_evaluations(c.config) == methods.teacher_evaluations(extension[0].config), c.name

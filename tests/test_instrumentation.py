"""What the ADD log shows: the lazy R1 term on every row, the student's gradient norm from each term of
Eq. 1 (L_adv^G, λ·L_distill) on logged steps without changing the update, and the training.png plot."""

import json
import math

import pytest
import torch
from test_train import batch, cfg_for, optimisers

from add_bench import checkpoint, plots
from add_bench import train as train_mod

TERM_KEYS = ("grad_norm_student_adv", "grad_norm_student_distill")


def log_rows(workdir):
    return {r["step"]: r for r in map(json.loads, (workdir / "log.jsonl").read_text().splitlines())}


def same(a, b) -> bool:
    """Nested state dicts equal to the bit (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def one_step(assets, log_step, **overrides):
    """A fresh student and discriminator after one add_step: (log row, student and discriminator weights)."""
    cfg = cfg_for(assets, **overrides)
    train_mod.set_threads(cfg.threads)  # as train() does: one thread, the tiny networks gain nothing from more
    torch.manual_seed(0)
    nets = train_mod.build_networks(cfg)
    opt_s, opt_d = optimisers(nets)
    x0, y = batch(assets)
    row = train_mod.add_step(nets, cfg, x0, y, torch.Generator().manual_seed(0), opt_s, opt_d, 0, log_step=log_step)
    weights = {**nets.student.unet.state_dict(), **{f"D.{k}": v for k, v in nets.discriminator.state_dict().items()}}
    return row, weights


def test_term_gradient_norms_leave_the_update_unchanged(tiny_assets):
    logged, after_logged = one_step(tiny_assets, log_step=True)
    plain, after_plain = one_step(tiny_assets, log_step=False)
    assert {k: v for k, v in logged.items() if k not in (*TERM_KEYS, "grad_ratio_adv_distill")} == plain
    assert same(after_logged, after_plain)
    adv, distill = (logged[k] for k in TERM_KEYS)
    assert math.isfinite(adv) and math.isfinite(distill) and adv > 0 and distill > 0
    assert logged["grad_ratio_adv_distill"] == adv / distill
    assert not any(k in plain for k in TERM_KEYS)  # steps that are not logged pay nothing


@pytest.mark.parametrize(
    "overrides, present, absent",
    [
        ({"loss.distillation": False}, "grad_norm_student_adv", "grad_norm_student_distill"),
        ({"loss.adversarial": False}, "grad_norm_student_distill", "grad_norm_student_adv"),
    ],
)
def test_a_single_term_carries_the_whole_student_gradient(tiny_assets, overrides, present, absent):
    row, _ = one_step(tiny_assets, log_step=True, **overrides)
    assert row[present] == pytest.approx(row["grad_norm_student"], rel=1e-5)  # the combined norm, before clipping
    assert row[absent] == 0.0
    assert row.get("grad_ratio_adv_distill", 0.0) == 0.0  # distillation only: 0; no L_distill: left out


def test_lambda_zero_logs_a_zero_distillation_gradient_and_no_ratio(tiny_assets):
    row, _ = one_step(tiny_assets, log_step=True, **{"loss.lambda_distill": 0.0})
    assert row["grad_norm_student_distill"] == 0.0 and row["grad_norm_student_adv"] > 0
    assert "grad_ratio_adv_distill" not in row


def test_logged_rows_carry_lazy_r1_and_training_png_and_updates_match_sparse_logging(tiny_assets, tmp_path):
    # R1 runs at steps 0 and 3 (rows 1 and 4); rows 2, 4 and 5 are logged: row 2 shows row 1's R1
    cfg = cfg_for(tiny_assets, steps=5, log_every=2, **{"discriminator.r1_every": 3})
    train_mod.train(cfg, tmp_path / "logged", progress=False)
    rows = log_rows(tmp_path / "logged")
    assert sorted(rows) == [2, 4, 5]
    assert [rows[s]["r1_step"] for s in (2, 4, 5)] == [1, 4, 4]
    assert all(math.isfinite(rows[s]["loss_r1"]) and rows[s]["loss_r1"] > 0 for s in rows)
    assert rows[5]["loss_r1"] == rows[4]["loss_r1"]
    for r in rows.values():
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in TERM_KEYS)
        assert r["grad_ratio_adv_distill"] == r["grad_norm_student_adv"] / r["grad_norm_student_distill"]
    assert (tmp_path / "logged" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same run logging only its last row: the same weights, optimiser states and last row
    sparse = cfg_for(tiny_assets, steps=5, log_every=1000, **{"discriminator.r1_every": 3})
    train_mod.train(sparse, tmp_path / "sparse", progress=False)
    a, b = (checkpoint.load(tmp_path / d)["objects"] for d in ("logged", "sparse"))
    assert same(a, b)  # student, EMA, discriminator and both optimisers' states
    last = log_rows(tmp_path / "sparse")
    assert list(last) == [5]
    assert {k: v for k, v in last[5].items() if k != "wall_time_s"} == {
        k: v for k, v in rows[5].items() if k != "wall_time_s"
    }


def test_a_failing_plot_warns_and_returns_none(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text("{not json\n")
    assert plots.write_training_plot(tmp_path) is None
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'training.png'} not written: DataError: {tmp_path / 'log.jsonl'}: line 1" in err
    assert not (tmp_path / "training.png").exists()


def test_plots_command_reports_a_missing_or_malformed_log_as_one_line_and_status_2(tmp_path, capsys):
    assert plots.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {tmp_path / 'log.jsonl'}: no such file (give the work folder of a cell that has trained)"]
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss_g": 0.5}\n{not json\n')
    assert plots.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'log.jsonl'}: line 2 is not valid JSON")
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss_g": 0.5}\n')
    assert plots.main([str(tmp_path)]) == 0 and (tmp_path / "training.png").is_file()

"""The bench's measuring machinery (never its timings): loss agreement, operator classes, old-vs-new runs."""

from __future__ import annotations

import subprocess

import pytest
import torch

from add_bench import bench
from add_bench.errors import ConfigError
from add_bench.provenance import REPO_ROOT
from tests.conftest import tiny_train_overrides


def test_loss_agreement_finds_the_first_step_that_differs_and_ignores_keys_only_one_run_logs():
    a = [{"loss_g": 1.0, "loss_d": 2.0}, {"loss_g": 1.0, "loss_d": 2.0}, {"loss_g": 3.0}]
    assert bench.loss_agreement(a, a) == {"loss_max_rel_diff": 0.0, "loss_first_step_over_rtol": -1, "loss_rtol": 1e-4}
    b = [{"loss_g": 1.0, "loss_d": 2.0, "loss_new": 5.0}, {"loss_g": 1.0, "loss_d": 2.002}, {"loss_g": 3.3}]
    out = bench.loss_agreement(a, b)
    assert out["loss_first_step_over_rtol"] == 1
    assert out["loss_max_rel_diff"] == pytest.approx(0.3 / 3.3)
    assert bench.loss_agreement(a, b, rtol=0.5)["loss_first_step_over_rtol"] == -1


def test_operator_classes_and_a_profile_whose_shares_add_up():
    assert bench.op_class("aten::mkldnn_convolution") == "convolution"
    assert bench.op_class("aten::convolution_backward") == "convolution"
    assert bench.op_class("aten::addmm") == "matmul"
    assert bench.op_class("aten::native_group_norm") == "normalisation"
    assert bench.op_class("aten::silu") == "other"
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    out = bench.profile_steps(lambda: (x @ w).relu().sum().backward(), steps=2, top=3)
    assert sum(out["op_classes"].values()) == pytest.approx(1.0)
    assert out["op_classes"]["matmul"] > 0
    assert len(out["top_ops"]) == 3 and out["s_per_step_profiled"] > 0


def test_against_a_commit_runs_both_trees_and_the_same_code_gives_the_same_losses(tiny_assets):
    """HEAD in a temporary worktree against this tree: the ADD step's code is the same, so every logged loss
    of the same seed and batches is bit-equal; the worktree is removed afterwards."""
    before = subprocess.run(["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    out = bench.bench_against("HEAD", tiny_train_overrides(tiny_assets), steps=2, warmup=1, rounds=1)
    assert out["loss_max_rel_diff"] == 0.0 and out["loss_first_step_over_rtol"] == -1
    assert out["s_per_step_ref"] > 0 and out["s_per_step_current"] > 0 and out["threads"] == 1
    after = subprocess.run(["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert after == before


def test_against_an_unknown_commit_is_a_clear_error(tiny_assets):
    with pytest.raises(ConfigError, match="--against no-such-ref-xyz: not a commit"):
        bench.bench_against("no-such-ref-xyz", tiny_train_overrides(tiny_assets), steps=1, warmup=0, rounds=1)

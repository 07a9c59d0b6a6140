"""The discriminator probe: fresh heads trained against a frozen generator's samples."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import tiny_train_overrides

from add_bench import discriminator_probe as dp


def test_linear_probe_separates_shifted_features_and_not_identical_ones():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=g)
    shifted = torch.randn(600, 8, generator=g) + torch.tensor([1.5] + [0.0] * 7)
    same = torch.randn(600, 8, generator=g)
    assert dp.linear_probe_accuracy(real, shifted, 400) > 0.7  # Φ(0.75) ≈ 0.77 for a 1.5σ shift
    assert abs(dp.linear_probe_accuracy(real, same, 400) - 0.5) < 0.1


def test_paired_real_images_share_the_class_and_are_distinct():
    real_y = torch.arange(100) % 10
    real_x = torch.arange(100).float().view(100, 1, 1, 1)  # image i holds its own index
    labels = torch.tensor([3, 3, 7, 0, 3])
    pairs = dp.paired_real(labels, real_x, real_y, torch.Generator().manual_seed(0))
    picked = pairs.flatten().long()
    assert real_y[picked].tolist() == labels.tolist() and len(set(picked.tolist())) == 5
    with pytest.raises(Exception, match="class 3: 11 pairs asked for, the training split has 10 images"):
        dp.paired_real(torch.full((11,), 3), real_x, real_y, torch.Generator())


def test_probe_command_writes_curves_and_tables(tiny_assets, tmp_path, capsys):
    out = tmp_path / "probe"
    args = [
        tiny_assets["teacher"],
        "--samples",
        "120",
        "--held-out",
        "40",
        "--steps",
        "30",
        "--eval-every",
        "10",
        "--out",
        str(out),
        "--variant",
        "discriminator.augment='color,translation,cutout'",
        "--variant",
        "discriminator.augment=''",
        *tiny_train_overrides(tiny_assets, batch_size=16, threads=1),
    ]
    assert dp.main(args) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["sampler"] == "ddim" and result["train_pairs"] == 80
    assert [r["variant"] for r in result["runs"]] == [
        "discriminator.augment='color,translation,cutout'",
        "discriminator.augment=''",
    ]
    assert [r["resolved"] for r in result["runs"]] == [
        {"discriminator.augment": "color,translation,cutout"},
        {"discriminator.augment": ""},
    ]
    for run in result["runs"]:
        assert [c["step"] for c in run["curve"]] == [0, 10, 20, 30]
        assert len(run["linear_probe_acc_per_level"]) == len(run["curve"][0]["acc_per_head"])
    # the same samples and features: the linear yardstick does not depend on the augmentation
    assert result["runs"][0]["linear_probe_acc_per_level"] == result["runs"][1]["linear_probe_acc_per_level"]
    # one step-1 DDIM sample of a random-weight UNet is far from the blob images: fresh heads learn to tell them
    # apart, better than at initialisation
    unaugmented = result["runs"][1]["curve"]
    assert unaugmented[-1]["acc"] >= 0.8 and unaugmented[-1]["acc"] > unaugmented[0]["acc"]
    table = pd.read_csv(out / "table.csv")
    assert table["variant"].tolist() == [r["variant"] for r in result["runs"]]
    assert result["provenance"]["git_commit"] and result["provenance"]["config"]["batch_size"] == 16


def test_probe_command_rejects_bad_sizes(tiny_assets, tmp_path, capsys):
    assert dp.main([tiny_assets["teacher"], "--samples", "50", "--held-out", "50", "--out", str(tmp_path)]) == 2
    assert "--held-out 50 must be smaller than --samples 50" in capsys.readouterr().err
    assert dp.main([tiny_assets["teacher"], "--variant", "discriminator.augment", "--out", str(tmp_path)]) == 2
    assert "--variant discriminator.augment: expected KEY=VALUE" in capsys.readouterr().err
    assert dp.main([tiny_assets["teacher"], "--variant", "discriminator.augmnt=color", "--out", str(tmp_path)]) == 2
    assert "augmnt" in capsys.readouterr().err  # the config loader names the unknown key

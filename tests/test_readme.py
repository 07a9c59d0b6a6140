"""The README's worked examples run as written (a newcomer's path: add a loss weighting, run an
ablation from the command line)."""

import re
import shlex

import torch
from conftest import tiny_train_overrides

from add_bench import losses, sweep
from add_bench import train as train_mod
from add_bench.provenance import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readmes_loss_weighting_example_registers_a_working_weighting(tiny_assets):
    block = next(b for b in code_blocks("python") if "C_WEIGHTINGS[" in b)
    name = re.search(r'C_WEIGHTINGS\["(\w+)"\]', block).group(1)
    command = next(
        line for line in README.splitlines() if f"loss.weighting={name}" in line and "add_bench.train" in line
    )
    assert "python -m add_bench.train" in command
    try:
        exec(block, vars(losses))  # as if pasted into add_bench/losses.py
        cfg = train_mod.load(
            train_mod.TrainConfig,
            overrides=tiny_train_overrides(tiny_assets, **{"loss.weighting": name, "loss.adversarial": False}),
        )
        rows = {}
        for weighting in (name, "exp"):
            cfg.loss.weighting = weighting
            torch.manual_seed(0)
            nets = train_mod.build_networks(cfg)
            x, y = train_mod.load_split("train", tiny_assets["data"], 50).tensors()
            opt = torch.optim.Adam(nets.student.unet.parameters(), 1e-4)
            rows[weighting] = train_mod.add_step(
                nets, cfg, x[:8], y[:8], torch.Generator().manual_seed(0), opt, None, 0
            )
        assert torch.isfinite(torch.tensor(rows[name]["loss_distill"])) and rows[name]["loss_distill"] > 0
        assert rows[name]["loss_distill"] != rows["exp"]["loss_distill"]  # the new c(t) is the one applied
    finally:
        losses.C_WEIGHTINGS.pop(name, None)
        vars(losses).pop(name if name.startswith("c_") else f"c_{name}", None)


def test_the_readmes_command_line_ablation_lists_the_yaml_files_cells(capsys):
    line = next(
        line
        for block in code_blocks("bash")
        for line in block.splitlines()
        if line.startswith("python -m add_bench.sweep loss.weighting=")
    )
    args = shlex.split(line.split("#")[0])[3:]
    assert "--dry-run" in args

    def ids(argv):
        assert sweep.main(argv) == 0
        return re.findall(r"\b([0-9a-f]{12})\b", capsys.readouterr().out)

    from_command_line = ids(args)
    assert len(from_command_line) == 3
    assert from_command_line == ids([str(REPO_ROOT / "ablations" / "loss_weighting.yaml"), "--dry-run"])

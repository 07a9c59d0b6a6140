"""errors.command_line: every command's main reports a suite error as one line and exit status 2."""

import importlib
from pathlib import Path

import pytest

from add_bench.errors import ConfigError, command_line

COMMANDS = (
    "baseline",
    "bench",
    "cost",
    "curve",
    "data.coco",
    "discriminator_probe",
    "evaluate",
    "featnet_pretrain",
    "handoff",
    "metric_sanity",
    "metrics",
    "plots",
    "pretrain",
    "sweep",
    "tables",
    "train",
)


def test_a_suite_error_is_one_line_and_status_2(capsys):
    @command_line
    def main(argv=None):
        raise ConfigError("x.yaml: key 'lr': expected a float")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: x.yaml: key 'lr': expected a float\n"


def test_other_exceptions_pass_unless_named(capsys):
    @command_line
    def strict(argv=None):
        raise ValueError("bad")

    @command_line(ValueError)
    def lenient(argv=None):
        raise ValueError("bad file")

    with pytest.raises(ValueError):
        strict([])
    assert lenient([]) == 2 and "error: bad file" in capsys.readouterr().err
    assert command_line(lambda argv=None: 0)([]) == 0


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_uses_the_wrapper(name):
    main = importlib.import_module(f"add_bench.{name}").main
    assert hasattr(main, "__wrapped__"), f"add_bench.{name}.main is not decorated with errors.command_line"


@pytest.mark.parametrize(
    "args",
    [
        ["ablations/loss_weighting.yaml", "seeds=[0,1]", "steps=50"],
        ["loss.weighting=exp,sds,nfsd", "seeds=[0,1]", "steps=50"],  # the same rows from the command line
        ["ablations/loss_weighting.yaml", "--cells", "sds,nfsd"],
    ],
)
def test_sweep_cfg_job_prints_the_dry_runs_cells_and_writes_nothing(args, tmp_path, capsys, monkeypatch):
    """Each cell's name, seed, id (those --dry-run lists) and config, as the cell would run it; no folder made."""
    import re

    import yaml

    from add_bench.sweep import cell_id, main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--dry-run"]) == 0
    rows = re.findall(r"^\S+ +(\S+) +(\d+) +([0-9a-f]{12}) ", capsys.readouterr().out, flags=re.M)
    assert main([*args, "--out", str(out), "--cfg", "job"]) == 0
    cells = list(yaml.safe_load_all(capsys.readouterr().out))
    assert not out.exists()  # no cell folder, manifest or lock
    chosen = args[-1].split(",") if "--cells" in args else ["exp", "nfsd", "sds"]
    assert [(c["name"], str(c["seed"]), c["id"]) for c in cells] == [r for r in rows if r[0] in chosen]
    assert len(cells) == (2 if "--cells" in args else 6)
    for c in cells:
        assert cell_id(c["config"]) == c["id"] and c["config"]["loss"]["weighting"] == c["name"]
        assert c["config"]["seed"] == c["seed"] and c["config"]["steps"] == (50 if "steps=50" in args else 600)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["teacher", "size=large", "~steps", "lr=1e-3"], {"size": "large", "steps": 9000, "lr": 1e-3}),
        (["evalnet", "epochs=3"], {"epochs": 3, "batch_size": 128}),
        (["evalnet_ssl", "temperature=0.5"], {"temperature": 0.5}),
        (["featnet", "clip_s", "batch_size=16"], {"batch_size": 16, "lr": 2e-3}),  # the network's own defaults too
    ],
)
def test_pretrain_cfg_job_prints_the_runs_config(args, expected, tmp_path, capsys):
    import yaml

    from add_bench import pretrain

    where = ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "weights")]
    assert pretrain.main([*args, *where, "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {key: printed[key] for key in expected} == expected
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_evaluate_cfg_job_prints_the_eval_config(tmp_path, capsys):
    import yaml

    from add_bench import evaluate
    from add_bench.config import EvalConfig

    argv = ["teacher_small", "num_samples=100", "--out", str(tmp_path / "m.json"), "coco.split=train2017"]
    assert evaluate.main([*argv, "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["num_samples"], printed["coco"]["split"], printed["seed"]) == (100, "train2017", EvalConfig().seed)
    assert not any(tmp_path.iterdir())  # nothing sampled or written


@pytest.mark.parametrize(
    "module, argv, key, value",
    [
        ("baseline", ["num_samples=300", "--out", "{tmp}/teacher"], "num_samples", 300),
        ("metrics", ["{tmp}/none.npz", "--out", "{tmp}/m.json", "batch_size=50"], "batch_size", 50),
        ("metrics", ["{tmp}/none.npz", "seed=4"], "seed", 4),  # no --out needed to print the config
        ("curve", ["steps=50", "loss.lambda_distill=1", "--out", "{tmp}/curve"], "loss.lambda_distill", 1.0),
        ("bench", ["batch_size=8", "--out", "{tmp}/b.json"], "batch_size", 8),
    ],
)
def test_the_other_commands_print_their_config_with_cfg_job(module, argv, key, value, tmp_path, capsys):
    import importlib

    import yaml
    from omegaconf import OmegaConf

    main = importlib.import_module(f"add_bench.{module}").main
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--cfg", "job"]) == 0
    printed = OmegaConf.create(yaml.safe_load(capsys.readouterr().out))
    assert OmegaConf.select(printed, key) == value
    assert not any(tmp_path.iterdir())  # nothing computed or written


def test_metrics_without_out_says_it_is_required(capsys):
    from add_bench.metrics import main

    with pytest.raises(SystemExit):
        main(["samples.npz", "seed=1"])
    assert "required: --out" in capsys.readouterr().err

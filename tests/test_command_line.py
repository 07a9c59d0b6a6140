"""errors.command_line: every command's main reports a suite error as one line and exit status 2."""

import importlib

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

"""The suite's errors: each is reported as one line naming the file, key or value and what is accepted."""


class AddBenchError(Exception):
    """Base class; command-line entry points print ``error: <message>`` and exit with status 2."""


class DataError(AddBenchError):
    """Missing, truncated or malformed data files."""


class ConfigError(AddBenchError):
    """Unknown key, wrong type or value out of range in a config, a YAML file or an override."""


class CheckpointError(AddBenchError):
    """Missing, corrupt or mismatched checkpoint / weights file."""


class TrainingDiverged(AddBenchError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingStopped(AddBenchError):
    """A run stopped before its last step (a stop signal); its checkpoint is kept and a re-run resumes it."""


def command_line(main=None, *also: type[Exception]):
    """Decorator of a command's ``main(argv) -> int``: an AddBenchError (and any of ``also``, e.g. ValueError
    from a malformed input file) becomes one ``error: <message>`` line on stderr and exit status 2.

        @command_line                 # AddBenchError only
        @command_line(ValueError)     # also ValueError
    """
    import functools
    import sys

    if main is not None and not isinstance(main, type):

        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except (AddBenchError, *also) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2

        return wrapped
    kinds = ((main,) if main is not None else ()) + also
    return lambda fn: command_line(fn, *kinds)

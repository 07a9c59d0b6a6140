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

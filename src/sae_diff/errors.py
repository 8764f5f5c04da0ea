"""User-facing errors. Each message is one line naming the file, key or value and what was
expected; the CLI prints it and exits with status 2. Kept free of heavy imports so that
every command can catch them without loading torch."""


class ConfigError(ValueError):
    """A configuration problem."""


class DataError(ValueError):
    """A problem with an input data file."""


class ScorerError(RuntimeError):
    """A scorer could not produce its metrics."""


class ActivationStoreError(RuntimeError):
    """A missing, corrupted or inconsistent activation store."""


class TrainingError(RuntimeError):
    """SAE training cannot go on (non-finite values, mismatched warm start)."""


USER_ERRORS = (ConfigError, DataError, ScorerError, ActivationStoreError, TrainingError, FileNotFoundError)

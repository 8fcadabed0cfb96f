"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class MBIBError(Exception):
    """Base of every error the command line prints as a single line."""


class DataError(MBIBError):
    """Missing, corrupt or malformed data."""


class ConfigError(MBIBError):
    """A bad argument or configuration value."""


class TrainingError(MBIBError):
    """Training cannot go on (a NaN loss, a broken checkpoint)."""

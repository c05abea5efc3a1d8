"""Errors that the command line reports as one line (no traceback)."""


class DagmanError(Exception):
    """A user-facing error: bad input, bad configuration, missing file. The CLI prints ``str(err)`` on one
    line and exits with status 2."""


class ConfigError(DagmanError):
    """Invalid configuration: unknown key, wrong type, bad value."""


class DataError(DagmanError):
    """An input image or data set that cannot be used."""

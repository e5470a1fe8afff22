"""Faults a user of the zoo fixes in their setup, not in the code: ``python -m zoo`` prints them alone.

The CLI prints a :class:`UserError` as ``error: <message>`` and exits with status 2, as it does for
a bad option; any other exception is a bug and keeps its traceback. Each subclass is also the
builtin exception that fits the fault, so code that catches ``FileNotFoundError`` still does.
"""


class UserError(Exception):
    """A fault in the user's setup whose message names the fix."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set (or the package that ships it) is not where the config looks for it."""


class DownloadError(UserError, ConnectionError):
    """Downloading a data set failed: no internet, or its hosts are unreachable."""


class DamagedDataError(UserError, ValueError):
    """A data set's files are there, but are not what they should be."""


class ConfigError(UserError, ValueError):
    """Options that do not fit together, found once the run has started (the trainer's settings)."""

"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class HarnessError(Exception):
    """Bad input or an unusable environment; the message says what to do."""


class UnknownNameError(HarnessError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(HarnessError):
    """Two objects registered under one name."""

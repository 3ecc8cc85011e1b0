"""Errors that reach users. The CLI prints them as one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""

"""The two families of failure every command-line tool reports, and their exit codes.

``InputError`` is bad input the user can fix (a config key, a file, a value): exit code 2.
``RunFailure`` is something that went wrong while running (a diverged loss, a lost peer): exit
code 1. Each subsystem derives its own error types from one of these, so a CLI needs one handler
to turn any of them into a single clear line instead of a traceback.
"""

from __future__ import annotations


class ScdError(Exception):
    """Base of every error scd-train raises on purpose; the message is meant for the user."""

    exit_code = 1


class InputError(ScdError, ValueError):
    """Bad input: the message names the file, key or value and says what was expected."""

    exit_code = 2


class RunFailure(ScdError, RuntimeError):
    """A failure while running that is not the input's fault."""

    exit_code = 1

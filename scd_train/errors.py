"""The two families of failure every command-line tool reports, and their exit codes.

``InputError`` is bad input the user can fix (a config key, a file, a value): exit code 2.
``RunFailure`` is something that went wrong while running (a diverged loss, a lost peer): exit
code 1. Each subsystem derives its own error types from one of these, so a CLI needs one handler
(``scd_train.cli.command``) to turn any of them into a single clear line instead of a traceback.
"""

from __future__ import annotations


class ScdError(Exception):
    """Base of every error scd-train raises on purpose; the message is meant for the user."""

    exit_code = 1
    # True for failures that only the raising rank sees (a corrupt sample read by one rank): the
    # CLI handler prints them on that rank too, not only on rank 0.
    rank_local = False
    # True where the message already starts with the rank it concerns ("rank 1/2: ..."): the CLI
    # handler then adds no "rank N:" prefix of its own
    names_rank = False


class InputError(ScdError, ValueError):
    """Bad input: the message names the file, key or value and says what was expected."""

    exit_code = 2


class RunFailure(ScdError, RuntimeError):
    """A failure while running that is not the input's fault."""

    exit_code = 1


class MissingInput(InputError, FileNotFoundError):
    """A file or directory named by the input does not exist (still a ``FileNotFoundError``)."""


class ScdWarning(UserWarning):
    """Something accepted but worth knowing (a setting that has no effect, data that was adjusted);
    the CLI handler prints it as one ``prog: warning: ...`` line."""


class ResumeError(InputError):
    """A checkpoint or saved position that cannot continue under this run's settings (world size,
    data, batch size...); the message names the saved and the current value."""

"""The one place where every command turns errors into messages and exit codes.

A command's ``main(argv) -> int`` gets the behaviour with one line above it::

    from scd_train.cli import command

    @command("scd-distill")
    def main(argv: list[str] | None = None) -> int:
        ...

What the wrapped command does:

- an ``InputError`` (bad input: exit code 2) or ``RunFailure`` (runtime failure: exit code 1), or any
  other ``scd_train.errors.ScdError``, is printed as ``prog: message`` on stderr, without a
  traceback, and ``main`` returns the error's exit code;
- printed once: in a multi-process run (``RANK`` set by torchrun, deepspeed or the SLURM launcher,
  or an initialized process group) only rank 0 prints, except errors marked ``rank_local`` (a
  corrupt sample read by one rank), which the rank that hit them prints as ``prog: rank N: ...``;
  a rank that stays silent waits ``QUIET_RANK_GRACE_S`` before exiting, so that a launcher killing
  the group on the first exit does not kill rank 0 before it has printed;
- ``--debug`` anywhere on the command line (it is removed before ``main`` parses its arguments),
  or ``SCD_DEBUG=1`` in the environment, prints the traceback before the message;
- an ``ScdWarning`` is printed as ``prog: warning: message`` (rank 0 only);
- Ctrl-C prints ``prog: interrupted`` and returns 130;
- any other exception is a bug: it propagates with its traceback, untouched.

A distributed process that fails leaves without interpreter finalization (where gloo can abort and
turn exit code 2 into a SIGABRT); the launcher then tears down the other ranks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator

from scd_train.errors import ScdError, ScdWarning

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SCD_DEBUG"
INTERRUPTED_EXIT_CODE = 130
# A rank that leaves its error to rank 0 waits this long before exiting: a launcher that sees one
# process fail kills the others, and rank 0 must get to print first.
QUIET_RANK_GRACE_S = 5.0

Main = Callable[[list[str] | None], int]


def command(prog: str) -> Callable[[Main], Main]:
    """Decorator form of ``run_cli``: ``@command("scd-train")`` above ``def main(argv=None)``."""

    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            return run_cli(prog, main, argv)

        return wrapped

    return wrap


def run_cli(prog: str, main: Main, argv: list[str] | None = None) -> int:
    """Run ``main`` on ``argv`` (default: the process's arguments) under the error contract above."""
    args, debug = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    debug = debug or debug_from_env()
    with user_warnings(prog):
        try:
            return main(args)
        except ScdError as exc:
            if not report(prog, exc, debug):
                time.sleep(QUIET_RANK_GRACE_S)
            code = exc.exit_code
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            code = INTERRUPTED_EXIT_CODE
    _leave_if_distributed(code)
    return code


def take_debug_flag(args: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from the arguments before a ``--`` separator; returns (rest, found)."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != DEBUG_FLAG]
    return head + args[end:], len(head) != end


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def process_rank() -> int:
    """This process's rank: the process group's when one is initialized, else ``RANK`` (0 when unset)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report(prog: str, exc: ScdError, debug: bool = False) -> bool:
    """Print ``exc`` the way the contract says (on rank 0, or on this rank when it is rank-local);
    returns whether this process printed it."""
    rank = process_rank()
    if rank != 0 and not exc.rank_local:
        return False
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    where = f"rank {rank}: " if rank != 0 and not exc.names_rank else ""
    print(f"{prog}: {where}{exc}", file=sys.stderr, flush=True)
    return True


@contextlib.contextmanager
def user_warnings(prog: str) -> Iterator[None]:
    """Show ``ScdWarning`` as ``prog: warning: ...`` on rank 0; other warnings as Python would."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, ScdWarning):
            return original(message, category, filename, lineno, file, line)
        if process_rank() == 0:
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        return None

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _leave_if_distributed(code: int) -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    import logging

    # Other ranks may be blocked in a collective: no barrier, no destroy_process_group.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

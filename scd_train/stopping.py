"""Stop requests: signals and a vanished launcher, honoured at a step boundary within a bound.

A stop request (SIGTERM or SIGUSR2 from SLURM, a person or a launcher, or the launcher process
itself disappearing) makes the training loop save at its next step boundary and end. Two things
could keep that boundary from ever coming: a loop that makes no progress (a data source that
never yields, a peer that never answers), and a launcher that is gone while its workers keep
training (``kill -9`` of torchrun's process group leaves its workers, which run in sessions of
their own; the ``deepspeed`` command dies on SIGTERM while its per-node launcher and the workers
carry on). So:

* after a request, the loop has ``train.stop_grace_s`` seconds to reach a step boundary (time spent
  writing a checkpoint does not count); if it does not, the process logs what it was waiting for
  and exits with status 1 without saving: the newest complete checkpoint stays the resume point;
* launcher processes above this one (torchrun, the deepspeed launchers) are watched; when one of
  them exits, that is a stop request like a signal.

A process blocked inside a C call (e.g. a collective waiting for a dead peer) runs no Python
signal handler until the call returns; the process-group timeout (``train.collective_timeout_s``)
bounds those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
STOP_TIMEOUT_EXIT_CODE = 1
WATCH_INTERVAL_S = 1.0
# The launchers whose workers we may be: scripts (torchrun, the `deepspeed` command) and modules
# (python -m torch.distributed.run, python -m deepspeed.launcher.launch: deepspeed's per-node launcher).
LAUNCHER_SCRIPTS = ("torchrun", "deepspeed")
LAUNCHER_MODULES = ("torch.distributed.run", "deepspeed.launcher.launch")


@dataclass(frozen=True)
class Process:
    pid: int
    start_time: str  # /proc/<pid>/stat field 22: tells a live process from a later one with its pid
    command: str


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of ``pid`` from /proc, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[19]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_launcher(command: str) -> bool:
    """Whether a command line is torchrun's or one of deepspeed's launchers."""
    words = command.split()
    if any(Path(w).name in LAUNCHER_SCRIPTS for w in words[:2]):
        return True
    return any(words[i] == "-m" and words[i + 1] in LAUNCHER_MODULES for i in range(min(len(words) - 1, 4)))


def launcher_ancestors(pid: int | None = None) -> list[Process]:
    """The chain of launcher processes directly above ``pid`` (this process by default): its parent
    if that is a launcher, that one's parent if it is one too, and so on. Empty for a plain start."""
    chain = []
    current = _stat(pid or os.getpid())
    while current is not None and current[0] > 1:
        parent = current[0]
        info = _stat(parent)
        command = _command(parent)
        if info is None or not is_launcher(command):
            break
        chain.append(Process(parent, info[1], command))
        current = info
    return chain


def is_alive(process: Process) -> bool:
    info = _stat(process.pid)
    return info is not None and info[1] == process.start_time


class StopControl:
    """Collects stop requests for one training loop and enforces the grace period.

    ``describe`` returns a short account of where the run stands (step, newest checkpoint) for the
    message written when the grace period runs out.
    """

    def __init__(self, grace_s: float, describe: Callable[[], str] = lambda: "",
                 watch: list[Process] | None = None, exit_code: int = STOP_TIMEOUT_EXIT_CODE) -> None:
        self.grace_s = grace_s
        self.describe = describe
        self.watch = list(watch or [])
        self.exit_code = exit_code
        self.requested = False
        self.reason: str | None = None
        self._requested_at: float | None = None
        self._saving = 0
        self._armed = threading.Event()
        self._done = threading.Event()
        self._owner = os.getpid()
        self._threads: list[threading.Thread] = []

    # -- requests ------------------------------------------------------------------------------
    def request(self, reason: str) -> None:
        if self.requested:
            return
        self.requested, self.reason = True, reason
        self._requested_at = time.monotonic()
        log.warning("%s: saving at the next step boundary (at most %.0f s away, train.stop_grace_s)", reason,
                    self.grace_s)
        if self.grace_s > 0:
            self._armed.set()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if os.getpid() != self._owner:  # a forked data worker inherited the handler
            return
        self.request(f"received signal {signum} ({signal.Signals(signum).name})")

    # -- progress ------------------------------------------------------------------------------
    def reached_boundary(self) -> None:
        """The loop is at a step boundary: a pending request is acted on now, so the bound is met."""
        if self.requested:
            self._armed.clear()

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Time inside this block (a checkpoint write) does not count against the grace period."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
            if self._requested_at is not None:
                self._requested_at = time.monotonic()

    # -- threads -------------------------------------------------------------------------------
    def _deadline(self) -> None:
        while not self._done.is_set():
            if not self._armed.wait(timeout=0.5):
                continue
            if self._saving or self._requested_at is None:
                time.sleep(0.2)
                continue
            waited = time.monotonic() - self._requested_at
            if waited < self.grace_s:
                time.sleep(min(0.2, self.grace_s - waited))
                continue
            if self._armed.is_set() and not self._done.is_set():
                self._give_up(waited)

    def _give_up(self, waited: float) -> None:
        where = self.describe()
        log.error("%s %.0f s ago, but the run reached no step boundary since (train.stop_grace_s=%g)%s: exiting "
                  "without saving; a resume continues from the newest complete checkpoint", self.reason, waited,
                  self.grace_s, f"; {where}" if where else "")
        for handler in logging.getLogger("scd_train").handlers + logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.exit_code)

    def _watch_launchers(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S):
            for process in self.watch:
                if not is_alive(process):
                    self.request(f"the launcher that started this process exited (pid {process.pid}: "
                                 f"{process.command[:80]})")
                    return

    def __enter__(self) -> StopControl:
        self._previous = {}
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no signal handlers here
                self._previous[sig] = signal.signal(sig, self._on_signal)
        targets = [self._deadline] + ([self._watch_launchers] if self.watch else [])
        for target in targets:
            thread = threading.Thread(target=target, name=f"scd-stop-{target.__name__.strip('_')}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._armed.set()  # wake the deadline thread so it sees _done
        for thread in self._threads:
            thread.join(timeout=2)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

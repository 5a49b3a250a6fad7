"""Joining the process group with a bounded, talkative rendezvous.

torch's own env:// rendezvous waits silently for the whole process-group timeout (30 minutes by
default) when a peer never comes. Here rank 0 opens the TCP store at MASTER_ADDR:MASTER_PORT, every
rank registers under its rank, and while some are missing the waiting ranks say who waits for whom:
rank 0 names the ranks that have not joined, the others say they wait for rank 0 (to open the
store, or to see everyone). After ``train.rendezvous_timeout_s`` every waiting rank stops with a
message naming the missing ranks. The process group is then built on that store.

Under torchrun the agent has already gathered the workers and hosts the store, so torch's env://
path is used there.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

import torch.distributed as dist

from scd_train.errors import RunFailure
from scd_train.parallel.launch_env import LaunchEnv

log = logging.getLogger(__name__)

POLL_S = 0.25
# How often a waiting rank repeats who it waits for.
REPORT_EVERY_S = 10.0
PREFIX = "scd_rendezvous"


class RendezvousError(RunFailure):
    """Not every rank joined the process group within the rendezvous time-out."""

    # the rank that waits in vain is often not rank 0 (rank 0 may be the one missing): each one says so
    rank_local = True
    names_rank = True  # its messages begin with the rank that waited


def _where(env: LaunchEnv) -> str:
    return f"{env.master_addr}:{env.master_port}"


class _Clock:
    def __init__(self, timeout_s: float) -> None:
        self.start = time.monotonic()
        self.timeout_s = timeout_s
        self._last_report = self.start
        # a short time-out still gets a few progress lines before it ends
        self.report_every_s = min(REPORT_EVERY_S, max(1.0, timeout_s / 4))

    @property
    def waited(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.waited >= self.timeout_s

    def report_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_report >= self.report_every_s:
            self._last_report = now
            return True
        return False


def _open_store(env: LaunchEnv, clock: _Clock) -> dist.TCPStore:
    timeout = datetime.timedelta(seconds=max(clock.timeout_s, 1.0))
    if env.rank == 0:
        try:
            return dist.TCPStore(env.master_addr, env.master_port, env.world_size, True, timeout=timeout,
                                 wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"rank 0 cannot open the rendezvous at {_where(env)} ({str(exc).splitlines()[0]}): "
                                  "is MASTER_PORT taken by another job on this host?") from None
    # Probe with plain sockets first: torch's client retries print a C++ stack per failed attempt.
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=2.0):
                break
        except OSError as exc:
            if clock.expired():
                raise RendezvousError(
                    f"rank {env.rank}/{env.world_size}: rank 0 did not open the rendezvous at {_where(env)} within "
                    f"{clock.timeout_s:.0f} s (train.rendezvous_timeout_s; last error: {exc}). Is rank 0 running, "
                    "and do all ranks have the same MASTER_ADDR and MASTER_PORT?") from None
            if clock.report_due():
                log.warning("rank %d/%d: waiting for rank 0 to open the rendezvous at %s (%.0f of %.0f s)",
                            env.rank, env.world_size, _where(env), clock.waited, clock.timeout_s)
            time.sleep(POLL_S)
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout=timeout)


def _missing(store: dist.Store, world_size: int) -> list[int]:
    return [r for r in range(world_size) if not store.check([f"{PREFIX}/rank/{r}"])]


def _ranks_text(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return shown + (f", ... ({len(ranks)} in all)" if len(ranks) > 16 else "")


def rendezvous(env: LaunchEnv, timeout_s: float) -> dist.Store:
    """A store every rank of ``env`` has joined; raises RendezvousError naming the missing ranks."""
    clock = _Clock(timeout_s)
    store = _open_store(env, clock)
    store.set(f"{PREFIX}/rank/{env.rank}", f"{socket.gethostname()}:{os.getpid()}")
    store.add(f"{PREFIX}/joined", 1)
    done = f"{PREFIX}/complete"
    try:
        while True:
            if env.rank == 0:
                joined = store.add(f"{PREFIX}/joined", 0)
                if joined >= env.world_size:
                    store.set(done, "1")
                    break
            elif store.check([done]):
                break
            if clock.expired():
                raise RendezvousError(_timeout_message(env, store, clock))
            if clock.report_due():
                if env.rank == 0:
                    missing = _missing(store, env.world_size)
                    log.warning("rank 0: waiting for rank(s) %s to join at %s (%d of %d joined, %.0f of %.0f s)",
                                _ranks_text(missing), _where(env), env.world_size - len(missing), env.world_size,
                                clock.waited, timeout_s)
                else:
                    log.warning("rank %d/%d: joined at %s; waiting for rank 0 to see all %d ranks (%.0f of %.0f s)",
                                env.rank, env.world_size, _where(env), env.world_size, clock.waited, timeout_s)
            time.sleep(POLL_S)
    except RendezvousError:
        raise
    except (RuntimeError, OSError) as exc:  # the store went away: rank 0 ended
        raise RendezvousError(f"rank {env.rank}/{env.world_size}: lost the rendezvous at {_where(env)} "
                              f"({str(exc).splitlines()[0]}): rank 0 ended before every rank joined") from None
    return dist.PrefixStore(f"{PREFIX}/pg", store)


def _timeout_message(env: LaunchEnv, store: dist.Store, clock: _Clock) -> str:
    if env.rank == 0:
        missing = _missing(store, env.world_size)
        return (f"rank 0: rank(s) {_ranks_text(missing)} did not join the rendezvous at {_where(env)} within "
                f"{clock.timeout_s:.0f} s (train.rendezvous_timeout_s; {env.world_size - len(missing)} of "
                f"{env.world_size} joined). Did those processes start (see their logs), and do they have the same "
                "MASTER_ADDR, MASTER_PORT and WORLD_SIZE?")
    return (f"rank {env.rank}/{env.world_size}: joined at {_where(env)}, but rank 0 did not see all "
            f"{env.world_size} ranks within {clock.timeout_s:.0f} s (train.rendezvous_timeout_s); rank 0's log names "
            "the missing ones")

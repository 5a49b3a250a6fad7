"""Side-by-side timing: interleaved calls, wall and process CPU time, machine load.

Comparing two models by timing one to completion and then the other lets any drift in machine
load (another process, thermal throttling, a noisy neighbour) land on one side only. Here every
repeat runs each candidate once, in an order that flips from one repeat to the next, and records
both wall-clock and process CPU seconds, so a reader can tell a slow model from a busy machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work, so a timer around it measures the work and not its launch."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


@dataclass
class TimingStats:
    """Per-call seconds of one candidate; ``cpu`` is process CPU time (all threads) per call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def minimum(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def summary(self) -> dict:
        return {"calls": len(self.wall), "wall_s_median": self.median, "wall_s_min": self.minimum,
                "wall_s_mean": statistics.fmean(self.wall), "cpu_s_median": self.cpu_median,
                "cpu_s_min": min(self.cpu)}


def time_call(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, synchronized on CUDA."""
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device | str | None = None) -> dict[str, TimingStats]:
    """Time each candidate ``repeats`` times, interleaved, order reversed on every other repeat.

    Each candidate is a zero-argument callable doing one unit of work (one frame, one step).
    ``warmup`` untimed rounds run first (allocator, kernel selection, compilation).
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    stats = {name: TimingStats() for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = time_call(candidates[name], device)
            stats[name].wall.append(wall)
            stats[name].cpu.append(cpu)
    return stats


@dataclass
class MachineLoad:
    """What else the machine was doing, recorded beside every measurement."""

    cpu_count: int
    torch_threads: int
    loadavg_1m: float
    loadavg_5m: float

    @classmethod
    def now(cls) -> MachineLoad:
        one, five, _ = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        return cls(os.cpu_count() or 1, torch.get_num_threads(), one, five)

    def to_dict(self) -> dict:
        return asdict(self)

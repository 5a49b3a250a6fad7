"""Interleaved side-by-side timing: call order, counts and the two clocks."""

from __future__ import annotations

import time

from scd_train.metrics.timing import MachineLoad, interleaved


def test_candidates_alternate_and_order_flips_each_repeat():
    calls: list[str] = []
    stats = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(s.wall) == 4 and len(s.cpu) == 4 for s in stats.values())


def test_sleep_counts_as_wall_time_but_not_cpu_time():
    stats = interleaved({"sleep": lambda: time.sleep(0.02)}, repeats=3, warmup=0)["sleep"]
    assert stats.minimum >= 0.02
    assert stats.cpu_median < 0.01
    summary = stats.summary()
    assert summary["calls"] == 3 and summary["wall_s_min"] <= summary["wall_s_median"]


def test_machine_load_is_recorded():
    load = MachineLoad.now().to_dict()
    assert load["cpu_count"] >= 1 and load["torch_threads"] >= 1 and "loadavg_1m" in load

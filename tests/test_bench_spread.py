"""Benchmark verdicts from spreads: met / missed only when every round agrees, none on a busy machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.benchmarks.timing import BenchResult, Timings, verdict

IDLE = {"wall_seconds": 10.0, "cpu_seconds": 19.0, "load_1min": 2.0, "cpus": 2}


def test_verdict_needs_the_whole_spread_on_one_side():
    assert verdict([7.2, 7.9, 8.4], 8.5, IDLE) == "met"
    assert verdict([8.6, 9.0, 9.4], 8.5, IDLE) == "missed"
    assert verdict([7.22, 8.0, 8.82], 8.5, IDLE) == "undecided"  # the two runs, in one spread
    assert verdict([7.0, 7.5, 8.0], 8.5, {**IDLE, "load_1min": 4.0}) == "withheld (machine busy)"
    assert verdict(None, 8.5, IDLE).startswith("undecided")


def test_ratios_are_taken_round_by_round():
    timings = Timings({"a": [2.0, 4.0, 3.0], "b": [1.0, 1.0, 2.0]}, IDLE)
    median, spread = timings.ratio("a", "b")
    assert spread == [1.5, 2.0, 4.0] and median == 2.0  # per round, not median(a) / median(b) = 3.0
    result = BenchResult("x", dict(timings), {"a / b": median}, {"a / b": 3.0}, spreads={"a / b": spread}, machine=IDLE)
    assert result.verdicts == {"a / b": "undecided"}
    assert any("[1.500 .. 4.000]" in line and "undecided" in line for line in result.lines())


def test_workers_own_load_is_not_other_load_when_idle_probes_say_so():
    """A grid benchmark's Ray workers are separate processes: during the calls the load average counts
    them as "others" (the quick grid once read 2.2 on 2 CPUs with nothing else running). Its verdict
    rests on idle probes before and after instead."""
    ray_grid = {"wall_seconds": 100.0, "cpu_seconds": 3.0, "load_1min": 2.2, "cpus": 2}
    assert verdict([0.7, 0.75, 0.78], 0.8, ray_grid) == "withheld (machine busy)"
    assert verdict([0.7, 0.75, 0.78], 0.8, {**ray_grid, "other_cores": 0.1}) == "met"
    assert verdict([0.7, 0.75, 0.78], 0.8, {**ray_grid, "other_cores": 0.9}) == "withheld (machine busy)"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="busy_cores reads /proc/stat (Linux)")
def test_busy_cores_sees_a_process_that_is_not_ours():
    import subprocess
    import sys

    from harness.training.resources import busy_cores

    quiet = busy_cores(1.0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(1.0)
        assert busy > 0.7  # the spinner keeps one core busy while the prober sleeps
        assert busy - quiet > 0.5, (quiet, busy)  # idle time is not counted as busy
    finally:
        spinner.kill()
        spinner.wait()

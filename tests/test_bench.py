"""`harness bench`: every registered benchmark runs at --quick sizes and its results are stored as data.

Speed goals are judged by running the bench on the machine in question, never here; these tests
check that each benchmark runs, measures something and writes a traceable record.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from harness.benchmarks.timing import BENCHMARKS
from harness.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _ in BENCHMARKS.items()])
def test_every_benchmark_runs_and_is_recorded(name, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", name, "--quick", "--repeats", "1", "--warmup", "0", "--json", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["environment"]["git"]["commit"] and record["environment"]["device"]["type"] == "cpu"
    assert record["options"]["quick"] is True and record["results"]
    for row in record["results"]:
        assert row["benchmark"] == name
        assert all(sec > 0 for sec in row["seconds"].values())
        assert row["ratios"] and all(math.isfinite(r) and r > 0 for r in row["ratios"].values())
        assert set(row["targets"]) <= set(row["ratios"])
        for ratio in row["ratios"].values():  # what was printed is what was stored
            assert f"{ratio:10.3f}" in result.output


def test_unwritable_json_path_fails_before_benchmarking(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "b.json"  # its "directory" is a file
    result = CliRunner().invoke(main, ["bench", "at-step", "--quick", "--json", str(target)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: directory {target.parent} is not writable (it is a file); pass another --json"
    ]
    assert "device:" not in result.output  # nothing was benchmarked


def test_each_benchmark_has_its_own_default_rounds_and_repeats_overrides_them():
    import torch

    from harness.benchmarks.timing import Benchmark, BenchOptions

    seen = []
    bench = Benchmark("probe", "records the rounds it was given", lambda o: seen.append(o.repeats) or [], rounds=3)
    bench(BenchOptions(device=torch.device("cpu")))
    bench(BenchOptions(device=torch.device("cpu"), repeats=7))
    assert seen == [3, 7]
    # a grid round trains whole grids (minutes on 2 cores): fewer default rounds than the step benchmarks
    assert BENCHMARKS.get("quick-grid").rounds < BENCHMARKS.get("at-step").rounds

"""Table 3 and the cost verdict: no precision mixing in a cell, no timing verdict from a busy machine."""

from __future__ import annotations

from pathlib import Path

from report_fixture import FakeRun, run_record

from harness.reporting.claims_cost import cost
from harness.reporting.loading import Run
from harness.reporting.table3 import table3
from harness.reporting.tables import group_runs
from harness.reporting.verdicts import INCONCLUSIVE
from harness.training.resources import contended


def runs(tmp_path: Path, busy: bool = False, ades_precision: str = "fp32") -> list[Run]:
    out = []
    for defense, seconds in (("pgd-at", 10.0), ("ades", 10.5)):
        for seed in (0, 1, 2):
            record = run_record(FakeRun(defense, seed, clean=80.0, pgd=50.0, epoch_seconds=seconds), tmp_path)
            if defense == "ades":
                record["spec"]["precision"] = ades_precision
            for entry in record["epochs"]:  # 2 CPUs; this process used 1.9 of them; load 2.0 or 6.0
                entry["resources"] = {
                    "wall_seconds": entry["train_seconds"],
                    "cpus": 2,
                    "cpu_seconds": 1.9 * entry["train_seconds"],
                    "load_1min": 6.0 if busy else 2.0,
                }
            out.append(Run(tmp_path / record["run_id"], record))
    return out


def test_contention_rule_counts_other_processes_only():
    idle = {"wall_seconds": 10.0, "cpu_seconds": 19.0, "load_1min": 2.2, "cpus": 2}
    assert contended(idle) is False  # its own two threads make the load
    assert contended({**idle, "load_1min": 3.0}) is True  # another process took over half a core
    assert contended({}) is None and contended({**idle, "load_1min": None}) is None


def test_cost_verdict_is_given_on_an_idle_machine_and_withheld_on_a_busy_one(tmp_path):
    idle = cost(group_runs(runs(tmp_path / "idle")))
    assert len(idle) == 1 and idle[0].verdict != INCONCLUSIVE  # x1.05 against the claim x1.12: decided
    busy = cost(group_runs(runs(tmp_path / "busy", busy=True)))
    assert busy[0].verdict == INCONCLUSIVE and any("withheld" in n for n in busy[0].details)
    (table,) = table3(group_runs(runs(tmp_path / "busy2", busy=True)))
    assert any("busy machine" in n for n in table.notes)


def test_bf16_and_fp32_runs_never_share_a_cell(tmp_path):
    groups = group_runs(runs(tmp_path, ades_precision="bf16"))
    assert len(groups) == 2  # two protocols: fp32 (pgd-at) and bf16 (ades)
    labels = sorted(p.label() for p in groups)
    assert "trained bf16" in labels[0] + labels[1]
    for variants in groups.values():
        assert len(variants) == 1
    assert cost(groups)[0].verdict == INCONCLUSIVE  # no PGD-AT run in ADES's precision: nothing to compare

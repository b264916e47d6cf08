"""`harness report`: the paper's Tables 1-3, curves and claim verdicts from the records on disk.

    load_results(dir) -> Results          run + evaluation records; corrupt files named and skipped
    build(results)    -> Report           tables (per protocol), figures, verdicts
    write(report, out) -> report.html     plus tables/*.csv and tables/*.tex

The report never trains or attacks: it is a pure function of the results directory and the
reference numbers in harness/data/.
"""

from __future__ import annotations

from pathlib import Path

from harness.reporting.loading import Results, load_results
from harness.reporting.render import Report, build, write

__all__ = ["Report", "Results", "build", "load_results", "make_report", "write"]


def make_report(results_dir: Path, out_dir: Path, checkpoint: str = "last") -> tuple[Path, Report]:
    report = build(load_results(results_dir), checkpoint)
    return write(report, out_dir), report

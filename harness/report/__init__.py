"""`harness report`: the paper's Tables 1-3, curves and claim verdicts from the records on disk.

    load_results(dir) -> Results          run + evaluation records; corrupt files named and skipped
    build(results)    -> Report           tables (per protocol), figures, verdicts
    write(report, out) -> report.html     plus tables/*.csv and tables/*.tex

The report never trains or attacks: it is a pure function of the results directory and the
reference numbers in harness/data/.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from harness.report.loading import Results, load_results
from harness.report.render import Report, build, write

__all__ = ["Report", "Results", "build", "load_results", "make_report", "write"]


def make_report(results_dir: Path, out_dir: Path, checkpoint: str = "last") -> tuple[Path, Report]:
    report = build(load_results(results_dir), checkpoint)
    return write(report, out_dir), report


class _CallablePackage(types.ModuleType):
    """`harness.report(...)` is the library call (harness.api.report), and `harness.report` this package:
    one name cannot hold both, so the package, once imported, answers the call."""

    def __call__(self, *args, **kwargs):
        from harness.api import report

        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

"""The report's reliability view: every evaluation record, its checks, and the checks that did not run.

A failed check marks every number of that evaluation "potentially unreliable" (Tables 1-3 use
`tables.reliability_cell`); a skipped check is shown with the reason and the `harness eval` command
that would run it, so "all checks passed" never hides that the masking-sensitive ones were not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pandas as pd

from harness.reporting.loading import Results, eps_key
from harness.reporting.tables import Cell, Table, reliability_cell


@dataclass(frozen=True)
class EvaluationChecks:
    """One evaluation's checks, for the list under the table."""

    name: str
    path: str
    failed: list[dict]
    skipped: list[dict]


def evaluations_table(results: Results) -> Table | None:
    if not results.evaluations:
        return None
    rows = [_evaluation_rows(e) for e in results.evaluations]
    return Table(
        "evaluations",
        "Evaluation records and reliability checks",
        "",
        pd.DataFrame([export for export, _ in rows]),
        [display for _, display in rows],
        [
            "A check that fails marks every number from that evaluation "
            "“potentially unreliable”; hover a badge for the check's detail.",
            "Checks that did not run are listed below with the command that runs them.",
        ],
    )


def _evaluation_rows(e) -> tuple[dict, dict]:
    """One evaluation's (export row, display row)."""
    ordered = sorted(e.data["results"], key=lambda r: (r["attack"], _eps_value(r["eps"])))
    results_text = "; ".join(f"{r['attack']}@{r['eps']}: {r['robust_accuracy']:.2f}" for r in ordered[:12])
    if len(e.data["results"]) > 12:
        results_text += f"; … ({len(e.data['results'])} results)"
    escalated = escalation_text(e.data)
    if escalated:
        results_text = f"escalated {escalated}; {results_text}"
    skipped = [str(c.get("name")) for c in e.skipped_checks]
    export = {
        "path": str(e.path.parent),
        "source": e.source,
        "name": e.name,
        "label": e.label,
        "dataset": e.data["dataset"],
        "model": e.data["model"],
        "n": e.data["n"],
        "clean": e.data["clean_accuracy"],
        "checks": len(e.checks),
        "failed_checks": len(e.failed_checks),
        "skipped_checks": len(skipped),
        "nested_balls": bool(e.data.get("config", {}).get("nested_balls")),
        "escalated": escalated,
        "flags": e.flags_note or "present",
    }
    display = {
        "Checkpoint": Cell(f"{e.name} [{e.label}]", "method", str(e.path.parent)),
        "Source": e.source,
        "Data set / model": f"{e.data['dataset']} / {e.data['model']}",
        "n": str(e.data["n"]),
        "Clean": f"{float(e.data['clean_accuracy']):.2f}",
        "Results": results_text,
        "Reliability": reliability_cell([e]),
        "Not run": Cell(", ".join(skipped), "muted", "see the list below for the commands")
        if skipped
        else Cell("—", "muted"),
        "Per-example flags": Cell("present", "good") if not e.flags_note else Cell("missing", "muted", e.flags_note),
    }
    return export, display


def escalation_text(data: dict) -> str:
    """'worst-case@1/5 14.20 → 12.00': the numbers the evaluation escalated because PGD-20 had not
    converged there (harness.evaluation.escalation; 'before' is PGD-20's worst case); '' when none was."""
    items = [e for e in data.get("escalations", []) if isinstance(e, dict)]
    return "; ".join(
        f"{e.get('escalated')}@{e.get('eps')} {float(e.get('before', 0)):.2f} → "
        f"{float(e.get('after', 0)):.2f}" + ("" if e.get("converged") else " (not converged)")
        for e in items
    )


def check_details(results: Results) -> list[EvaluationChecks]:
    """Evaluations with a failed or skipped check, failed ones first."""
    out = [
        EvaluationChecks(f"{e.name} [{e.label}]", str(e.path.parent), e.failed_checks, e.skipped_checks)
        for e in results.evaluations
        if e.failed_checks or e.skipped_checks
    ]
    return sorted(out, key=lambda c: (not c.failed, c.name))


def _eps_value(text: str) -> float:
    try:
        return float(Fraction(eps_key(text)))
    except (ValueError, ZeroDivisionError):
        return float("inf")

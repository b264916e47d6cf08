"""The report's reliability view: every evaluation record, its checks, and the checks that did not run.

A failed check marks every number of that evaluation "potentially unreliable" (Tables 1-3 use
`tables.reliability_cell`); a skipped check is shown with the reason and the `harness eval` command
that would run it, so "all checks passed" never hides that the masking-sensitive ones were not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from harness.reporting.loading import Evaluation, Results, eps_key
from harness.reporting.tables import Cell, Column, Table, exported, reliability_cell, shown, spec_table


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
    return spec_table(
        "evaluations",
        "Evaluation records and reliability checks",
        "",
        EVALUATION_COLUMNS,
        [EvaluationRow(e) for e in results.evaluations],
        [
            "A check that fails marks every number from that evaluation "
            "“potentially unreliable”; hover a badge for the check's detail.",
            "Checks that did not run are listed below with the command that runs them.",
        ],
    )


@dataclass(frozen=True)
class EvaluationRow:
    """One evaluation record as a row of the evaluations table; the columns read from it."""

    evaluation: Evaluation

    @property
    def data(self) -> dict:
        return self.evaluation.data

    @property
    def skipped(self) -> list[str]:
        return [str(c.get("name")) for c in self.evaluation.skipped_checks]

    def results_text(self) -> str:
        """The first 12 results by attack and eps, after what the evaluation escalated."""
        ordered = sorted(self.data["results"], key=lambda r: (r["attack"], _eps_value(r["eps"])))
        text = "; ".join(f"{r['attack']}@{r['eps']}: {r['robust_accuracy']:.2f}" for r in ordered[:12])
        if len(self.data["results"]) > 12:
            text += f"; … ({len(self.data['results'])} results)"
        escalated = escalation_text(self.data)
        return f"escalated {escalated}; {text}" if escalated else text


def _not_run_cell(row: EvaluationRow) -> Cell:
    if not row.skipped:
        return Cell("—", "muted")
    return Cell(", ".join(row.skipped), "muted", "see the list below for the commands")


def _flags_cell(row: EvaluationRow) -> Cell:
    note = row.evaluation.flags_note
    return Cell("missing", "muted", note) if note else Cell("present", "good")


EVALUATION_COLUMNS = (
    exported("path", lambda r: str(r.evaluation.path.parent)),
    shown(
        "Checkpoint",
        lambda r: Cell(f"{r.evaluation.name} [{r.evaluation.label}]", "method", str(r.evaluation.path.parent)),
    ),
    Column("Source", "source", lambda r: r.evaluation.source, lambda r: r.evaluation.source),
    exported("name", lambda r: r.evaluation.name),
    exported("label", lambda r: r.evaluation.label),
    exported("dataset", lambda r: r.data["dataset"]),
    exported("model", lambda r: r.data["model"]),
    shown("Data set / model", lambda r: f"{r.data['dataset']} / {r.data['model']}"),
    Column("n", "n", lambda r: r.data["n"], lambda r: str(r.data["n"])),
    Column("Clean", "clean", lambda r: r.data["clean_accuracy"], lambda r: f"{float(r.data['clean_accuracy']):.2f}"),
    shown("Results", EvaluationRow.results_text),
    exported("checks", lambda r: len(r.evaluation.checks)),
    exported("failed_checks", lambda r: len(r.evaluation.failed_checks)),
    shown("Reliability", lambda r: reliability_cell([r.evaluation])),
    Column("Not run", "skipped_checks", lambda r: len(r.skipped), _not_run_cell),
    exported("nested_balls", lambda r: bool(r.data.get("config", {}).get("nested_balls"))),
    exported("escalated", lambda r: escalation_text(r.data)),
    Column("Per-example flags", "flags", lambda r: r.evaluation.flags_note or "present", _flags_cell),
)


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

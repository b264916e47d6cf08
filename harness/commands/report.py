"""`harness report`: one self-contained HTML report (plus CSV and LaTeX tables) per results directory."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main
from harness.commands.path_options import results_option


@main.command("report")
@results_option("Directory of run records (and `harness eval` records).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder for report.html and tables/ (default: reports/<results folder name>).",
)
@click.option(
    "--checkpoint",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Checkpoint the verdicts and Table 2 use (Table 1 shows both).",
)
def report_command(results_dir: Path, out_dir: Path | None, checkpoint: str) -> None:
    """Tables 1-3, curves and claim verdicts from the records in --results; trains and attacks nothing.

    Corrupt records are named and skipped; runs of different protocols (data set, model, eps, epochs,
    test subset) get separate tables and are never averaged together.
    """
    from harness import api

    made = api.report(results_dir, out_dir, checkpoint)
    for problem in made.problems:
        click.echo(f"warning: {problem}", err=True)
    report = made.report
    click.echo(
        f"{len(report.results.runs)} run(s), {len(report.results.evaluations)} evaluation(s), "
        f"{len(report.protocols)} protocol(s); verdicts: "
        + ", ".join(f"{n} {k}" for k, n in made.verdict_counts.items())
    )
    for line in report.missing:
        click.echo(f"missing: {line}")
    click.echo(f"report: {made.html}")
    click.echo(f"tables: {made.tables} (CSV and LaTeX)")

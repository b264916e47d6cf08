"""`harness report`: one self-contained HTML report (plus CSV and LaTeX tables) per results directory."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main

DEFAULT_RESULTS = Path("results")
DEFAULT_REPORTS = Path("reports")


@main.command("report")
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=DEFAULT_RESULTS,
              show_default=True, help="Directory of run records (and `harness eval` records).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder for report.html and tables/ (default: reports/<results folder name>).")
@click.option("--checkpoint", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Checkpoint the verdicts and Table 2 use (Table 1 shows both).")
def report_command(results_dir: Path, out_dir: Path | None, checkpoint: str) -> None:
    """Tables 1-3, curves and claim verdicts from the records in --results; trains and attacks nothing.

    Corrupt records are named and skipped; runs of different protocols (data set, model, eps, epochs,
    test subset) get separate tables and are never averaged together.
    """
    from harness.report import build, load_results, write
    from harness.storage import ensure_writable_dir

    out = out_dir or DEFAULT_REPORTS / (results_dir.resolve().name or "results")
    results = load_results(results_dir)
    ensure_writable_dir(out, "--out")  # before any work: a report that cannot be written is not built
    ensure_writable_dir(out / "tables", "--out")
    for problem in results.problems:
        click.echo(f"warning: {problem}", err=True)
    report = build(results, checkpoint)
    html = write(report, out)
    counts = {v: sum(x.verdict == v for x in report.verdicts) for v in ("supported", "contradicted", "inconclusive")}
    click.echo(f"{len(results.runs)} run(s), {len(results.evaluations)} evaluation(s), "
               f"{len(report.protocols)} protocol(s); verdicts: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for line in report.missing:
        click.echo(f"missing: {line}")
    click.echo(f"report: {html}")
    click.echo(f"tables: {out / 'tables'} (CSV and LaTeX)")

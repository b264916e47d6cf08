"""`harness export`: our runs in another benchmark's format (RobustBench model_info JSON)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main
from harness.commands.path_options import results_option


@main.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["robustbench"]),
    required=True,
    help="robustbench: one model_info JSON per run, as in RobustBench's model_info/ folder.",
)
@results_option("Run records and their `harness eval` records.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("model_info"),
    show_default=True,
    help="Writes <out>/<dataset>/Linf/<run id>.json.",
)
@click.option("--checkpoint", "label", type=click.Choice(["last", "best"]), default="last", show_default=True)
@click.option(
    "--eps", default=None, metavar="EPS", help="The budget to export (default: each run's training eps), e.g. 8/255."
)
def export_command(fmt: str, results_dir: Path, out_dir: Path, label: str, eps: str | None) -> None:
    """Write runs evaluated with AutoAttack as RobustBench model_info JSON (clean, AutoAttack, eps,
    architecture; defense, schedule, seed, commit and failed checks in the footnote)."""
    from harness.core.config import fraction_str, parse_eps
    from harness.core.errors import HarnessError
    from harness.evaluation.model_info import exports
    from harness.storage.atomic import write_json

    if not Path(results_dir).is_dir():
        raise HarnessError(f"--results {results_dir} is not a directory")
    done, skipped = exports(results_dir, label, fraction_str(parse_eps(eps)) if eps else None)
    for line in skipped:
        click.echo(f"skipped {line}", err=True)
    for item in done:
        path = out_dir / item.dataset / "Linf" / f"{item.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, item.info)
        for warning in item.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(
            f"{path}  clean {item.info['clean_acc']}  AutoAttack {item.info['autoattack_acc']} @ {item.info['eps']}"
        )
    if not done:
        raise HarnessError(f"no run in {results_dir} has an AutoAttack evaluation to export ({len(skipped)} skipped)")
    click.echo(f"exported {len(done)} run(s), skipped {len(skipped)}")

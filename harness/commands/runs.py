"""`harness runs`: the table of all run records (pandas), for a quick look or a CSV; `--grid`: one grid's state."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main
from harness.commands.path_options import results_option

COLUMNS = (
    "defense",
    "dataset",
    "model",
    "preset",
    "seed",
    "eps",
    "precision",
    "compile",
    "world_size",
    "epochs",
    "last_clean",
    "last_pgd",
    "best_clean",
    "best_pgd",
    "collapsed",
    "mean_epoch_seconds",
    "status",
    "run_id",
)


@main.command("runs")
@results_option("Directory of run records.")
@click.option("--all", "include_running", is_flag=True, help="Include unfinished (running or interrupted) runs.")
@click.option(
    "--grid",
    "grid_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="One row per run of this grid file, never-started runs included, with its state.",
)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a text table.")
def runs_command(results_dir: Path, include_running: bool, grid_path: Path | None, as_csv: bool) -> None:
    """One row per run: defense, data set, model, seed, precision, compile, world size, final clean/PGD
    accuracy, epoch time and status ("running (pid N)" only while its process lives; "interrupted" once it
    was killed: rerun it with --resume)."""
    from harness.core.errors import HarnessError
    from harness.storage.atomic import existing_dir
    from harness.storage.records import runs_table

    warn = lambda message: click.echo(f"warning: {message}", err=True)  # noqa: E731
    if grid_path is not None:
        table = grid_table(grid_path, results_dir, warn)
    else:
        existing_dir(results_dir, "--results", hint="run `harness run` first or pass --results")
        table = runs_table(results_dir, status=None if include_running else "complete", on_problem=warn)
        if table.empty:
            raise HarnessError(f"no {'' if include_running else 'completed '}runs in {results_dir}")
    columns = [c for c in COLUMNS if c in table]
    table = table[columns] if grid_path is not None else table[columns].sort_values(["dataset", "defense", "seed"])
    click.echo(table.to_csv(index=False) if as_csv else table.to_string(index=False, float_format="%.2f"))
    if grid_path is not None and not as_csv:
        counts = table["status"].map(lambda s: s.split(" (")[0].split(":")[0]).value_counts()
        click.echo(f"{grid_path}: {len(table)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if grid_path is None and not as_csv:
        click.echo("\nover seeds (mean ± std, n = seeds; ‡ fewer than 3 seeds: no verdict rests on it):")
        click.echo(seed_summary(table).to_string(index=False))


def grid_table(grid_path: Path, results_dir: Path, warn):
    """Every run of the grid in its order: its record's row, or its identity and "not started"."""
    import pandas as pd

    from harness.scale.grid import load_grid
    from harness.storage.records import RECORD_NAME, record_row, run_state

    rows = []
    for spec in load_grid(grid_path).specs():
        state, record = run_state(results_dir, spec.run_id)
        if state.startswith("corrupt"):
            warn(state)
        row = (
            record_row(Path(results_dir) / spec.run_id / RECORD_NAME, record)
            if record
            else {
                "defense": spec.defense,
                "dataset": spec.dataset,
                "model": spec.model,
                "preset": spec.preset,
                "seed": spec.seed,
                "eps": str(spec.eps),
                "precision": spec.precision,
                "epochs": 0,
                "run_id": spec.run_id,
            }
        )
        rows.append({**row, "status": state.split(":")[0] if state.startswith("corrupt") else state})
    return pd.DataFrame(rows)


SEED_GROUP = ("dataset", "model", "preset", "eps", "epochs", "precision", "compile", "world_size", "defense")
FEW_SEEDS = 3


def seed_summary(table):
    """One row per (protocol, defense): mean ± std over seeds of the final metrics, with the seed count."""
    keys = [k for k in SEED_GROUP if k in table]
    metrics = [m for m in ("last_clean", "last_pgd", "best_clean", "best_pgd") if m in table]
    rows = []
    for group, members in table.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        n = members["seed"].nunique()
        row["seeds"] = f"{n}" + (" ‡" if n < FEW_SEEDS else "")
        for metric in metrics:
            values = members[metric].dropna()
            row[metric] = (
                f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
                if len(values)
                else "—"
            )
        rows.append(row)
    import pandas as pd

    return pd.DataFrame(rows)

"""`harness runs`: the table of all run records (pandas), for a quick look or a CSV."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main


@main.command("runs")
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Directory of run records.")
@click.option("--all", "include_running", is_flag=True, help="Include interrupted (running) runs.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a text table.")
def runs_command(results_dir: Path, include_running: bool, as_csv: bool) -> None:
    """One row per run: defense, data set, model, seed, final clean/PGD accuracy, epoch time."""
    from harness.errors import HarnessError
    from harness.records import runs_table

    if not results_dir.is_dir():
        raise HarnessError(f"results directory {results_dir} does not exist; run `harness run` first or pass --results")
    full = table = runs_table(results_dir, status=None if include_running else "complete",
                       on_problem=lambda message: click.echo(f"warning: {message}", err=True))
    if table.empty:
        raise HarnessError(f"no {'' if include_running else 'completed '}runs in {results_dir}")
    columns = [c for c in ("defense", "dataset", "model", "preset", "seed", "eps", "epochs", "last_clean",
                           "last_pgd", "best_clean", "best_pgd", "precision", "compile", "world_size", "collapsed",
                           "mean_epoch_seconds", "status", "run_id")
               if c in table]
    table = table[columns].sort_values(["dataset", "defense", "seed"])
    click.echo(table.to_csv(index=False) if as_csv else table.to_string(index=False, float_format="%.2f"))
    if not as_csv:
        click.echo("\nover seeds (mean ± std, n = seeds; ‡ fewer than 3 seeds: no verdict rests on it):")
        click.echo(seed_summary(full).to_string(index=False))


SEED_GROUP = ("dataset", "model", "preset", "eps", "epochs", "defense")
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
            row[metric] = (f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
                           if len(values) else "—")
        rows.append(row)
    import pandas as pd

    return pd.DataFrame(rows)

"""`harness bench`: speed goals, measured in one process with alternating variants."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import click

from harness.cli import main


@main.command("bench")
@click.argument("names", nargs=-1)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--repeats",
    type=int,
    default=None,
    help="Alternating timed rounds; each ratio is reported as min / median / max over them. "
    "[default: each benchmark's own: 11, 3 for the grid benchmarks, whose rounds take minutes]",
)
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls per variant first.")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks that every benchmark runs, not its numbers.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the results, options and environment (commit, versions, device) here.",
)
def bench_command(names, device, repeats, warmup, quick, json_path):
    """Run benchmarks (all, or the NAMES given; see `harness list benchmarks`) and print ratios."""
    from harness.benchmarks.timing import BENCHMARKS, BenchOptions
    from harness.core.environment import environment, resolve_device
    from harness.core.errors import HarnessError
    from harness.storage.atomic import ensure_writable_dir

    if (repeats is not None and repeats < 1) or warmup < 0:
        raise HarnessError("--repeats must be at least 1 and --warmup at least 0")
    if json_path is not None:
        ensure_writable_dir(json_path.parent, "--json")  # before minutes of benchmarking, not after
    dev = resolve_device(device)
    options = BenchOptions(device=dev, repeats=repeats, warmup=warmup, quick=quick)
    selected = [BENCHMARKS.get(n) for n in names] if names else [b for _, b in BENCHMARKS.items()]
    env = environment(dev)
    info = env["device"]
    click.echo(
        f"device: {info['name']}, torch threads {info['torch_threads']}, "
        f"freed memory kept (harness.training.allocator): {'yes' if info['keep_freed_memory'] else 'no'}"
    )
    results = []
    for bench in selected:
        for result in bench(options):
            results.append(
                {
                    "benchmark": bench.name,
                    "rounds": repeats or bench.rounds,
                    **asdict(result),
                    "verdicts": result.verdicts,
                }
            )
            for line in result.lines():
                click.echo(line)
    if json_path is not None:
        _write_results(json_path, repeats, warmup, quick, env, results)


def _write_results(json_path: Path, repeats: int | None, warmup: int, quick: bool, env: dict, results: list) -> None:
    """The results with the options and environment that produced them (commit, versions, device)."""
    from harness.storage.atomic import write_json

    statistic = (
        "per-round ratios over alternating calls (min/median/max), warm-up excluded; "
        "met/missed only when the whole spread is on one side"
    )
    options = {"repeats": repeats or "per benchmark", "warmup": warmup, "quick": quick, "statistic": statistic}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(json_path, {"schema": 1, "created": created, "options": options, "environment": env, "results": results})
    click.echo(f"-> {json_path}")

"""`harness bench`: speed goals, measured in one process with alternating variants."""

from __future__ import annotations

import click

from harness.cli import main


@main.command("bench")
@click.argument("names", nargs=-1)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed calls per variant.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls per variant first.")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks that every benchmark runs, not its numbers.")
def bench_command(names, device, repeats, warmup, quick):
    """Run benchmarks (all, or the NAMES given; see `harness list benchmarks`) and print ratios."""
    from harness.bench import BENCHMARKS, BenchOptions
    from harness.environment import describe_device, resolve_device
    from harness.errors import HarnessError

    if repeats < 1 or warmup < 0:
        raise HarnessError("--repeats must be at least 1 and --warmup at least 0")
    dev = resolve_device(device)
    options = BenchOptions(device=dev, repeats=repeats, warmup=warmup, quick=quick)
    selected = [BENCHMARKS.get(n) for n in names] if names else [b for _, b in BENCHMARKS.items()]
    info = describe_device(dev)
    click.echo(f"device: {info['name']}, torch threads {info['torch_threads']}, "
               f"freed memory kept (harness.allocator): {'yes' if info['keep_freed_memory'] else 'no'}")
    for bench in selected:
        for result in bench.run(options):
            for line in result.lines():
                click.echo(line)

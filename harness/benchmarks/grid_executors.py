"""What the Ray executor costs and what it buys on a grid of runs (issue 15).

`ray-overhead`: a smoke grid (two PGD-AT runs of seconds each) through the local executor and
through Ray restricted to one CPU, both at one torch thread, so that the runs are sequential either
way and the ratio is Ray's price: starting a local instance, its worker processes, relaying lines.

`quick-grid`: the 2-core quick grid (PGD-AT, quick preset, seeds 1 and 2) as the sequential loop
with two torch threads against Ray with the two runs at once on one thread each: the same two
cores, the same total thread count. Target: at most 0.8 of the sequential wall time. (Two plain
processes with OMP_NUM_THREADS=1 measured 0.83.) The thread count changes results in the last
digit, so both variants' records carry it; they are compared for speed only.

Every call trains a whole grid into a fresh results directory (nothing is skipped as complete) and
each Ray call starts and stops its own local instance, as a `harness run --executor ray` does. At
--quick sizes both use the smoke preset on the synthetic set. At most one untimed warm-up grid per
variant: a grid is long, and its first run already pays the one-time costs.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from harness.benchmarks.timing import BenchOptions, BenchResult, Timings, alternate, ratio_result, register_benchmark
from harness.core.config import RunSpec
from harness.core.datasets import DATASETS, load_split
from harness.core.errors import HarnessError
from harness.scale.executors import Executor, LocalExecutor, RayExecutor, raise_failures
from harness.training.resources import busy_cores
from harness.training.runner import RunOptions
from harness.training.specs import make_spec

QUICK_GRID_TARGET = 0.8


def grid_call(executor: Executor, specs: list[RunSpec], data_dir: Path | None) -> Callable[[], None]:
    """One call: the whole grid into a fresh results directory, removed afterwards."""
    from harness.api import run_jobs

    def call() -> None:
        results = Path(tempfile.mkdtemp(prefix="harness-bench-grid-"))
        try:
            options = RunOptions(results_dir=results, data_dir=data_dir, device=torch.device("cpu"), progress=False)
            raise_failures(list(executor.execute(run_jobs(specs, options), lambda _: None)), noun="run")
        finally:
            shutil.rmtree(results, ignore_errors=True)

    return call


def ray_missing() -> BenchResult | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return BenchResult(name="skipped", seconds={}, notes="Ray is not installed: pip install 'harness[ray]'")
    return None


def smoke_data(root: Path) -> Path:
    """The synthetic set in `root` (written once), so a bench needs no download."""
    load_split(DATASETS.get("synthetic"), root, train=True)
    return root


def timed(variants: dict[str, Callable[[], None]], options: BenchOptions) -> Timings:
    """Alternating grid calls. The grid's Ray workers are processes of their own, so the load during
    the calls cannot tell them from other users: the machine is probed idle before and after instead."""
    before = busy_cores()
    timings = alternate(variants, dataclasses.replace(options, warmup=min(options.warmup, 1)))
    probes = [v for v in (before, busy_cores()) if v is not None]
    if probes:
        timings.machine.update(other_cores=max(probes), other_cores_from="idle probes before and after")
    return timings


@register_benchmark(
    "ray-overhead",
    "a smoke grid through Ray (1 CPU, fresh local instance) over the local "
    "executor, both sequential at 1 thread: Ray's overhead",
    rounds=5,
)
def ray_overhead(options: BenchOptions) -> list[BenchResult]:
    if (skipped := ray_missing()) is not None:
        return [skipped]
    with tempfile.TemporaryDirectory(prefix="harness-bench-data-") as root:
        data_dir = smoke_data(Path(root))
        specs = [make_spec("pgd-at", "synthetic", "smoke", seed) for seed in (0, 1)]
        local, ray = "local executor, 1 thread", "ray executor, 1 CPU, 1 thread (instance started per grid)"
        seconds = timed(
            {
                local: grid_call(LocalExecutor(threads=1), specs, data_dir),
                ray: grid_call(RayExecutor(num_cpus=1, cpus_per_run=1), specs, data_dir),
            },
            options,
        )
    return [
        ratio_result(
            f"smoke grid of {len(specs)} PGD-AT runs, synthetic set (cpu)",
            seconds,
            {"ray / local": (ray, local)},
            notes="sequential both ways: the ratio is the executor's price, not parallelism",
        )
    ]


@register_benchmark(
    "quick-grid",
    "the 2-core quick grid (PGD-AT seeds 1, 2): Ray, two runs at once on 1 thread "
    "each, over the sequential loop on 2 threads; target <= 0.8",
    rounds=3,
)
def quick_grid(options: BenchOptions) -> list[BenchResult]:
    if (skipped := ray_missing()) is not None:
        return [skipped]
    with tempfile.TemporaryDirectory(prefix="harness-bench-data-") as root:
        if options.quick:
            data_dir, dataset, preset = smoke_data(Path(root)), "synthetic", "smoke"
        else:
            data_dir, dataset, preset = None, "fashion-mnist", "quick"
            try:
                load_split(DATASETS.get(dataset), None, train=True, download=False)
            except HarnessError as exc:
                raise HarnessError(f"the quick-grid benchmark needs Fashion-MNIST: {exc}") from None
        specs = [make_spec("pgd-at", dataset, preset, seed) for seed in (1, 2)]
        sequential, parallel = "sequential loop, 2 threads", "ray, 2 runs at once, 1 thread each"
        seconds = timed(
            {
                sequential: grid_call(LocalExecutor(threads=2), specs, data_dir),
                parallel: grid_call(RayExecutor(num_cpus=2, cpus_per_run=1), specs, data_dir),
            },
            options,
        )
    label = "ray parallel / sequential"
    return [
        ratio_result(
            f"{preset} grid of {len(specs)} PGD-AT runs on {dataset}, 2 cores (cpu)",
            seconds,
            {label: (parallel, sequential)},
            targets={label: QUICK_GRID_TARGET},
            notes="equal thread counts (2 in all); Ray's instance start is included",
        )
    ]

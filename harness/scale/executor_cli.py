"""The executor options that `harness run` and `harness eval` share, and the glue from them to jobs.

`executor_options` adds --executor, --address, --cpus-per-run, --gpus-per-run and --max-retries
to a command; `build_executor` checks them and returns a `LocalExecutor` or `RayExecutor`.
`run_targets` runs a library function once per independent TARGET (`harness eval`): in turn here,
or under `--executor ray` one Ray task per target, so a task evaluates exactly as `harness eval
TARGET` would. No click function is called from a worker: the command parses, this module runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from harness.core.errors import HarnessError
from harness.scale.executors import Executor, Job, LocalExecutor, RayExecutor, execute_all, torch_threads

_OPTIONS = (
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="local: one job after another in this process; ray: each run (or eval target) a Ray "
        "task, retried from its last checkpoint if its worker dies (pip install 'harness[ray]').",
    ),
    click.option(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. auto (the one this machine is in) or ray://head:10001. "
        "Default: start a local Ray instance with every core.",
    ),
    click.option(
        "--cpus-per-run",
        type=int,
        default=None,
        metavar="N",
        help="CPU cores, and torch threads, per run. Default: 1 under ray (one run per core), "
        "torch's default locally. Recorded in each record (torch_threads).",
    ),
    click.option(
        "--gpus-per-run",
        type=float,
        default=0.0,
        show_default=True,
        metavar="F",
        help="GPUs per Ray task; a fraction packs several small runs on one GPU. 0: runs on CPUs.",
    ),
    click.option(
        "--max-retries",
        type=int,
        default=3,
        show_default=True,
        metavar="N",
        help="Times a Ray task whose worker died is resubmitted (it resumes, never restarts).",
    ),
)


def executor_options(fn: Callable) -> Callable:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def build_executor(
    executor: str,
    address: str | None,
    cpus_per_run: int | None,
    gpus_per_run: float,
    max_retries: int,
    shared_dir: Path | None,
) -> Executor:
    if cpus_per_run is not None and cpus_per_run < 1:
        raise HarnessError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    if gpus_per_run < 0 or max_retries < 0:
        raise HarnessError("--gpus-per-run and --max-retries cannot be negative")
    if executor == "local":
        if address is not None or gpus_per_run:
            raise HarnessError(
                "--address and --gpus-per-run are for --executor ray; locally, --device picks the device"
            )
        return LocalExecutor(threads=cpus_per_run)
    return RayExecutor(
        address=address,
        cpus_per_run=cpus_per_run or 1,
        gpus_per_run=gpus_per_run,
        max_retries=max_retries,
        shared_dir=Path(shared_dir).resolve() if shared_dir else None,
    )


def worker_device(device: str, executor: Executor) -> str:
    """The device a job uses: as asked locally; under Ray, what its resource share holds."""
    if isinstance(executor, LocalExecutor):
        return device
    if executor.gpus_per_run > 0:
        if device == "cpu":
            raise HarnessError("--device cpu with --gpus-per-run would hold GPUs that no run uses; drop one of them")
        return "cuda"
    if device == "cuda":
        raise HarnessError("--device cuda under --executor ray needs a GPU share: pass --gpus-per-run (e.g. 1 or 0.5)")
    return "cpu"


def absolute(path: Path | None) -> Path | None:
    """A path as every worker must read it: Ray workers do not share the driver's working directory."""
    return Path(path).resolve() if path is not None else None


# --------------------------------------------------------------------------- independent targets


def run_targets(
    per_target: Callable[[str, Any, Any], Any],
    targets: tuple[str, ...],
    settings: Any,
    device: str,
    executor: Executor,
    say: Callable[[str], None],
) -> None:
    """`per_target(target, settings, torch device)` for each target: in turn here, or one Ray task each.

    `per_target` is a library function (importable in a worker), never a click command; `settings`
    a frozen dataclass with `resume` and `force` fields, whose `*_dir` paths are made absolute for
    the workers.
    """
    if isinstance(executor, LocalExecutor):
        with torch_threads(executor.threads):
            for target in targets:
                on_device(per_target, target, settings, device)
        return
    execute_all(
        executor, target_jobs(per_target, targets, settings, worker_device(device, executor)), say, noun="target"
    )


def target_jobs(per_target: Callable[..., Any], targets: tuple[str, ...], settings: Any, device: str) -> list[Job]:
    """One job per target, its paths absolute; a retry after a lost worker resumes, never starts over (force)."""
    settings = dataclasses.replace(
        settings,
        **{
            f.name: absolute(getattr(settings, f.name)) for f in dataclasses.fields(settings) if f.name.endswith("_dir")
        },
    )
    retry = dataclasses.replace(settings, resume=True, force=False)
    jobs = []
    for target in targets:
        target = str(Path(target).resolve()) if Path(target).exists() else target
        jobs.append(
            Job(
                label=Path(target).name or target,
                fn=on_device,
                args=(per_target, target, settings, device),
                retry_args=(per_target, target, retry, device),
            )
        )
    return jobs


def on_device(per_target: Callable[..., Any], target: str, settings: Any, device: str) -> Any:
    """In this process or a worker: the device name resolved where the work runs (auto: cuda if present)."""
    from harness.core.environment import resolve_device

    return per_target(target, settings, resolve_device(device))

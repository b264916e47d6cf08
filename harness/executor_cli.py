"""The executor options that `harness run` and `harness eval` share, and the glue from them to jobs.

`executor_options` adds --executor, --address, --cpus-per-run, --gpus-per-run and --max-retries
to a command; `build_executor` checks them and returns a `LocalExecutor` or `RayExecutor`.
`distribute_targets` wraps a command whose TARGETS are independent (`harness eval`): under
`--executor ray` each target becomes one Ray task that calls the command's own function with that
target alone, so a task evaluates exactly as `harness eval TARGET` would.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Callable

import click

from harness.errors import HarnessError
from harness.executors import Executor, Job, LocalExecutor, RayExecutor, execute_all, torch_threads

_OPTIONS = (
    click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="local: one job after another in this process; ray: each run (or eval target) a Ray "
                      "task, retried from its last checkpoint if its worker dies (pip install 'harness[ray]')."),
    click.option("--address", default=None, metavar="ADDR",
                 help="Ray cluster to join, e.g. auto (the one this machine is in) or ray://head:10001. "
                      "Default: start a local Ray instance with every core."),
    click.option("--cpus-per-run", type=int, default=None, metavar="N",
                 help="CPU cores, and torch threads, per run. Default: 1 under ray (one run per core), "
                      "torch's default locally. Recorded in each record (torch_threads)."),
    click.option("--gpus-per-run", type=float, default=0.0, show_default=True, metavar="F",
                 help="GPUs per Ray task; a fraction packs several small runs on one GPU. 0: runs on CPUs."),
    click.option("--max-retries", type=int, default=3, show_default=True, metavar="N",
                 help="Times a Ray task whose worker died is resubmitted (it resumes, never restarts)."),
)


def executor_options(fn: Callable) -> Callable:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def build_executor(executor: str, address: str | None, cpus_per_run: int | None, gpus_per_run: float,
                   max_retries: int, shared_dir: Path | None) -> Executor:
    if cpus_per_run is not None and cpus_per_run < 1:
        raise HarnessError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    if gpus_per_run < 0 or max_retries < 0:
        raise HarnessError("--gpus-per-run and --max-retries cannot be negative")
    if executor == "local":
        if address is not None or gpus_per_run:
            raise HarnessError("--address and --gpus-per-run are for --executor ray; locally, --device picks the device")
        return LocalExecutor(threads=cpus_per_run)
    return RayExecutor(address=address, cpus_per_run=cpus_per_run or 1, gpus_per_run=gpus_per_run,
                       max_retries=max_retries, shared_dir=Path(shared_dir).resolve() if shared_dir else None)


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


# --------------------------------------------------------------------------- commands over independent targets

_TARGET_COMMANDS: dict[str, Callable[..., Any]] = {}


def distribute_targets(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a click command function with a `targets` parameter the executor options (see the module doc)."""
    key = f"{fn.__module__}:{fn.__qualname__}"
    _TARGET_COMMANDS[key] = fn

    @functools.wraps(fn)
    def command(*, executor, address, cpus_per_run, gpus_per_run, max_retries, **params):
        chosen = build_executor(executor, address, cpus_per_run, gpus_per_run, max_retries, params.get("results_dir"))
        if isinstance(chosen, LocalExecutor):
            with torch_threads(chosen.threads):
                return fn(**params)
        params = {**params, "device": worker_device(params.get("device", "auto"), chosen)}
        execute_all(chosen, target_jobs(key, params), click.echo, noun="target")

    return executor_options(command)


def target_jobs(key: str, params: dict[str, Any]) -> list[Job]:
    """One job per target, its paths absolute; a retry after a lost worker resumes, never starts over (--force)."""
    params = {**params, **{k: absolute(v) for k, v in params.items() if k.endswith("_dir")}}
    jobs = []
    for target in params["targets"]:
        target = str(Path(target).resolve()) if Path(target).exists() else target
        one = {**params, "targets": (target,)}
        jobs.append(Job(label=Path(target).name or target, fn=call_target_command, args=(key, one),
                        retry_args=(key, {**one, "resume": True, "force": False})))
    return jobs


def call_target_command(key: str, params: dict[str, Any]) -> Any:
    """In a worker: the command's own function (imported by its module) with one target."""
    importlib.import_module(key.partition(":")[0])
    return _TARGET_COMMANDS[key](**params)

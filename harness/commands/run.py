"""`harness run`: train and evaluate defenses; one run record per (defense, data set, seed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

from harness.cli import main
from harness.commands.path_options import data_dir_option, results_option
from harness.scale.executor_cli import executor_options

GRID_SETS = {
    "methods_": "--method",
    "all_methods": "--all",
    "dataset": "--dataset",
    "preset": "--preset",
    "seeds": "--seed",
    "epochs": "--epochs",
    "eps": "--eps",
    "model": "--model",
    "dropout": "--dropout",
    "overrides": "--set",
    "precision_name": "--precision",
    "batchnorm": "--batchnorm",
}  # what a grid file says, so not also on the command line


@main.command("run")
@click.option(
    "--grid",
    "grid_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="A TOML grid file (methods, data sets, seeds, preset, overrides per method; see grids/). "
    "Finished runs are skipped and interrupted ones resumed, so rerun it until complete.",
)
@click.option(
    "--method",
    "-m",
    "methods_",
    multiple=True,
    metavar="NAME",
    help="Defense to train (repeatable). See `harness list defenses`.",
)
@click.option("--all", "all_methods", is_flag=True, help="Train every registered defense.")
@click.option(
    "--dataset", "-d", default="fashion-mnist", show_default=True, help="Data set (see `harness list datasets`)."
)
@click.option(
    "--preset",
    "-p",
    default="quick",
    show_default=True,
    help="paper (the paper's 100-epoch protocol), quick (minutes on a CPU) or smoke (seconds).",
)
@click.option(
    "--seed",
    "seeds",
    multiple=True,
    type=int,
    default=(0,),
    show_default=True,
    help="Run seed (repeatable for several seeds).",
)
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Seeds 0..N-1 (instead of --seed; with --grid, instead of the grid's seeds). Verdicts need 3.",
)
@click.option("--epochs", type=int, default=None, help="Override the preset's number of (equivalent) epochs.")
@click.option(
    "--eps",
    default=None,
    metavar="EPS",
    help="L-inf budget as a fraction or decimal, e.g. 8/255 (default: the data set's).",
)
@click.option("--model", default=None, help="Override the preset's model (see `harness list models`).")
@click.option(
    "--dropout",
    type=float,
    default=0.0,
    show_default=True,
    help="Dropout throughout the model (ADES's `full` MC-dropout mode needs it).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a defense hyperparameter, e.g. --set beta=6 (applies to every --method).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Under --executor ray: cuda when --gpus-per-run > 0, else cpu.",
)
@results_option("Directory of run records and checkpoints (under ray: one every node shares).")
@data_dir_option("Where data sets are (or are downloaded to). Default: $HARNESS_DATA or ~/.cache/harness/data.")
@click.option("--resume", is_flag=True, help="Continue interrupted runs from their last checkpoint.")
@click.option("--force", is_flag=True, help="Rerun from scratch even if a run with this config exists.")
@click.option("--wait", is_flag=True, help="Wait for another process training the same run, instead of failing.")
@click.option("--no-download", is_flag=True, help="Never try to download data sets.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bars.")
@click.option(
    "--precision",
    "precision_name",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast dtype of training and its attack (fp16 adds loss scaling); "
    "evaluation stays fp32. Part of the run's identity.",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the training model (recorded).")
@click.option(
    "--batchnorm",
    type=click.Choice(["global", "per-rank"]),
    default="global",
    show_default=True,
    help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) or per process.",
)
@executor_options
@click.pass_context
def run_command(ctx, grid_path, n_seeds, executor, address, cpus_per_run, gpus_per_run, max_retries, **options):
    """Train defenses from scratch and evaluate clean and PGD-20 accuracy.

    Each (defense, data set, seed) writes <results>/<run id>/record.json with the resolved config,
    environment (thread count included), per-epoch metrics and times, and final test accuracy of the
    last and best-on-validation checkpoints. A completed identical run is skipped; an interrupted one
    continues with --resume. A failed run (a bad input or a bug) does not stop the others: several runs
    end with a summary (done / skipped / failed / still running elsewhere, each failure's reason), and
    the command exits with 2 unless every run is complete.

    \b
    Examples:
      harness run -m pgd-at -m trades -d cifar10 --preset paper --seed 0 --seed 1
      harness run --grid grids/paper.toml --executor ray --address auto --gpus-per-run 0.5
    """
    from harness import api
    from harness.core.errors import HarnessError
    from harness.scale import distributed

    resume = api.resume_mode(options["resume"], options["force"], grid=grid_path is not None)
    world = distributed.world_from_env()  # torchrun: one run across its processes
    if world.distributed and executor != "local":
        raise HarnessError("under torchrun every process trains the same run; use --executor local there")
    specs = _specs(ctx, grid_path, n_seeds, world, options)
    results_dir = options["results_dir"]
    chosen = _executor(world, executor, address, cpus_per_run, gpus_per_run, max_retries, results_dir)
    api.check_run_paths(specs, results_dir, options["data_dir"], options["force"])  # before anything is created
    run_options = _options(
        results_dir,
        options["data_dir"],
        options["device"],
        chosen,
        world,
        resume=resume,
        force=options["force"],
        wait=options["wait"],
        download=not options["no_download"],
        progress=not options["quiet"],
    )
    echo = click.echo if world.is_main else (lambda *_: None)  # one voice under torchrun
    try:
        api.train_specs(specs, run_options, chosen, echo, on_outcome=lambda done: _result_line(done, results_dir, echo))
    finally:
        distributed.stop()


def _specs(ctx, grid_path: Path | None, n_seeds: int | None, world, o: dict) -> list:
    """The runs asked for: the grid file's (its seeds replaced by --seeds), or the command line's."""
    from harness.scale.grid import load_grid

    if grid_path is not None:
        _no_grid_options(ctx, grid_path)
        specs = _grid_with_seeds(load_grid(grid_path), n_seeds).specs(ranks=world.size)
    else:
        seeds = _seeds_option(ctx, o["seeds"], n_seeds)
        names = ("methods_", "all_methods", "dataset", "preset")
        settings = ("epochs", "eps", "model", "dropout", "overrides", "precision_name", "batchnorm")
        specs = _command_line_specs(*(o[k] for k in names), seeds, *(o[k] for k in settings), world.size)
    return _executed_specs(specs, o["compile_model"], world)


def _no_grid_options(ctx, grid_path: Path) -> None:
    """A grid file says which runs to do: the options it sets are refused on the command line."""
    from harness.core.errors import HarnessError

    given = [flag for name, flag in GRID_SETS.items() if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise HarnessError(
            f"--grid {grid_path} says which runs to do; drop {', '.join(given)} (or write it into the grid file)"
        )


def _executed_specs(specs, compile_model: bool, world) -> list:
    """Refused once before any work if torchrun cannot train them; compile and world size join each identity."""
    from harness.training.engine import check_distributable
    from harness.training.specs import with_execution

    check_distributable(specs, world)
    return [with_execution(spec, compile_model, world.size) for spec in specs]


def _executor(world, executor, address, cpus_per_run, gpus_per_run, max_retries, results_dir):
    from harness.scale.executor_cli import build_executor

    chosen = build_executor(executor, address, cpus_per_run, gpus_per_run, max_retries, results_dir)
    return replace(chosen, catch_all=False) if world.distributed else chosen  # one rank's bug ends every rank


def _options(results_dir, data_dir, device: str, chosen, world, **policy):
    """RunOptions with absolute paths and this process's device (joining torchrun's process group)."""
    from harness.core.environment import resolve_device
    from harness.scale import distributed
    from harness.scale.executor_cli import absolute, worker_device
    from harness.scale.executors import LocalExecutor
    from harness.training.runner import RunOptions

    device_now = (
        distributed.start(world, resolve_device(device))
        if isinstance(chosen, LocalExecutor)
        else _device(worker_device(device, chosen))
    )
    return RunOptions(
        results_dir=absolute(results_dir), data_dir=absolute(data_dir), device=device_now, world=world, **policy
    )


def _result_line(outcome, results_dir: Path, echo) -> None:
    if outcome.error is None:
        spec, last = outcome.job.args[0], outcome.value["final"]["last"]
        echo(
            f"    {outcome.job.label}: clean {last['clean']:.2f}  PGD-{spec.eval.pgd_steps} "
            f"{last['pgd']:.2f}  ({last['n']} test examples)  -> {Path(results_dir) / spec.run_id}"
        )


def _seeds_option(ctx, seeds: tuple[int, ...], n_seeds: int | None) -> tuple[int, ...]:
    """--seeds N is seeds 0..N-1; given with an explicit --seed it is an error, not a silent choice."""
    from harness.core.errors import HarnessError

    if n_seeds is None:
        return seeds
    if ctx.get_parameter_source("seeds") is not ParameterSource.DEFAULT:
        raise HarnessError("give either --seed (repeatable) or --seeds N, not both")
    return tuple(range(n_seeds))


def _grid_with_seeds(grid, n_seeds: int | None):
    """A grid whose seeds are 0..N-1 when --seeds N is given (the file's seeds otherwise)."""
    return grid if n_seeds is None else replace(grid, seeds=tuple(range(n_seeds)))


def _command_line_specs(
    methods_,
    all_methods,
    dataset,
    preset,
    seeds,
    epochs,
    eps,
    model,
    dropout,
    overrides,
    precision_name,
    batchnorm,
    ranks,
):
    from harness.core.defense import DEFENSES
    from harness.core.errors import HarnessError
    from harness.training.specs import make_spec

    if all_methods and methods_:
        raise HarnessError("give either --all or --method, not both")
    names = DEFENSES.names() if all_methods else list(methods_)
    if not names:
        raise HarnessError("nothing to run: pass --method NAME (see `harness list defenses`), --all or --grid FILE")
    if all_methods and overrides:
        raise HarnessError("--set names one defense's hyperparameters; use it with --method, not --all")
    return [
        make_spec(
            name,
            dataset,
            preset,
            seed,
            epochs=epochs,
            eps=eps,
            model=model,
            dropout=dropout,
            overrides=overrides,
            precision_name=precision_name,
            batchnorm=batchnorm,
            ranks=ranks,
        )
        for name in names
        for seed in seeds
    ]


def _device(name: str):
    import torch

    return torch.device(name)

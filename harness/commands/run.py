"""`harness run`: train and evaluate defenses; one run record per (defense, seed)."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli import main

DEFAULT_RESULTS = Path("results")


@main.command("run")
@click.option("--method", "-m", "methods_", multiple=True, metavar="NAME",
              help="Defense to train (repeatable). See `harness list defenses`.")
@click.option("--all", "all_methods", is_flag=True, help="Train every registered defense.")
@click.option("--dataset", "-d", default="fashion-mnist", show_default=True,
              help="Data set (see `harness list datasets`).")
@click.option("--preset", "-p", default="quick", show_default=True,
              help="paper (the paper's 100-epoch protocol), quick (minutes on a CPU) or smoke (seconds).")
@click.option("--seed", "seeds", multiple=True, type=int, default=(0,), show_default=True,
              help="Run seed (repeatable for several seeds).")
@click.option("--epochs", type=int, default=None, help="Override the preset's number of (equivalent) epochs.")
@click.option("--eps", default=None, metavar="EPS",
              help="L-inf budget as a fraction or decimal, e.g. 8/255 (default: the data set's).")
@click.option("--model", default=None, help="Override the preset's model (see `harness list models`).")
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout throughout the model (ADES's `full` MC-dropout mode needs it).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a defense hyperparameter, e.g. --set beta=6 (applies to every --method).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=DEFAULT_RESULTS,
              show_default=True, help="Directory of run records and checkpoints.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where data sets are (or are downloaded to). Default: $HARNESS_DATA or ~/.cache/harness/data.")
@click.option("--resume", is_flag=True, help="Continue interrupted runs from their last checkpoint.")
@click.option("--force", is_flag=True, help="Rerun from scratch even if a run with this config exists.")
@click.option("--no-download", is_flag=True, help="Never try to download data sets.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--precision", "precision_name", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Autocast dtype of training and its attack (fp16 adds loss scaling); "
                                      "evaluation stays fp32. Part of the run's identity.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the training model (recorded).")
@click.option("--batchnorm", type=click.Choice(["global", "per-rank"]), default="global", show_default=True,
              help="Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) or per process.")
def run_command(methods_, all_methods, dataset, preset, seeds, epochs, eps, model, dropout, overrides, device,
                results_dir, data_dir, resume, force, no_download, quiet, precision_name, compile_model, batchnorm):
    """Train defenses from scratch and evaluate clean and PGD-20 accuracy.

    Each (defense, seed) writes <results>/<run id>/record.json with the resolved config, environment,
    per-epoch metrics and times, and final test accuracy of the last and best-on-validation
    checkpoints. A completed identical run is skipped; an interrupted one continues with --resume.
    """
    import methods  # noqa: F401
    from harness.defense import DEFENSES
    from harness.environment import resolve_device
    from harness.errors import HarnessError
    from harness.runner import RunOptions, make_spec, run
    from harness import distributed

    if all_methods and methods_:
        raise HarnessError("give either --all or --method, not both")
    names = DEFENSES.names() if all_methods else list(methods_)
    if not names:
        raise HarnessError("nothing to run: pass --method NAME (see `harness list defenses`) or --all")
    if all_methods and overrides:
        raise HarnessError("--set names one defense's hyperparameters; use it with --method, not --all")
    if resume and force:
        raise HarnessError("--resume and --force contradict each other; pick one")
    world = distributed.world_from_env()  # torchrun: one run across its processes
    specs = [make_spec(name, dataset, preset, seed, epochs=epochs, eps=eps, model=model, dropout=dropout,
                       overrides=overrides, precision_name=precision_name, batchnorm=batchnorm, ranks=world.size)
             for name in names for seed in seeds]
    options = RunOptions(results_dir=results_dir, data_dir=data_dir,
                         device=distributed.start(world, resolve_device(device)), resume=resume, force=force,
                         download=not no_download, progress=not quiet, compile=compile_model, world=world)
    echo = click.echo if world.is_main else (lambda *_: None)
    try:
        for i, spec in enumerate(specs, 1):
            echo(f"[{i}/{len(specs)}] {spec.run_id}")
            record = run(spec, options)
            last = record["final"]["last"]
            echo(f"    clean {last['clean']:.2f}  PGD-{spec.eval.pgd_steps} {last['pgd']:.2f}  "
                 f"({last['n']} test examples)  -> {results_dir / spec.run_id}")
    finally:
        distributed.stop()

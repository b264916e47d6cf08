"""`harness eval`: PGD-20, CW-inf and AutoAttack over an eps sweep, per-sample flags, reliability checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path

import click

from harness.cli import main
from harness.executor_cli import distribute_targets

DEFAULT_RESULTS = Path("results")
DEFAULT_ATTACKS = ("pgd-20", "cw-inf", "autoattack")


def parse_eps_list(text: str) -> list[Fraction]:
    from harness.config import parse_eps
    from harness.errors import HarnessError

    items = [t for t in text.replace(" ", "").split(",") if t]
    if not items:
        raise HarnessError("--eps takes a comma-separated list such as 0,2/255,8/255")
    return sorted(set(parse_eps(t) for t in items))


def resolve_attack_names(names: tuple[str, ...], version: str) -> list[str]:
    """'autoattack' means autoattack-<--autoattack-version>; unknown names fail with suggestions."""
    from harness.evaluation.attacks import ATTACKS

    resolved = [f"autoattack-{version}" if n == "autoattack" else n for n in (names or DEFAULT_ATTACKS)]
    for name in resolved:
        ATTACKS.get(name)
    return list(dict.fromkeys(resolved))


def digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


@main.command("eval")
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--checkpoint", "label", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Which checkpoint of a harness run (last epoch, or best PGD accuracy on validation).")
@click.option("--attack", "-a", "attacks", multiple=True, metavar="NAME",
              help="Attack to run (repeatable): pgd-20, cw-inf, autoattack (= autoattack-<version>), "
                   "autoattack-standard|plus|rand|custom, square. Default: pgd-20, cw-inf, autoattack.")
@click.option("--eps", "eps_text", default=None, metavar="LIST",
              help="Comma-separated budgets as fractions or decimals in [0,1], e.g. 0,2/255,8/255. "
                   "Default: the data set's sweep ({0,2,4,6,8,10,12,16}/255 for CIFAR, /80 for Fashion-MNIST).")
@click.option("--n", "n", type=int, default=None,
              help="Evaluate the first N test examples (default: the whole test set).")
@click.option("--autoattack-version", type=click.Choice(["standard", "plus", "rand", "custom"]),
              default="standard", show_default=True, help="What --attack autoattack runs.")
@click.option("--autoattack-attacks", default="apgd-ce,apgd-t", show_default=True, metavar="LIST",
              help="The attacks of autoattack-custom: apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t.")
@click.option("--pgd-step", default="eps/4", show_default=True, metavar="STEP",
              help="PGD/CW step: eps/K (eps/4 = 2/255 at 8/255) or absolute, e.g. 0.003 (TRADES scripts).")
@click.option("--pgd-restarts", type=int, default=1, show_default=True,
              help="PGD/CW restarts; each runs only on the points still robust.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every attack's randomness.")
@click.option("--batch-size", type=int, default=500, show_default=True,
              help="Points per attack batch; PGD/CW halve it on a GPU out-of-memory error, so a large value "
                   "means 'the largest that fits'. AutoAttack's results depend on its batches: recorded.")
@click.option("--model", "model_name", default=None,
              help="Architecture of a plain state-dict TARGET (see `harness list models`).")
@click.option("--dataset", default=None, help="Data set of a plain state-dict TARGET (default fashion-mnist).")
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=DEFAULT_RESULTS,
              show_default=True, help="Where run ids are looked up and external models' evaluations go.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where data sets are (default $HARNESS_DATA or ~/.cache/harness/data).")
@click.option("--robustbench-dir", type=click.Path(path_type=Path), default=None,
              help="RobustBench model directory (<dir>/<dataset>/<threat>/<Name>.pt; default "
                   "$HARNESS_ROBUSTBENCH_DIR or ~/.cache/harness/robustbench).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted evaluation (completed cells are kept).")
@click.option("--force", is_flag=True, help="Discard an earlier evaluation with this config and redo it.")
@click.option("--wait", is_flag=True, help="Wait for another process using the run or evaluation, instead of failing.")
@click.option("--no-download", is_flag=True, help="Never try to download data sets.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final table and checks.")
@distribute_targets  # --executor ray: one Ray task per TARGET, each calling this function with that target
def eval_command(targets, label, attacks, eps_text, n, autoattack_version, autoattack_attacks, pgd_step,
                 pgd_restarts, seed, batch_size, model_name, dataset, results_dir, data_dir, robustbench_dir,
                 device, resume, force, wait, no_download, quiet):
    """Evaluate checkpoints: clean accuracy, every attack at every eps, robust flags and checks.

    \b
    Each TARGET (several may be given, e.g. results/*/) is one of
      <results>/<run id>               a harness run directory (--checkpoint last|best)
      <run id>                         looked up in --results
      path/to/weights.pt               a plain state dict, with --model and --dataset
      robustbench:cifar10/Linf/Name    a RobustBench model, e.g. Zhang2019Theoretically, Ding2020MMA,
                                       Rice2020Overfitting, Wong2020Fast (from --robustbench-dir)

    Writes <run dir>/eval/<label>-<digest>/ (external models: <results>/external/<source>-<name>/eval/
    ...): evaluation.json (accuracies in %, eps as exact fractions, config, environment, checks) and
    flags.npz (per-sample robust flags per "<attack>@<eps>", "clean" and "worst-case@<eps>"). Robust
    accuracy is the pointwise worst case over the attacks. Rerunning the same command skips a complete
    evaluation; an interrupted one continues with --resume (AutoAttack from its own state file).
    """
    from harness.config import fraction_str
    from harness.data import DATASETS, load_split
    from harness.environment import environment, resolve_device
    from harness.errors import HarnessError
    from harness.evaluation.attacks import ATTACKS, AttackOptions
    from harness.evaluation.binding import bind, check_clean_accuracy, reading_run, writing_evaluation
    from harness.evaluation.checkpoints import DEFAULT_ROBUSTBENCH_DIR, load_checkpoint
    from harness.evaluation.checks import Thresholds
    from harness.evaluation.sweep import PROBE_SIZE, sweep

    if resume and force:
        raise HarnessError("--resume and --force contradict each other; pick one")
    if n is not None and n < 1:
        raise HarnessError(f"--n must be at least 1, got {n}")
    eps_override = parse_eps_list(eps_text) if eps_text is not None else None
    names = resolve_attack_names(attacks, autoattack_version)
    options = AttackOptions(pgd_restarts=pgd_restarts, pgd_step=pgd_step, seed=seed, batch_size=batch_size,
                            autoattack_attacks=tuple(a for a in autoattack_attacks.split(",") if a))
    dev = resolve_device(device)

    for target in targets:
        loaded = load_checkpoint(target, label=label, results_dir=results_dir, model_name=model_name,
                                 dataset=dataset, robustbench_dir=robustbench_dir or DEFAULT_ROBUSTBENCH_DIR)
        click.get_current_context().with_resource(reading_run(loaded, wait))  # released when the command ends
        identity = bind(loaded)  # the weights' sha256; a run must be complete and its files unchanged
        info = DATASETS.get(loaded.dataset)
        eps_list = eps_override if eps_override is not None else sorted(info.eps_sweep)
        test = load_split(info, data_dir, train=False, download=not no_download)
        if n is not None and n > len(test.labels):
            raise HarnessError(f"--n {n} exceeds the {len(test.labels)} test examples of {info.name}")
        count = n or len(test.labels)
        x = test.images[:count].float().div(255).to(dev)
        y = test.labels[:count].to(dev)
        model = loaded.model.to(dev)
        check_clean_accuracy(model, loaded, test.images, test.labels, dev, batch_size)

        thresholds = Thresholds()
        config = {"attacks": {name: ATTACKS.get(name).build(options).config() for name in names},
                  "eps": [fraction_str(e) for e in eps_list], "n": count, "seed": seed,
                  "batch_size": batch_size, "thresholds": asdict(thresholds), "probe_size": PROBE_SIZE,
                  "robust": "pointwise worst case over the attacks; a clean-misclassified point is not robust"}
        directory = loaded.eval_root / f"{loaded.checkpoint['label']}-{digest({**config, 'checkpoint': identity})}"
        click.get_current_context().with_resource(writing_evaluation(directory, wait))
        store = _open_store(directory, resume, force, {
            "checkpoint": loaded.checkpoint, "dataset": loaded.dataset, "model": loaded.model_name, "n": count,
            "test_indices": f"0..{count - 1}", "config": config, "environment": environment(dev)})
        say = (lambda _: None) if quiet else click.echo
        if not store.complete:
            attack_objs = [ATTACKS.get(name).build(replace(options, state_dir=directory)) for name in names]
            sweep(model, x, y, attack_objs, eps_list, store, batch_size=batch_size, thresholds=thresholds, say=say)
        else:
            click.echo(f"already evaluated (use --force to redo): {directory}")
        _print_summary(store, names, eps_list)


def _open_store(directory: Path, resume: bool, force: bool, header: dict):
    """A new store, or the one on disk: complete (shown again) or interrupted (continued with --resume)."""
    from harness.errors import HarnessError
    from harness.evaluation.flags import EVALUATION_NAME, EvaluationStore

    if force and directory.exists():
        shutil.rmtree(directory)
    if not (directory / EVALUATION_NAME).exists():
        return EvaluationStore.create(directory, header)
    store = EvaluationStore.load(directory)
    store.check_weights(header["checkpoint"].get("sha256"))
    if not store.complete and not resume:
        done = len(store.record["results"])
        raise HarnessError(f"an evaluation with this config was interrupted after {done} cell(s) in {directory}; "
                           f"pass --resume to continue it or --force to start over")
    return store


def _print_summary(store, names: list[str], eps_list: list[Fraction]) -> None:
    from harness.evaluation.sweep import accuracy_table, format_table

    record = store.record
    click.echo(f"{record['checkpoint']['name']} [{record['checkpoint']['label']}]  {record['dataset']}  "
               f"n={record['n']}  clean {record['clean_accuracy']:.2f}%")
    click.echo("robust accuracy (%) by eps:")
    for line in format_table(accuracy_table(store, names, eps_list)):
        click.echo("  " + line)
    failed = [c for c in record["checks"] if not c["passed"]]
    click.echo(f"checks: {len(record['checks']) - len(failed)}/{len(record['checks'])} passed")
    for check in record["checks"]:
        click.echo(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    seconds = {}
    for row in record["results"]:
        if row["attack"] != "worst-case":
            seconds[row["attack"]] = seconds.get(row["attack"], 0.0) + row["seconds"]
    click.echo("attack wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    click.echo(f"-> {store.dir / 'evaluation.json'}")

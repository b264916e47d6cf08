"""`harness eval`: PGD-20, CW-inf and AutoAttack over an eps sweep, per-sample flags, reliability checks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import click

from harness.cli import main
from harness.commands.path_options import data_dir_option, results_option
from harness.scale.executor_cli import executor_options


@main.command("eval")
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option(
    "--checkpoint",
    "label",
    type=click.Choice(["last", "best"]),
    default="last",
    show_default=True,
    help="Which checkpoint of a harness run (last epoch, or best PGD accuracy on validation).",
)
@click.option(
    "--attack",
    "-a",
    "attacks",
    multiple=True,
    metavar="NAME",
    help="Attack to run (repeatable): pgd-20, cw-inf, autoattack (= autoattack-<version>), "
    "autoattack-standard|plus|rand|custom, square. Default: pgd-20, cw-inf, autoattack.",
)
@click.option(
    "--eps",
    "eps_text",
    default=None,
    metavar="LIST",
    help="Comma-separated budgets as fractions or decimals in [0,1], e.g. 0,2/255,8/255. "
    "Default: the data set's sweep ({0,2,4,6,8,10,12,16}/255 for CIFAR, /80 for Fashion-MNIST).",
)
@click.option(
    "--n", "n", type=int, default=None, help="Evaluate the first N test examples (default: the whole test set)."
)
@click.option(
    "--autoattack-version",
    type=click.Choice(["standard", "plus", "rand", "custom"]),
    default="standard",
    show_default=True,
    help="What --attack autoattack runs.",
)
@click.option(
    "--autoattack-attacks",
    default="apgd-ce,apgd-t",
    show_default=True,
    metavar="LIST",
    help="The attacks of autoattack-custom: apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t.",
)
@click.option(
    "--pgd-step",
    default="eps/4",
    show_default=True,
    metavar="STEP",
    help="PGD/CW step: eps/K (eps/4 = 2/255 at 8/255) or absolute, e.g. 0.003 (TRADES scripts).",
)
@click.option(
    "--pgd-restarts",
    type=int,
    default=1,
    show_default=True,
    help="PGD/CW restarts; each runs only on the points still robust.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every attack's randomness.")
@click.option(
    "--batch-size",
    type=int,
    default=500,
    show_default=True,
    help="Points per attack batch; PGD/CW halve it on a GPU out-of-memory error, so a large value "
    "means 'the largest that fits'. AutoAttack's results depend on its batches: recorded.",
)
@click.option(
    "--model", "model_name", default=None, help="Architecture of a plain state-dict TARGET (see `harness list models`)."
)
@click.option("--dataset", default=None, help="Data set of a plain state-dict TARGET (default fashion-mnist).")
@results_option("Where run ids are looked up and external models' evaluations go.")
@data_dir_option("Where data sets are (default $HARNESS_DATA or ~/.cache/harness/data).")
@click.option(
    "--robustbench-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="RobustBench model directory (<dir>/<dataset>/<threat>/<Name>.pt; default "
    "$HARNESS_ROBUSTBENCH_DIR or ~/.cache/harness/robustbench).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted evaluation (completed cells are kept).")
@click.option("--force", is_flag=True, help="Discard an earlier evaluation with this config and redo it.")
@click.option("--wait", is_flag=True, help="Wait for another process using the run or evaluation, instead of failing.")
@click.option("--no-download", is_flag=True, help="Never try to download data sets.")
@click.option(
    "--nested-balls/--no-nested-balls",
    "nested",
    default=True,
    show_default=True,
    help="Count a point broken at a smaller eps as broken at every larger eps (L-inf balls are "
    "nested); the raw per-eps flags are kept as raw:<attack>@<eps>.",
)
@click.option(
    "--no-probes",
    is_flag=True,
    help="Skip the masking probes (Square with 200 queries, PGD-100 and CW-30 on at most 100 "
    "points at one eps); their checks are then listed as skipped.",
)
@click.option("--quiet", "-q", is_flag=True, help="One line per target: clean, worst case, failed and skipped checks.")
@executor_options  # --executor ray: one Ray task per TARGET, each calling evaluate_target (run_targets)
def eval_command(targets, device, executor, address, cpus_per_run, gpus_per_run, max_retries, **options):
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
    accuracy is the pointwise worst case over the attacks, combined over nested eps balls. Every
    evaluation runs the masking probes (at most 100 points at one eps), so a model whose gradients
    mislead PGD is flagged even with -a pgd-20 alone; checks that did not run are listed with the
    command that runs them. Rerunning the same command skips a complete evaluation; an interrupted one
    continues with --resume (AutoAttack from its own state file).
    """
    from harness.scale.executor_cli import build_executor, run_targets

    settings = request_of(**options).settings()
    chosen = build_executor(executor, address, cpus_per_run, gpus_per_run, max_retries, settings.results_dir)
    run_targets(evaluate_and_print, targets, settings, device, chosen, click.echo)


def request_of(*, label, eps_text, autoattack_attacks, results_dir, nested, no_probes, no_download, **same):
    """The command's options as the library's EvalRequest (the other options have its names)."""
    from harness.evaluation.pipeline import EvalRequest

    return EvalRequest(
        checkpoint=label,
        eps=None if eps_text is None else tuple(eps_text.split(",")),
        autoattack_attacks=tuple(a for a in autoattack_attacks.split(",") if a),
        results=results_dir,
        nested_balls=nested,
        probes=not no_probes,
        download=not no_download,
        **same,
    )


def evaluate_and_print(target: str, s, dev) -> None:
    """One target through the library (harness.evaluation.pipeline), then its summary: a line with
    --quiet, the table and the checks otherwise. Importable by a Ray worker (not a click command)."""
    from harness.evaluation.pipeline import evaluate_target

    evaluated = evaluate_target(target, s, dev, (lambda _: None) if s.quiet else click.echo)
    if s.quiet:
        click.echo(
            ("already evaluated: " if evaluated.already_done else "")
            + summary_line(evaluated.store, evaluated.eps_list, evaluated.headline_eps)
        )
        return
    if evaluated.already_done:
        click.echo(f"already evaluated (use --force to redo): {evaluated.store.dir}")
    _print_summary(evaluated.store, s.names, evaluated.eps_list)


def _print_summary(store, names: list[str], eps_list: list[Fraction]) -> None:
    from harness.evaluation.sweep import accuracy_table, format_table

    record = store.record
    click.echo(
        f"{record['checkpoint']['name']} [{record['checkpoint']['label']}]  {record['dataset']}  "
        f"n={record['n']}  clean {record['clean_accuracy']:.2f}%"
    )
    click.echo("robust accuracy (%) by eps" + (", nested balls" if record["config"].get("nested_balls") else "") + ":")
    for line in format_table(accuracy_table(store, names, eps_list)):
        click.echo("  " + line)
    for line in escalation_lines(record):
        click.echo(line)
    for line in check_lines(record):
        click.echo(line)
    seconds = {}
    for row in record["results"]:
        if row["attack"] != "worst-case":
            seconds[row["attack"]] = seconds.get(row["attack"], 0.0) + row["seconds"]
    click.echo("attack wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    click.echo(f"-> {store.dir / 'evaluation.json'}")


def escalation_lines(record: dict) -> list[str]:
    """Which worst-case numbers were escalated (PGD-20 had not converged there), and by how much."""
    return [
        f"escalated {e['escalated']}@{e['eps']}{_trigger(e)}: {e['before']:.2f}% -> {e['after']:.2f}% "
        f"({', '.join(r['attack'] for r in e['rounds'])}; "
        f"{'converged' if e['converged'] else 'budget spent, still falling'}); pgd-20 alone is kept in the record"
        for e in record.get("escalations", [])
    ]


def escalation_note(record: dict) -> str:
    """--quiet: '; escalated worst-case@1/5 14.20% -> 12.00%' for every escalated number."""
    escalations = record.get("escalations", [])
    return "".join(
        f"; escalated {e['escalated']}@{e['eps']}{_trigger(e)} {e['before']:.2f}% -> {e['after']:.2f}%"
        + ("" if e["converged"] else " (not converged)")
        for e in escalations
    )


def _trigger(escalation: dict) -> str:
    """' (white-box after Square)' for the escalation a Square alarm started; '' for PGD's step count."""
    return " (white-box after Square)" if escalation.get("trigger") == "square-probe" else ""


def check_lines(record: dict) -> list[str]:
    """The checks (failed first) and the skipped checks, each with the command that would run it."""
    checks, skipped = record["checks"], record["checks_skipped"]
    failed = [c for c in checks if not c["passed"]]
    lines = [
        f"checks: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f", {len(failed)} FAILED" if failed else "")
        + (f", {len(skipped)} skipped" if skipped else "")
    ]
    lines += [
        f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}"
        for c in sorted(checks, key=lambda c: c["passed"])
    ]
    lines += [
        f"  [skipped] {c['name']}: {c['reason']}" + (f"; run: {c['command']}" if c.get("command") else "")
        for c in skipped
    ]
    return lines


def summary_line(store, eps_list: list[Fraction], headline_eps: Fraction) -> str:
    """--quiet: one line per target, enough to see a failed check and where the details are."""
    from harness.core.config import fraction_str
    from harness.evaluation.flags import WORST_CASE

    record = store.record
    eps = headline_eps if headline_eps in eps_list else max(eps_list)
    worst = store.accuracy(WORST_CASE, eps)
    checks, skipped = record["checks"], record["checks_skipped"]
    failed = [c["name"] for c in checks if not c["passed"]]
    verdict = (
        f"FAILED {len(failed)}/{len(checks)} checks: {', '.join(failed)}"
        if failed
        else f"{len(checks)}/{len(checks)} checks passed"
    )
    return (
        f"{record['checkpoint']['name']} [{record['checkpoint']['label']}]  clean {record['clean_accuracy']:.2f}%"
        f"  robust@{fraction_str(eps)} {'-' if worst is None else f'{worst:.2f}%'}  {verdict}"
        + _skipped_note(skipped)
        + escalation_note(record)
        + f"  -> {store.dir / 'evaluation.json'}"
    )


def _skipped_note(skipped: list[dict]) -> str:
    """', k skipped (to run them: <command>)': the command with the most attacks covers the others."""
    if not skipped:
        return ""
    commands = [c["command"] for c in skipped if c.get("command")]
    return f", {len(skipped)} skipped" + (f" (to run them: {max(commands, key=len)})" if commands else "")

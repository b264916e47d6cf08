"""`harness eval`: PGD-20, CW-inf and AutoAttack over an eps sweep, per-sample flags, reliability checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import click

from harness.cli import main
from harness.executor_cli import executor_options

if TYPE_CHECKING:
    from harness.evaluation.attacks import AttackOptions

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
@click.option("--nested-balls/--no-nested-balls", "nested", default=True, show_default=True,
              help="Count a point broken at a smaller eps as broken at every larger eps (L-inf balls are "
                   "nested); the raw per-eps flags are kept as raw:<attack>@<eps>.")
@click.option("--no-probes", is_flag=True,
              help="Skip the masking probes (Square with 200 queries, PGD-100 and CW-30 on at most 100 "
                   "points at one eps); their checks are then listed as skipped.")
@click.option("--quiet", "-q", is_flag=True, help="One line per target: clean, worst case, failed and skipped checks.")
@executor_options  # --executor ray: one Ray task per TARGET, each calling evaluate_target (run_targets)
def eval_command(targets, label, attacks, eps_text, n, autoattack_version, autoattack_attacks, pgd_step,
                 pgd_restarts, seed, batch_size, model_name, dataset, results_dir, data_dir, robustbench_dir,
                 device, resume, force, wait, no_download, nested, no_probes, quiet, executor, address, cpus_per_run,
                 gpus_per_run, max_retries):
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
    from harness.errors import HarnessError
    from harness.evaluation.attacks import AttackOptions

    if resume and force:
        raise HarnessError("--resume and --force contradict each other; pick one")
    if n is not None and n < 1:
        raise HarnessError(f"--n must be at least 1, got {n}")
    settings = EvalSettings(
        label=label, eps_override=parse_eps_list(eps_text) if eps_text is not None else None, n=n,
        names=resolve_attack_names(attacks, autoattack_version),
        options=AttackOptions(pgd_restarts=pgd_restarts, pgd_step=pgd_step, seed=seed, batch_size=batch_size,
                              autoattack_attacks=tuple(a for a in autoattack_attacks.split(",") if a)),
        nested=nested, probes=not no_probes, model_name=model_name, dataset=dataset, results_dir=results_dir,
        data_dir=data_dir, robustbench_dir=robustbench_dir, resume=resume, force=force, wait=wait,
        download=not no_download, quiet=quiet, eps_text=eps_text)
    from harness.executor_cli import build_executor, run_targets

    chosen = build_executor(executor, address, cpus_per_run, gpus_per_run, max_retries, results_dir)
    run_targets(evaluate_target, targets, settings, device, chosen, click.echo)


@dataclass(frozen=True)
class EvalSettings:
    """Everything `harness eval` was asked, shared by every target."""

    label: str
    eps_override: list[Fraction] | None
    n: int | None
    names: list[str]
    options: AttackOptions
    nested: bool
    probes: bool
    model_name: str | None
    dataset: str | None
    results_dir: Path
    data_dir: Path | None
    robustbench_dir: Path | None
    resume: bool
    force: bool
    wait: bool  # for another process using the run or this evaluation, instead of failing
    download: bool
    quiet: bool
    eps_text: str | None


def evaluate_target(target: str, s: EvalSettings, dev) -> None:
    """Load one target, open (or continue) its evaluation store, run the sweep, print its summary.

    The run's shared lock and the evaluation's exclusive one are held for this target only (the
    same target twice on one command line must not find its own lock taken)."""
    with ExitStack() as locks:
        _evaluate_locked(target, s, dev, locks)


def _evaluate_locked(target: str, s: EvalSettings, dev, locks: ExitStack) -> None:
    from harness.data import DATASETS, load_split
    from harness.environment import environment
    from harness.errors import HarnessError
    from harness.evaluation.binding import bind, check_clean_accuracy, reading_run, writing_evaluation
    from harness.evaluation.checkpoints import DEFAULT_ROBUSTBENCH_DIR, load_checkpoint

    loaded = load_checkpoint(target, label=s.label, results_dir=s.results_dir, model_name=s.model_name,
                             dataset=s.dataset, robustbench_dir=s.robustbench_dir or DEFAULT_ROBUSTBENCH_DIR)
    locks.enter_context(reading_run(loaded, s.wait))
    identity = bind(loaded)  # the weights' sha256; a run must be complete and its files unchanged
    info = DATASETS.get(loaded.dataset)
    eps_list = sweep_eps(s.eps_override, info.eps_sweep, loaded.published_eps)
    test = load_split(info, s.data_dir, train=False, download=s.download)
    if s.n is not None and s.n > len(test.labels):
        raise HarnessError(f"--n {s.n} exceeds the {len(test.labels)} test examples of {info.name}")
    count = s.n or len(test.labels)
    x = test.images[:count].float().div(255).to(dev)
    y = test.labels[:count].to(dev)
    model = loaded.model.to(dev)
    check_clean_accuracy(model, loaded, test.images, test.labels, dev, s.options.batch_size)

    config, thresholds, budget = evaluation_config(s, eps_list, count)
    directory = loaded.eval_root / f"{loaded.checkpoint['label']}-{digest({**config, 'checkpoint': identity})}"
    locks.enter_context(writing_evaluation(directory, s.wait))
    store = _open_store(directory, s.resume, s.force, {
        "checkpoint": loaded.checkpoint, "dataset": loaded.dataset, "model": loaded.model_name, "n": count,
        "test_indices": f"0..{count - 1}", "config": config, "environment": environment(dev)})
    done_before = store.complete
    if not done_before:
        run_sweep(model, x, y, store, directory, s, eps_list, thresholds, budget, rerun_command(target, s, eps_list))
    elif not s.quiet:
        click.echo(f"already evaluated (use --force to redo): {directory}")
    if s.quiet:
        click.echo(("already evaluated: " if done_before else "") + summary_line(store, eps_list, info.eps))
    else:
        _print_summary(store, s.names, eps_list)


def run_sweep(model, x, y, store, directory: Path, s: EvalSettings, eps_list, thresholds, budget, rerun) -> None:
    """The attacks of `s` over `eps_list` into `store` (the place an executor would take over)."""
    from harness.evaluation.attacks import ATTACKS
    from harness.evaluation.sweep import sweep

    attack_objs = [ATTACKS.get(name).build(replace(s.options, state_dir=directory)) for name in s.names]
    sweep(model, x, y, attack_objs, eps_list, store, batch_size=s.options.batch_size, thresholds=thresholds,
          nested=s.nested, probes=budget, rerun=rerun, say=(lambda _: None) if s.quiet else click.echo)


def sweep_eps(override: list[Fraction] | None, default: tuple[Fraction, ...], published: Fraction | None
              ) -> list[Fraction]:
    """--eps as given; otherwise the data set's sweep plus the target's published eps (RobustBench
    evaluated Zhang2019Theoretically at 0.031, which no /255 sweep contains)."""
    if override is not None:
        return override
    return sorted(set(default) | ({published} if published is not None else set()))


def evaluation_config(s: EvalSettings, eps_list: list[Fraction], count: int):
    """The recorded config (its digest names the evaluation directory), thresholds and probe budget."""
    from harness.config import fraction_str
    from harness.evaluation.attacks import ATTACKS
    from harness.evaluation.checks import Thresholds
    from harness.evaluation.masking import ProbeBudget
    from harness.evaluation.sweep import PROBE_SIZE

    thresholds, budget = Thresholds(), (ProbeBudget() if s.probes else None)
    config = {"attacks": {name: ATTACKS.get(name).build(s.options).config() for name in s.names},
              "eps": [fraction_str(e) for e in eps_list], "n": count, "seed": s.options.seed,
              "batch_size": s.options.batch_size, "thresholds": asdict(thresholds), "probe_size": PROBE_SIZE,
              "nested_balls": s.nested, "masking_probes": budget.to_dict() if budget else None,
              "eps0": "the clean pass (no attack steps)",
              "robust": "pointwise worst case over the attacks; a clean-misclassified point is not robust"
                        + ("; broken at a smaller eps counts as broken at every larger eps" if s.nested else "")}
    return config, thresholds, budget


def rerun_command(target: str, s: EvalSettings, eps_list: list[Fraction]):
    """(attack names) -> the `harness eval` command for this target with those attacks: every option
    that shaped this evaluation (target resolution, data, points, eps, attack settings), so that pasting
    it evaluates the same model on the same points under the same protocol."""
    import shlex

    o = s.options
    base = ["harness", "eval", target, "--checkpoint", s.label]
    base += [] if s.n is None else ["--n", str(s.n)]
    base += [] if s.eps_text is None else ["--eps", s.eps_text]
    base += ["--pgd-step", o.pgd_step, "--pgd-restarts", str(o.pgd_restarts), "--seed", str(o.seed),
             "--batch-size", str(o.batch_size), "--autoattack-attacks", ",".join(o.autoattack_attacks)]
    for option, value in (("--model", s.model_name), ("--dataset", s.dataset), ("--results", s.results_dir),
                          ("--data-dir", s.data_dir), ("--robustbench-dir", s.robustbench_dir)):
        base += [] if value is None else [option, str(value)]
    base += [] if s.nested else ["--no-nested-balls"]
    base += [] if s.download else ["--no-download"]

    def command(names: list[str]) -> str:
        return shlex.join(base + [part for name in names for part in ("-a", name)])

    return command


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
    click.echo("robust accuracy (%) by eps" + (", nested balls" if record["config"].get("nested_balls") else "")
               + ":")
    for line in format_table(accuracy_table(store, names, eps_list)):
        click.echo("  " + line)
    for line in check_lines(record):
        click.echo(line)
    seconds = {}
    for row in record["results"]:
        if row["attack"] != "worst-case":
            seconds[row["attack"]] = seconds.get(row["attack"], 0.0) + row["seconds"]
    click.echo("attack wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    click.echo(f"-> {store.dir / 'evaluation.json'}")


def check_lines(record: dict) -> list[str]:
    """The checks (failed first) and the skipped checks, each with the command that would run it."""
    checks, skipped = record["checks"], record["checks_skipped"]
    failed = [c for c in checks if not c["passed"]]
    lines = [f"checks: {len(checks) - len(failed)}/{len(checks)} passed"
             + (f", {len(failed)} FAILED" if failed else "") + (f", {len(skipped)} skipped" if skipped else "")]
    lines += [f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}"
              for c in sorted(checks, key=lambda c: c["passed"])]
    lines += [f"  [skipped] {c['name']}: {c['reason']}" + (f"; run: {c['command']}" if c.get("command") else "")
              for c in skipped]
    return lines


def summary_line(store, eps_list: list[Fraction], headline_eps: Fraction) -> str:
    """--quiet: one line per target, enough to see a failed check and where the details are."""
    from harness.config import fraction_str
    from harness.evaluation.flags import WORST_CASE

    record = store.record
    eps = headline_eps if headline_eps in eps_list else max(eps_list)
    worst = store.accuracy(WORST_CASE, eps)
    checks, skipped = record["checks"], record["checks_skipped"]
    failed = [c["name"] for c in checks if not c["passed"]]
    verdict = (f"FAILED {len(failed)}/{len(checks)} checks: {', '.join(failed)}" if failed
               else f"{len(checks)}/{len(checks)} checks passed")
    return (f"{record['checkpoint']['name']} [{record['checkpoint']['label']}]  clean {record['clean_accuracy']:.2f}%"
            f"  robust@{fraction_str(eps)} {'-' if worst is None else f'{worst:.2f}%'}  {verdict}"
            + _skipped_note(skipped) + f"  -> {store.dir / 'evaluation.json'}")


def _skipped_note(skipped: list[dict]) -> str:
    """', k skipped (to run them: <command>)': the command with the most attacks covers the others."""
    if not skipped:
        return ""
    commands = [c["command"] for c in skipped if c.get("command")]
    return f", {len(skipped)} skipped" + (f" (to run them: {max(commands, key=len)})" if commands else "")

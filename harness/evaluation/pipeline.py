"""Evaluate one target end to end: load, bind to its weights, sweep, store. The library behind
`harness eval` (which parses options and prints) and `harness.evaluate` (which returns the result).

A target is a harness run directory or id, a plain state-dict file, a RobustBench name, or (from
Python) any `nn.Module` taking [0, 1] inputs. Every path writes the same evaluation record
(<eval root>/<label>-<digest>/evaluation.json + flags.npz), whose directory is named by a digest of
the config and the weights, so the same evaluation twice is skipped and a changed one is new.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.config import DEFAULT_RESULTS
from harness.core.errors import HarnessError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from harness.evaluation.attacks import AttackOptions
    from harness.evaluation.checkpoints import LoadedCheckpoint
    from harness.evaluation.flags import EvaluationStore

DEFAULT_ATTACKS = ("pgd-20", "cw-inf", "autoattack")
Say = Callable[[str], None]


def _silent(_: str) -> None:
    """A `say` for library calls that asked for no progress."""


def parse_eps_list(text: str) -> list[Fraction]:
    """'0,2/255,8/255' -> the sorted distinct eps (exact fractions)."""
    from harness.core.config import parse_eps

    items = [t for t in text.replace(" ", "").split(",") if t]
    if not items:
        raise HarnessError("--eps takes a comma-separated list such as 0,2/255,8/255")
    return sorted(set(parse_eps(t) for t in items))


def resolve_attack_names(names: Sequence[str], version: str) -> list[str]:
    """'autoattack' means autoattack-<version>; unknown names fail with suggestions."""
    from harness.evaluation.attacks import ATTACKS

    resolved = [f"autoattack-{version}" if n == "autoattack" else n for n in (names or DEFAULT_ATTACKS)]
    for name in resolved:
        ATTACKS.get(name)
    return list(dict.fromkeys(resolved))


def digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class EvalSettings:
    """Everything an evaluation was asked, shared by every target."""

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

    def __post_init__(self) -> None:
        if self.resume and self.force:
            raise HarnessError("--resume and --force contradict each other; pick one")
        if self.n is not None and self.n < 1:
            raise HarnessError(f"--n must be at least 1, got {self.n}")


@dataclass(frozen=True)
class Evaluated:
    """One target's evaluation: its store (record + flags) and what the caller may want to say."""

    store: EvaluationStore
    eps_list: list[Fraction]
    headline_eps: Fraction  # the data set's training eps (the quiet line's robust number)
    already_done: bool  # a complete evaluation with this config and weights was found, not rerun


def evaluate_target(target: str | nn.Module, s: EvalSettings, dev, say: Say = _silent) -> Evaluated:
    """Load one target, open (or continue) its evaluation store and run the sweep.

    The run's shared lock and the evaluation's exclusive one are held for this target only (the
    same target twice on one command line must not find its own lock taken)."""
    with ExitStack() as locks:
        return _evaluate_locked(target, s, dev, locks, say)


def load_target(target: str | nn.Module, s: EvalSettings) -> LoadedCheckpoint:
    """A target as a loaded checkpoint: a module as given, anything else resolved by name."""
    from torch import nn

    from harness.evaluation.checkpoints import DEFAULT_ROBUSTBENCH_DIR, load_checkpoint, load_module

    if isinstance(target, nn.Module):
        return load_module(target, s.model_name, s.dataset, s.results_dir)
    return load_checkpoint(
        str(target),
        label=s.label,
        results_dir=s.results_dir,
        model_name=s.model_name,
        dataset=s.dataset,
        robustbench_dir=s.robustbench_dir or DEFAULT_ROBUSTBENCH_DIR,
    )


def _evaluate_locked(target: str | nn.Module, s: EvalSettings, dev, locks: ExitStack, say: Say) -> Evaluated:
    from harness.core.datasets import DATASETS, load_split
    from harness.core.environment import environment
    from harness.evaluation.binding import bind, check_clean_accuracy, reading_run, writing_evaluation

    loaded = load_target(target, s)
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
    store = open_store(
        directory,
        s.resume,
        s.force,
        {
            "checkpoint": loaded.checkpoint,
            "dataset": loaded.dataset,
            "model": loaded.model_name,
            "n": count,
            "test_indices": f"0..{count - 1}",
            "config": config,
            "environment": environment(dev),
        },
    )
    done_before = store.complete
    if not done_before:
        rerun = rerun_command(target if isinstance(target, str) else None, s)
        run_sweep(model, x, y, store, directory, s, eps_list, thresholds, budget, rerun, say)
    return Evaluated(store, eps_list, info.eps, done_before)


def run_sweep(
    model, x, y, store, directory: Path, s: EvalSettings, eps_list, thresholds, budget, rerun, say: Say
) -> None:
    """The attacks of `s` over `eps_list` into `store` (the place an executor would take over)."""
    from harness.evaluation.attacks import ATTACKS
    from harness.evaluation.sweep import sweep

    attack_objs = [ATTACKS.get(name).build(replace(s.options, state_dir=directory)) for name in s.names]
    sweep(
        model,
        x,
        y,
        attack_objs,
        eps_list,
        store,
        batch_size=s.options.batch_size,
        thresholds=thresholds,
        nested=s.nested,
        probes=budget,
        rerun=rerun,
        say=say,
    )


def sweep_eps(
    override: list[Fraction] | None, default: tuple[Fraction, ...], published: Fraction | None
) -> list[Fraction]:
    """--eps as given; otherwise the data set's sweep plus the target's published eps (RobustBench
    evaluated Zhang2019Theoretically at 0.031, which no /255 sweep contains)."""
    if override is not None:
        return override
    return sorted(set(default) | ({published} if published is not None else set()))


def evaluation_config(s: EvalSettings, eps_list: list[Fraction], count: int):
    """The recorded config (its digest names the evaluation directory), thresholds and probe budget."""
    from harness.core.config import fraction_str
    from harness.evaluation.attacks import ATTACKS
    from harness.evaluation.checks import Thresholds
    from harness.evaluation.masking import ProbeBudget
    from harness.evaluation.sweep import PROBE_SIZE

    thresholds, budget = Thresholds(), (ProbeBudget() if s.probes else None)
    config = {
        "attacks": {name: ATTACKS.get(name).build(s.options).config() for name in s.names},
        "eps": [fraction_str(e) for e in eps_list],
        "n": count,
        "seed": s.options.seed,
        "batch_size": s.options.batch_size,
        "thresholds": asdict(thresholds),
        "probe_size": PROBE_SIZE,
        "nested_balls": s.nested,
        "masking_probes": budget.to_dict() if budget else None,
        "eps0": "the clean pass (no attack steps)",
        "robust": "pointwise worst case over the attacks; a clean-misclassified point is not robust"
        + ("; broken at a smaller eps counts as broken at every larger eps" if s.nested else ""),
    }
    return config, thresholds, budget


def rerun_command(target: str | None, s: EvalSettings) -> Callable[[list[str]], str]:
    """(attack names) -> the `harness eval` command for this target with those attacks: every option
    that shaped this evaluation (target resolution, data, points, eps, attack settings), so that pasting
    it evaluates the same model on the same points under the same protocol. A Python module has no
    command line: its rerun is the `harness.evaluate` call with those attacks."""
    if target is None:
        return lambda names: f"harness.evaluate(model, attacks={list(names)!r}, ...same arguments)"
    o = s.options
    base = ["harness", "eval", target, "--checkpoint", s.label]
    base += [] if s.n is None else ["--n", str(s.n)]
    base += [] if s.eps_text is None else ["--eps", s.eps_text]
    base += [
        "--pgd-step",
        o.pgd_step,
        "--pgd-restarts",
        str(o.pgd_restarts),
        "--seed",
        str(o.seed),
        "--batch-size",
        str(o.batch_size),
        "--autoattack-attacks",
        ",".join(o.autoattack_attacks),
    ]
    for option, value in (
        ("--model", s.model_name),
        ("--dataset", s.dataset),
        ("--results", s.results_dir),
        ("--data-dir", s.data_dir),
        ("--robustbench-dir", s.robustbench_dir),
    ):
        base += [] if value is None else [option, str(value)]
    base += [] if s.nested else ["--no-nested-balls"]
    base += [] if s.download else ["--no-download"]
    return lambda names: shlex.join(base + [part for name in names for part in ("-a", name)])


def open_store(directory: Path, resume: bool, force: bool, header: dict) -> EvaluationStore:
    """A new store, or the one on disk: complete (shown again) or interrupted (continued with resume)."""
    from harness.evaluation.flags import EVALUATION_NAME, EvaluationStore

    if force and directory.exists():
        shutil.rmtree(directory)
    if not (directory / EVALUATION_NAME).exists():
        return EvaluationStore.create(directory, header)
    store = EvaluationStore.load(directory)
    store.check_weights(header["checkpoint"].get("sha256"))
    if not store.complete and not resume:
        done = len(store.record["results"])
        raise HarnessError(
            f"an evaluation with this config was interrupted after {done} cell(s) in {directory}; "
            f"pass --resume to continue it or --force to start over"
        )
    return store


# --------------------------------------------------------------------------- the library call


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` measured: accuracies in %, the checks, per-sample flags, where the record is."""

    directory: Path
    clean: float
    robust: dict[Fraction, float]  # eps -> pointwise worst case over the attacks (escalated where it was)
    checks: list[dict[str, Any]]
    skipped_checks: list[dict[str, Any]]
    already_done: bool
    record: dict[str, Any] = field(repr=False)

    @property
    def failed_checks(self) -> list[str]:
        return [c["name"] for c in self.checks if not c["passed"]]

    @property
    def flags(self) -> dict[str, np.ndarray]:
        """Per-sample robust flags per '<attack>@<eps>', 'clean' and 'worst-case@<eps>' (flags.npz)."""
        from harness.evaluation.flags import EvaluationStore

        return EvaluationStore.load(self.directory).flags

    @classmethod
    def of(cls, evaluated: Evaluated) -> EvaluationResult:
        from harness.evaluation.flags import WORST_CASE

        store, record = evaluated.store, evaluated.store.record
        robust = {e: store.accuracy(WORST_CASE, e) for e in evaluated.eps_list}
        return cls(
            directory=store.dir,
            clean=record["clean_accuracy"],
            robust={e: a for e, a in robust.items() if a is not None},
            checks=list(record["checks"]),
            skipped_checks=list(record.get("checks_skipped", [])),
            already_done=evaluated.already_done,
            record=record,
        )


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation can be asked, with `harness eval`'s defaults: the one place both the
    command and `harness.evaluate` take them from (eps as text, e.g. ("0", "2/255", "8/255"))."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[str, ...] | None = None  # None: the data set's sweep
    n: int | None = None  # None: every test example
    dataset: str | None = None
    model_name: str | None = None
    checkpoint: str = "last"
    results: Path = DEFAULT_RESULTS
    data_dir: Path | None = None
    robustbench_dir: Path | None = None
    seed: int = 0
    batch_size: int = 500
    pgd_step: str = "eps/4"
    pgd_restarts: int = 1
    autoattack_version: str = "standard"
    autoattack_attacks: tuple[str, ...] = ("apgd-ce", "apgd-t")
    nested_balls: bool = True
    probes: bool = True
    resume: bool = False
    force: bool = False
    wait: bool = False
    download: bool = True
    quiet: bool = True

    @classmethod
    def of(cls, options: dict[str, Any]) -> EvalRequest:
        """From keywords: unknown names fail in one line with a suggestion; sequences become tuples."""
        import difflib

        known = [f.name for f in fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise HarnessError(
                    f"evaluate() has no option {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                )
        tuples = {
            k: tuple(str(e) for e in v) if k == "eps" else tuple(v)
            for k, v in options.items()
            if k in ("attacks", "eps", "autoattack_attacks") and v is not None
        }
        paths = {k: Path(v) for k, v in options.items() if k in ("results", "data_dir", "robustbench_dir") and v}
        return cls(**{**options, **tuples, **paths})

    def settings(self) -> EvalSettings:
        from harness.evaluation.attacks import AttackOptions

        eps_text = ",".join(self.eps) if self.eps is not None else None
        return EvalSettings(
            label=self.checkpoint,
            eps_override=parse_eps_list(eps_text) if eps_text is not None else None,
            n=self.n,
            names=resolve_attack_names(self.attacks, self.autoattack_version),
            options=AttackOptions(
                pgd_restarts=self.pgd_restarts,
                pgd_step=self.pgd_step,
                seed=self.seed,
                batch_size=self.batch_size,
                autoattack_attacks=self.autoattack_attacks,
            ),
            nested=self.nested_balls,
            probes=self.probes,
            model_name=self.model_name,
            dataset=self.dataset,
            results_dir=self.results,
            data_dir=self.data_dir,
            robustbench_dir=self.robustbench_dir,
            resume=self.resume,
            force=self.force,
            wait=self.wait,
            download=self.download,
            quiet=self.quiet,
            eps_text=eps_text,
        )


def evaluate(
    target: str | Path | torch.nn.Module, *, device: str = "auto", progress: bool = False, **options: Any
) -> EvaluationResult:
    """Evaluate a target as `harness eval TARGET` does, writing the same record; returns the result.

    `target`: an `nn.Module` taking [0, 1] inputs (give `dataset`; `model_name` names it in the
    record, default its class name), a run directory or id, a state-dict file (with `model_name`
    and `dataset`) or 'robustbench:<dataset>/<threat>/<Name>'. `options` are `EvalRequest`'s fields,
    `harness eval`'s options by their Python names (`attacks`, `eps` e.g. ["0", "8/255"], `n`, ...)."""
    from harness.core.environment import resolve_device

    settings = EvalRequest.of({**options, "quiet": not progress}).settings()
    target = str(target) if isinstance(target, Path) else target
    say = print if progress else _silent
    return EvaluationResult.of(evaluate_target(target, settings, resolve_device(device), say))

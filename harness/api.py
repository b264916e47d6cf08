"""The harness as a library: `train` and `report`, for notebooks and scripts.

The CLI commands (`harness run`, `harness report`) parse their options and call these, and the
executors run the jobs built here, so a call from Python writes exactly the records the shell does
and follows the same rules: a complete identical run is skipped, `resume` continues an interrupted
one, `force` redoes it, a grid resumes by default, and a retry after a lost worker resumes, never forces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.config import DEFAULT_RESULTS
from harness.core.errors import HarnessError

if TYPE_CHECKING:
    from harness.core.config import RunSpec
    from harness.reporting.render import Report
    from harness.scale.executors import Executor, Job, Outcome
    from harness.training.runner import RunOptions

Say = Callable[[str], None]


def _silent(_: str) -> None:
    """A `say` for library calls that asked for no progress."""


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class Accuracy:
    """A checkpoint's final test accuracy (%) on `n` examples: clean and under the run's PGD attack."""

    clean: float
    pgd: float
    n: int


@dataclass(frozen=True)
class RunRecord:
    """A typed view of one run record (<results>/<run id>/record.json); `raw` holds every field."""

    run_id: str
    status: str
    defense: str
    dataset: str
    model: str
    preset: str
    seed: int
    eps: str
    epochs: int
    final: Mapping[str, Accuracy]  # "last" and "best"
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RunRecord:
        """Through harness.storage.records' upgrade (the one owner of record.json's older shapes)."""
        from harness.storage.records import upgrade_record

        spec = upgrade_record(record)["spec"]
        final = {label: Accuracy(m["clean"], m["pgd"], m["n"]) for label, m in record["final"].items()}
        return cls(
            run_id=record["run_id"],
            status=record["status"],
            defense=spec["defense"],
            dataset=spec["dataset"],
            model=spec["model"],
            preset=spec["preset"],
            seed=spec["seed"],
            eps=str(spec["eps"]),
            epochs=len(record["epochs"]),
            final=final,
            raw=record,
        )


@dataclass(frozen=True)
class TrainResult:
    """What `train` made: the run's record and where its directory and checkpoints are."""

    record: RunRecord
    run_dir: Path

    @property
    def checkpoint(self) -> Path:
        """The last epoch's checkpoint (model, optimiser and defense state; what --resume continues)."""
        return self.run_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The weights with the best PGD accuracy on the validation split."""
        return self.run_dir / "best.pt"


@dataclass(frozen=True)
class ReportResult:
    """What `report` wrote (report.html, tables/) and what it found: verdicts, gaps, skipped files."""

    html: Path
    tables: Path
    report: Report = field(repr=False)

    @property
    def verdict_counts(self) -> dict[str, int]:
        kinds = ("supported", "contradicted", "inconclusive")
        return {kind: sum(v.verdict == kind for v in self.report.verdicts) for kind in kinds}

    @property
    def problems(self) -> list[str]:
        """Records that could not be read (named and skipped, never guessed at)."""
        return list(self.report.results.problems)


# --------------------------------------------------------------------------- training


def resume_mode(resume: bool, force: bool, *, grid: bool = False) -> bool:
    """Whether interrupted runs continue: as asked, or by default for a grid (rerun until complete)."""
    if resume and force:
        raise HarnessError("--resume and --force contradict each other; pick one")
    return not force if grid else resume


def run_label(spec: RunSpec) -> str:
    return f"{spec.defense}/{spec.dataset}/seed{spec.seed}"


def run_jobs(specs: list[RunSpec], options: RunOptions) -> list[Job]:
    """One job per spec, calling `harness.training.runner.run`; a retry after a lost worker resumes, never forces."""
    from harness.scale.executors import Job
    from harness.training.runner import run

    retry = dataclasses.replace(options, resume=True, force=False)
    return [Job(label=run_label(s), fn=run, args=(s, options), retry_args=(s, retry)) for s in specs]


def complete_labels(specs: list[RunSpec], results_dir: Path, force: bool) -> frozenset[str]:
    """Labels of the runs already complete before this call: the summary counts them as skipped."""
    from harness.storage.records import run_state

    if force:
        return frozenset()
    return frozenset(run_label(s) for s in specs if run_state(results_dir, s.run_id)[0] == "complete")


def check_run_paths(specs: list[RunSpec], results_dir: Path, data_dir: Path | None, force: bool) -> None:
    """One-line errors for paths that would fail later, before a results directory is created."""
    from harness.storage.atomic import ensure_writable_dir, existing_dir

    if data_dir is not None:
        existing_dir(data_dir, "--data-dir", hint="create it or pass an existing --data-dir")
    linked = [Path(results_dir) / s.run_id for s in specs if (Path(results_dir) / s.run_id).is_symlink()]
    if force and linked:
        raise HarnessError(
            f"--force would delete run directory {linked[0]}, a symbolic link to "
            f"{linked[0].resolve()}; remove the link (or what it points to) yourself and rerun"
        )
    ensure_writable_dir(results_dir, "--results")  # before hours of training, not after


def train_specs(
    specs: list[RunSpec],
    options: RunOptions,
    executor: Executor,
    say: Say = _silent,
    on_outcome: Callable[[Outcome], None] = lambda _: None,
) -> list[Outcome]:
    """Every spec through `executor` (skip, resume or force as `options` says), then the summary;
    a HarnessError unless every run is complete (a single run's error is that run's)."""
    from harness.scale.executors import execute_all

    resume_mode(options.resume, options.force)
    skipped = complete_labels(specs, options.results_dir, options.force)
    return execute_all(executor, run_jobs(specs, options), say, noun="run", skipped=skipped, on_outcome=on_outcome)


def train(
    spec: RunSpec | None = None,
    *,
    method: str | None = None,
    dataset: str = "fashion-mnist",
    preset: str = "quick",
    seed: int = 0,
    results: str | Path = DEFAULT_RESULTS,
    data_dir: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
    download: bool = True,
    progress: bool = False,
    wait: bool = False,
    **spec_options: Any,
) -> TrainResult:
    """Train one defense and evaluate it, as `harness run -m METHOD` does, writing the same record.

    Give a `RunSpec` (e.g. from `harness.training.specs.make_spec` or a grid; `dataset`, `preset` and `seed`
    are then its own), or `method` with the keywords of `make_spec` (epochs, eps, model, dropout,
    overrides, precision_name, batchnorm, compile_model).
    """
    from harness.core.environment import resolve_device
    from harness.scale.executor_cli import absolute
    from harness.scale.executors import LocalExecutor
    from harness.training.runner import RunOptions
    from harness.training.specs import make_spec

    if (spec is None) == (method is None):
        raise HarnessError("give train() either a RunSpec or method=NAME, not both or neither")
    if spec is not None and spec_options:
        raise HarnessError(f"a RunSpec already says {', '.join(sorted(spec_options))}; build it with them instead")
    spec = spec if spec is not None else make_spec(method, dataset, preset, seed, **spec_options)
    resume_mode(resume, force)  # before anything is created
    results_dir, data = Path(results), (Path(data_dir) if data_dir is not None else None)
    check_run_paths([spec], results_dir, data, force)
    options = RunOptions(
        results_dir=absolute(results_dir),
        data_dir=absolute(data),
        device=resolve_device(device),
        resume=resume,
        force=force,
        download=download,
        progress=progress,
        wait=wait,
    )
    train_specs([spec], options, LocalExecutor(), print if progress else _silent)
    return load_run(results_dir / spec.run_id)


def load_run(run_dir: str | Path) -> TrainResult:
    """The result of a finished run from its directory (what `train` returns)."""
    from harness.storage.records import RECORD_NAME, read_record

    run_dir = Path(run_dir)
    return TrainResult(record=RunRecord.from_dict(read_record(run_dir / RECORD_NAME)), run_dir=run_dir)


# --------------------------------------------------------------------------- report


DEFAULT_REPORTS = Path("reports")


def report(
    results: str | Path = DEFAULT_RESULTS, out: str | Path | None = None, checkpoint: str = "last"
) -> ReportResult:
    """Tables 1-3, curves and claim verdicts from the records in `results`, as `harness report` writes
    them (out: default reports/<results folder name>). Trains and attacks nothing."""
    from harness.reporting import build, load_results, write
    from harness.storage.atomic import ensure_writable_dir

    results_dir = Path(results)
    out_dir = Path(out) if out is not None else DEFAULT_REPORTS / (results_dir.resolve().name or "results")
    loaded = load_results(results_dir)
    ensure_writable_dir(out_dir, "--out")  # before any work: a report that cannot be written is not built
    ensure_writable_dir(out_dir / "tables", "--out")
    built = build(loaded, checkpoint)
    return ReportResult(html=write(built, out_dir), tables=out_dir / "tables", report=built)

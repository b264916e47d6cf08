"""Read a results directory: run records (harness.storage.records) and evaluation records (`harness eval`).

Nothing here trains or attacks. A file that cannot be read is named in `Results.problems` and
skipped; the report shows that list, so a corrupt record never disappears silently.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import HarnessError
from harness.evaluation.evaluation_record import EVALUATION_NAME, EvaluationRecord, read_for_report
from harness.storage.atomic import existing_dir
from harness.storage.integrity import CorruptFileError, sha256_file
from harness.storage.records import (
    RECORD_NAME,
    CorruptRecordError,
    StoredRun,
    collapse_message,
    read_record,
    upgrade_spec,
)


def eps_key(text: Any) -> str:
    """'8/255', '0.0313725...', 0.031 -> a canonical exact string, so equal budgets compare equal."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        return str(text)
    limited = value.limit_denominator(100000)
    if abs(float(limited) - float(value)) < 1e-12:
        value = limited
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def parse_indices(spec: Any) -> tuple[int, ...] | None:
    """'0..N-1' or a list of ints -> a tuple of test indices (None when unreadable)."""
    if isinstance(spec, list) and all(isinstance(i, int) for i in spec):
        return tuple(spec)
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", spec)
        if match:
            return tuple(range(int(match.group(1)), int(match.group(2)) + 1))
    return None


def describe_indices(spec: Any) -> str:
    if isinstance(spec, str):
        return spec.strip()
    indices = parse_indices(spec)
    if not indices:
        return "unknown"
    if indices == tuple(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]}"
    return f"{len(indices)} listed indices"


@dataclass(frozen=True)
class Protocol:
    """Everything that must be equal before two runs' numbers may be averaged or compared."""

    dataset: str
    model: str
    eps: str
    preset: str
    epochs: int  # equivalent epochs
    train_examples: int | None
    test_indices: str
    eval_attack: str
    numerics: str = "fp32"  # training precision (and non-global BatchNorm): never averaged across

    def label(self) -> str:
        return (
            f"{self.dataset}, {self.model}, eps {self.eps}, preset {self.preset}, {self.epochs} epoch(s), "
            f"{self.train_examples if self.train_examples is not None else '?'} training examples, "
            f"test {self.test_indices}, {self.eval_attack}"
            + (f", trained {self.numerics}" if self.numerics != "fp32" else "")
        )

    def slug(self) -> str:
        text = f"{self.dataset}-{self.model}-eps{self.eps}-{self.preset}-e{self.epochs}-n{self.test_indices}"
        if self.numerics != "fp32":
            text += f"-{self.numerics}"
        return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def numerics_label(spec: Mapping[str, Any]) -> str:
    """Precision, BatchNorm mode, compile backend and process count: "fp32" for a plain run.
    `spec` is upgraded first (harness.storage.records), so an older spec reads as the plain run it was."""
    spec = upgrade_spec(spec)
    parts = [spec["precision"]]
    if spec["batchnorm"] != "global":
        parts.append(f"BatchNorm {spec['batchnorm']}")
    if spec["compile"] != "none":
        parts.append(f"compiled {spec['compile']}")
    if spec["world_size"] != 1:
        parts.append(f"{spec['world_size']} processes")
    return ", ".join(parts)


def training_subset(run: StoredRun) -> int | None:
    """Examples of the training subset a run drew on: ADES-bilevel withholds some of them from the
    model for its scheduler's outer loss (never the validation split), so it shares the protocol of the
    runs that trained on the whole subset, and Table 2 says what it held out."""
    return None if run.train_examples is None else run.train_examples + run.held_out_examples


@dataclass
class Run:
    """A run record, read and upgraded through harness.storage.records (`stored`); `record` is the upgraded dict."""

    path: Path
    record: dict[str, Any]
    stored: StoredRun = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stored = StoredRun.from_record(self.record)
        self.record = self.stored.raw

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.record["spec"]

    @property
    def defense(self) -> str:
        return self.spec["defense"]

    @property
    def seed(self) -> int:
        return self.spec["seed"]

    @property
    def replays(self) -> int:
        return self.stored.replays

    @property
    def device(self) -> str:
        return self.stored.device_name or "unknown device"

    @property
    def model_label(self) -> str:
        """Part of the protocol: runs of different architecture revisions or dropout never average."""
        dropout, revision = self.spec["dropout"], self.spec["model_revision"]
        return (
            self.spec["model"]
            + (f" rev {revision}" if revision != 1 else "")
            + (f" (dropout {dropout:g})" if dropout else "")
        )

    @property
    def protocol(self) -> Protocol:
        run, spec = self.stored, self.spec
        return Protocol(
            dataset=spec["dataset"],
            model=self.model_label,
            eps=eps_key(spec["eps"]),
            preset=spec["preset"],
            epochs=run.equivalent_epochs,
            train_examples=training_subset(run),
            test_indices=describe_indices(run.test_indices),
            eval_attack=f"PGD-{run.eval_steps} step {run.eval_step_size} x{run.eval_restarts} restart(s)",
            numerics=numerics_label(spec),
        )

    @property
    def pgd_steps(self) -> int | None:
        return self.stored.eval_steps

    def config_digest(self) -> str:
        text = json.dumps(self.record["defense"]["config"], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:6]


@dataclass
class Evaluation:
    """An evaluation record (read and upgraded by harness.evaluation.evaluation_record) and its flags."""

    path: Path
    record: EvaluationRecord
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    flags_note: str | None = None  # why per-example flags are unavailable

    @property
    def data(self) -> dict[str, Any]:
        """The upgraded record as a dict (what the tables print from)."""
        return self.record.raw

    @property
    def checkpoint(self) -> Mapping[str, Any]:
        return self.record.checkpoint

    @property
    def source(self) -> str:
        return str(self.checkpoint["source"])

    @property
    def run_id(self) -> str | None:
        return self.checkpoint["run_id"]

    @property
    def label(self) -> str:
        return str(self.checkpoint["label"])

    @property
    def name(self) -> str:
        return str(self.checkpoint["name"] or self.run_id or self.path.parent.parent.parent.name)

    @property
    def indices(self) -> tuple[int, ...] | None:
        return parse_indices(self.record.test_indices)

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.record.checks)

    @property
    def failed_checks(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c.get("passed", False)]

    @property
    def skipped_checks(self) -> list[dict[str, Any]]:
        """Checks that did not run: name, reason and (records since the masking probes) the command."""
        return list(self.record.checks_skipped)

    def result(self, attack_prefix: str, eps: str) -> dict[str, Any] | None:
        """The first result whose attack starts with `attack_prefix` at budget `eps`."""
        for item in self.data["results"]:
            if item["attack"].startswith(attack_prefix) and eps_key(item["eps"]) == eps_key(eps):
                return item
        return None

    def flag(self, attack: str, eps: str | None = None) -> np.ndarray | None:
        """Per-example correctness for 'clean' or the first '<attack...>@<eps>' key (bool, over test indices)."""
        if attack == "clean":
            return self.flags.get("clean")
        for key, value in sorted(self.flags.items()):
            name, _, budget = key.partition("@")
            if name.startswith(attack) and eps_key(budget) == eps_key(eps):
                return value
        return None


@dataclass
class Results:
    root: Path
    runs: list[Run]
    incomplete: list[Run]
    evaluations: list[Evaluation]
    problems: list[str]
    incomplete_evaluations: list[str] = field(default_factory=list)  # status 'running': not reported

    def evaluations_of(self, run_id: str) -> list[Evaluation]:
        return [e for e in self.evaluations if e.source == "harness" and e.run_id == run_id]

    @property
    def external(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.source != "harness"]


def _validate_run(record: dict[str, Any], source: str) -> None:
    """Fields the report needs beyond what harness.storage.records checks."""
    spec = record["spec"]
    for key in ("defense", "dataset", "model", "eps"):
        if key not in spec:
            raise CorruptRecordError(f"{source}: spec lacks {key!r}")
    if record["status"] == "complete":
        last = record["final"].get("last")
        if not isinstance(last, dict) or not all(isinstance(last.get(k), (int, float)) for k in ("clean", "pgd", "n")):
            raise CorruptRecordError(f"{source}: final.last lacks clean/pgd/n")


def _load_flags(evaluation: Evaluation) -> None:
    name = evaluation.record.flags_name
    if not name:
        evaluation.flags_note = "the evaluation record names no flags file"
        return
    path = evaluation.path.parent / str(name)
    if not path.is_file():
        evaluation.flags_note = f"flags file {path} is missing"
        return
    expected = evaluation.record.flags_sha256
    if expected is not None and sha256_file(path) != expected:
        evaluation.flags_note = f"flags file {path} fails its checksum (corrupt; not used)"
        return
    try:
        with np.load(path, allow_pickle=False) as archive:
            evaluation.flags = {key: np.asarray(archive[key], dtype=bool) for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        evaluation.flags_note = f"flags file {path} is unreadable ({exc})"


def _agrees_with_flags(evaluation: Evaluation, problems: list[str]) -> bool:
    """Every number of the record against its per-example flags, as `harness eval` checks them
    (`vouched_cells`), worst-case rows included: an edited number (its checksum line removed) is
    named and left out, never shown. Flag keys are compared as exact budgets ('12/255' is '4/85')."""
    from harness.evaluation.flags import WORST_CASE, cell_key, percent, vouched_cells

    if not evaluation.flags:
        return True
    flags_path = evaluation.path.parent / str(evaluation.record.flags_name)
    try:
        cells = {_exact_key(key): value for key, value in evaluation.flags.items()}
        vouched_cells(evaluation.record, cells, flags_path)
        for row in evaluation.record.results:
            cell = cells.get(cell_key(row["attack"], Fraction(row["eps"])))
            if row["attack"] == WORST_CASE and cell is not None and percent(cell) != row["robust_accuracy"]:
                raise CorruptFileError(
                    f"{flags_path}: worst case at eps {row['eps']} does not match its record "
                    f"(record {row['robust_accuracy']}%, flags {percent(cell):.4f}%)"
                )
    except (CorruptFileError, ValueError, ZeroDivisionError) as exc:
        problems.append(f"skipped evaluation {evaluation.path}: {exc}")
        return False
    return True


def _exact_key(key: str) -> str:
    from harness.evaluation.flags import cell_key

    attack, at, budget = key.partition("@")
    return cell_key(attack, Fraction(budget)) if at else key


def _drop_stale(evaluations: list[Evaluation], runs: list[Run], problems: list[str]) -> list[Evaluation]:
    """Evaluations of other weights than the finished run's checkpoint (e.g. made mid-training) are skipped."""
    finished = {run.run_id: run.record["checkpoint_sha256"] for run in runs}
    kept = []
    for evaluation in evaluations:
        measured = evaluation.checkpoint["sha256"]
        final = finished.get(evaluation.run_id, {}).get(evaluation.label) if evaluation.source == "harness" else None
        if measured and final and measured != final:
            problems.append(
                f"skipped stale evaluation {evaluation.path}: it measured weights {measured[:16]}, "
                f"the finished run's {evaluation.label}.pt is {final[:16]}"
            )
            continue
        kept.append(evaluation)
    return kept


def load_results(results_dir: Path) -> Results:
    """Every run and evaluation record below `results_dir`; HarnessError when there is nothing to report."""
    root = Path(results_dir)
    existing_dir(root, "--results", hint=f"run `harness run ... --results {root}` first or pass --results DIR")
    problems: list[str] = []
    runs: list[Run] = []
    incomplete: list[Run] = []
    for path in sorted(root.glob(f"*/{RECORD_NAME}")):
        try:
            record = read_record(path)
            _validate_run(record, str(path))
        except CorruptRecordError as exc:
            problems.append(f"skipped corrupt run record {exc}")
            continue
        (runs if record["status"] == "complete" else incomplete).append(Run(path, record))
        if (message := collapse_message(record)) is not None:
            problems.append(message)
    evaluations: list[Evaluation] = []
    incomplete_evaluations: list[str] = []
    paths = sorted(root.glob(f"*/eval/*/{EVALUATION_NAME}")) + sorted(root.glob(f"external/*/eval/*/{EVALUATION_NAME}"))
    for path in paths:
        try:
            record = read_for_report(path)
        except CorruptFileError as exc:
            problems.append(f"skipped corrupt evaluation record {exc}")
            continue
        if record is None:
            incomplete_evaluations.append(str(path))
            continue
        evaluation = Evaluation(path, record)
        _load_flags(evaluation)
        if evaluation.flags_note and ("checksum" in evaluation.flags_note or "unreadable" in evaluation.flags_note):
            problems.append(evaluation.flags_note)  # a damaged flags file is named, not only left out
        if _agrees_with_flags(evaluation, problems):
            evaluations.append(evaluation)
    evaluations = _drop_stale(evaluations, runs, problems)
    if not runs and not evaluations:
        detail = f" ({len(problems)} unreadable: " + "; ".join(problems) + ")" if problems else ""
        extra = f"; {len(incomplete)} run(s) still running" if incomplete else ""
        raise HarnessError(
            f"no complete run or evaluation records in {root}{detail}{extra}; "
            f"run `harness run --results {root} ...` first"
        )
    return Results(root, runs, incomplete, evaluations, problems, incomplete_evaluations)

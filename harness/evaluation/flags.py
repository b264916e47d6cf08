"""The evaluation store: builds `evaluation.json` plus per-sample robust flags in `flags.npz`
(the record contract itself is owned by harness.evaluation.evaluation_record).

Every table and curve is a function of the flags: one bool array over the test indices per
"<attack>@<eps n/d>" cell, plus "clean" and the pointwise "worst-case@<eps>". Both files are
rewritten atomically after every completed cell, so an interrupted evaluation resumes at the first
missing cell and a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.config import fraction_str
from harness.core.errors import HarnessError
from harness.evaluation.evaluation_record import (  # noqa: F401  (re-exported: the store's names)
    EVALUATION_NAME,
    FLAGS_NAME,
    SCHEMA_VERSION,
    EvaluationRecord,
    read_evaluation,
    read_flags,
    write_evaluation,
)
from harness.storage.integrity import CorruptFileError, mismatch

WORST_CASE = "worst-case"


def cell_key(attack: str, eps: Fraction) -> str:
    return f"{attack}@{fraction_str(eps)}"


def percent(flags: np.ndarray) -> float:
    return float(np.mean(flags)) * 100 if len(flags) else float("nan")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class EvaluationStore:
    """One evaluation directory: the record being built and its flags, saved after every cell."""

    def __init__(self, directory: Path, record: dict[str, Any], flags: dict[str, np.ndarray]):
        self.dir = Path(directory)
        self.record = record
        self.flags = flags

    # ---------------------------------------------------------------- open

    @classmethod
    def create(cls, directory: Path, header: dict[str, Any]) -> EvaluationStore:
        record = {
            "schema": SCHEMA_VERSION,
            "kind": "evaluation",
            **header,
            "status": "running",
            "created": _now(),
            "clean_accuracy": None,
            "results": [],
            "checks": [],
            "checks_skipped": [],
            "flags": FLAGS_NAME,
        }
        return cls(directory, record, {})

    @classmethod
    def load(cls, directory: Path) -> EvaluationStore:
        """The store on disk, with only the flag cells its (verified) record vouches for."""
        record = read_evaluation(Path(directory) / EVALUATION_NAME)
        view = EvaluationRecord.from_raw(record)
        flags, found = read_flags(Path(directory))
        if view.flags_sha256 is not None and found != view.flags_sha256 and view.complete:
            raise mismatch(Path(directory) / FLAGS_NAME, view.flags_sha256, found or "(no file)")
        return cls(directory, record, vouched_cells(view, flags, Path(directory) / FLAGS_NAME))

    def check_weights(self, sha256: str | None) -> None:
        """Refuse to continue or show an evaluation of other weights than those now loaded."""
        stored = EvaluationRecord.from_raw(self.record).checkpoint["sha256"]
        if stored is not None and sha256 is not None and stored != sha256:
            raise HarnessError(
                f"{self.dir}: this evaluation was made on weights with sha256 {stored[:16]}, "
                f"but the checkpoint now has {sha256[:16]}; rerun with --force"
            )

    @property
    def complete(self) -> bool:
        return EvaluationRecord.from_raw(self.record).complete

    # ---------------------------------------------------------------- cells

    def has(self, key: str) -> bool:
        return key in self.flags

    def set_clean(self, clean: np.ndarray) -> None:
        self.flags["clean"] = clean
        self.record["clean_accuracy"] = percent(clean)

    def add_cell(
        self, attack: str, eps: Fraction, robust: np.ndarray, seconds: float, warnings: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        key = cell_key(attack, eps)
        self.flags[key] = robust
        self.record["results"] = [r for r in self.record["results"] if cell_key(r["attack"], Fraction(r["eps"])) != key]
        row = {
            "attack": attack,
            "eps": fraction_str(eps),
            "robust_accuracy": percent(robust),
            "n": int(len(robust)),
            "seconds": seconds,
            "warnings": list(warnings),
        }
        self.record["results"].append(row)
        return row

    def save(self) -> None:
        write_evaluation(self.dir, self.record, self.flags)

    def finish(self, checks: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
        self.record["checks"] = checks
        self.record["checks_skipped"] = skipped
        self.record["status"] = "complete"
        self.record["finished"] = _now()
        self.save()

    # ---------------------------------------------------------------- views

    def accuracy(self, attack: str, eps: Fraction) -> float | None:
        flags = self.flags.get(cell_key(attack, eps))
        return None if flags is None else percent(flags)


def worst_case(flags: dict[str, np.ndarray], attacks: list[str], eps: Fraction) -> np.ndarray | None:
    """Pointwise AND over the attacks run at eps: robust only if no attack broke the point."""
    cells = [flags[cell_key(a, eps)] for a in attacks if cell_key(a, eps) in flags]
    if len(cells) != len(attacks) or not cells:
        return None
    return np.logical_and.reduce(cells)


# --------------------------------------------------------------------------- reading


def load_flags(directory: Path) -> dict[str, np.ndarray]:
    return read_flags(directory)[0]


def vouched_cells(
    record: EvaluationRecord | Mapping[str, Any], flags: dict[str, np.ndarray], path: Path
) -> dict[str, np.ndarray]:
    """The flag cells the record has rows for, each matching its row; cells beyond them are dropped.

    A row whose cell is missing or disagrees (accuracy, n) means the flags file is not the one the
    record was written with: CorruptFileError.
    """
    view = record if isinstance(record, EvaluationRecord) else EvaluationRecord.from_raw(record)
    kept: dict[str, np.ndarray] = {}
    expected: list[tuple[str, float, int | None]] = []
    if view.clean_accuracy is not None:
        expected.append(("clean", view.clean_accuracy, view.n))
    expected += [
        (cell_key(r["attack"], Fraction(r["eps"])), r["robust_accuracy"], r["n"])
        for r in view.results
        if r["attack"] != WORST_CASE
    ]
    for key, accuracy, n in expected:
        cell = flags.get(key)
        if cell is None or (n is not None and len(cell) != n) or not _same(percent(cell), accuracy):
            found = "missing" if cell is None else f"{percent(cell):.4f}% over {len(cell)}"
            raise CorruptFileError(
                f"{path}: cell {key} does not match its record (record {accuracy}% over {n}, "
                f"flags {found}); delete the evaluation or rerun with --force"
            )
        kept[key] = cell
    for row in view.results:  # worst-case rows are recomputed from the cells at the end
        key = cell_key(row["attack"], Fraction(row["eps"]))
        if row["attack"] == WORST_CASE and key in flags:
            kept[key] = flags[key]
    return kept


def _same(a: float, b: Any) -> bool:
    return isinstance(b, (int, float)) and (a == b or (a != a and b != b))


def iter_evaluations(results_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every evaluation record below a results directory (own runs and external models)."""
    root = Path(results_dir)
    for pattern in (f"*/eval/*/{EVALUATION_NAME}", f"external/*/eval/*/{EVALUATION_NAME}"):
        for path in sorted(root.glob(pattern)):
            yield path, read_evaluation(path)

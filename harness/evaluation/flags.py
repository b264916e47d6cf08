"""The evaluation record (contract B): `evaluation.json` plus per-sample robust flags in `flags.npz`.

Every table and curve is a function of the flags: one bool array over the test indices per
"<attack>@<eps n/d>" cell, plus "clean" and the pointwise "worst-case@<eps>". Both files are
rewritten atomically after every completed cell, so an interrupted evaluation resumes at the first
missing cell and a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from harness.config import fraction_str
from harness.errors import HarnessError
from harness.integrity import CorruptFileError, mismatch, read_json, sha256_bytes
from harness.storage import atomic_write, write_json

SCHEMA_VERSION = 1
EVALUATION_NAME = "evaluation.json"
FLAGS_NAME = "flags.npz"
WORST_CASE = "worst-case"
REQUIRED = ("schema", "kind", "checkpoint", "dataset", "model", "n", "test_indices", "config", "environment",
            "clean_accuracy", "results", "checks", "flags")


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
    def create(cls, directory: Path, header: dict[str, Any]) -> "EvaluationStore":
        record = {"schema": SCHEMA_VERSION, "kind": "evaluation", **header, "status": "running",
                  "created": _now(), "clean_accuracy": None, "results": [], "checks": [],
                  "checks_skipped": [], "flags": FLAGS_NAME}
        return cls(directory, record, {})

    @classmethod
    def load(cls, directory: Path) -> "EvaluationStore":
        """The store on disk, with only the flag cells its (verified) record vouches for."""
        record = read_evaluation(Path(directory) / EVALUATION_NAME)
        flags, found = read_flags(Path(directory))
        expected = record.get("flags_sha256")
        if expected is not None and found != expected and record.get("status") == "complete":
            raise mismatch(Path(directory) / FLAGS_NAME, expected, found or "(no file)")
        return cls(directory, record, vouched_cells(record, flags, Path(directory) / FLAGS_NAME))

    def check_weights(self, sha256: str | None) -> None:
        """Refuse to continue or show an evaluation of other weights than those now loaded."""
        stored = self.record.get("checkpoint", {}).get("sha256")
        if stored is not None and sha256 is not None and stored != sha256:
            raise HarnessError(f"{self.dir}: this evaluation was made on weights with sha256 {stored[:16]}, "
                               f"but the checkpoint now has {sha256[:16]}; rerun with --force")

    @property
    def complete(self) -> bool:
        return self.record.get("status") == "complete"

    # ---------------------------------------------------------------- cells

    def has(self, key: str) -> bool:
        return key in self.flags

    def set_clean(self, clean: np.ndarray) -> None:
        self.flags["clean"] = clean
        self.record["clean_accuracy"] = percent(clean)

    def add_cell(self, attack: str, eps: Fraction, robust: np.ndarray, seconds: float,
                 warnings: tuple[str, ...] = ()) -> dict[str, Any]:
        key = cell_key(attack, eps)
        self.flags[key] = robust
        self.record["results"] = [r for r in self.record["results"]
                                  if cell_key(r["attack"], Fraction(r["eps"])) != key]
        row = {"attack": attack, "eps": fraction_str(eps), "robust_accuracy": percent(robust),
               "n": int(len(robust)), "seconds": seconds, "warnings": list(warnings)}
        self.record["results"].append(row)
        return row

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v, dtype=bool) for k, v in self.flags.items()})
        data = buffer.getvalue()
        atomic_write(self.dir / FLAGS_NAME, lambda f: f.write(data))
        self.record["flags_sha256"] = sha256_bytes(data)
        write_json(self.dir / EVALUATION_NAME, self.record, sealed=True)

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

def read_evaluation(path: Path) -> dict[str, Any]:
    try:
        record = read_json(path)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{exc}; delete it or rerun with --force") from None
    missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing or record.get("kind") != "evaluation":
        raise CorruptFileError(f"{path}: not an evaluation record (missing {', '.join(missing) or 'kind'}); "
                               f"delete it or rerun with --force")
    if record["schema"] != SCHEMA_VERSION:
        raise HarnessError(f"{path}: schema {record['schema']} (this harness reads {SCHEMA_VERSION})")
    return record


def read_flags(directory: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """The flags file's arrays and the SHA-256 of its bytes ({} and None when there is none)."""
    path = Path(directory) / FLAGS_NAME
    if not path.exists():
        return {}, None
    try:
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            flags = {k: archive[k].astype(bool) for k in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise CorruptFileError(f"{path}: unreadable flags file ({type(exc).__name__}: {exc}); "
                               f"delete it or rerun with --force") from None
    return flags, sha256_bytes(data)


def load_flags(directory: Path) -> dict[str, np.ndarray]:
    return read_flags(directory)[0]


def vouched_cells(record: dict[str, Any], flags: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """The flag cells the record has rows for, each matching its row; cells beyond them are dropped.

    A row whose cell is missing or disagrees (accuracy, n) means the flags file is not the one the
    record was written with: CorruptFileError.
    """
    kept: dict[str, np.ndarray] = {}
    expected: list[tuple[str, float, int | None]] = []
    if record.get("clean_accuracy") is not None:
        expected.append(("clean", record["clean_accuracy"], record.get("n")))
    expected += [(cell_key(r["attack"], Fraction(r["eps"])), r["robust_accuracy"], r.get("n"))
                 for r in record.get("results", []) if r.get("attack") != WORST_CASE]
    for key, accuracy, n in expected:
        cell = flags.get(key)
        if cell is None or (n is not None and len(cell) != n) or not _same(percent(cell), accuracy):
            found = "missing" if cell is None else f"{percent(cell):.4f}% over {len(cell)}"
            raise CorruptFileError(f"{path}: cell {key} does not match its record (record {accuracy}% over {n}, "
                                   f"flags {found}); delete the evaluation or rerun with --force")
        kept[key] = cell
    for row in record.get("results", []):  # worst-case rows are recomputed from the cells at the end
        key = cell_key(row["attack"], Fraction(row["eps"]))
        if row.get("attack") == WORST_CASE and key in flags:
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

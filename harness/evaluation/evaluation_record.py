"""The one owner of the evaluation record contract: `evaluation.json` and its flags file `flags.npz`.

Reading, validating, upgrading older shapes and writing live here only: the evaluation store
(harness.evaluation.flags, which resumes and finishes an evaluation) and the report
(harness.reporting.loading) both read through `read_evaluation` / `read_for_report` and the typed
`EvaluationRecord` view, so a field added to the record is upgraded in one place.

Two levels of validation, on purpose: the store must resume a record it wrote itself (all of
`STORE_REQUIRED`); the report also shows older and hand-written external records, which need only
`REPORT_REQUIRED` (typed) and are upgraded by `upgrade`.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from harness.core.errors import HarnessError
from harness.storage.atomic import atomic_write, write_json
from harness.storage.integrity import CorruptFileError, read_json, sha256_bytes

SCHEMA_VERSION = 1
EVALUATION_NAME = "evaluation.json"
FLAGS_NAME = "flags.npz"
STORE_REQUIRED = (
    "schema",
    "kind",
    "checkpoint",
    "dataset",
    "model",
    "n",
    "test_indices",
    "config",
    "environment",
    "clean_accuracy",
    "results",
    "checks",
    "flags",
)
REPORT_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "kind": str,
    "checkpoint": dict,
    "dataset": str,
    "model": str,
    "n": int,
    "clean_accuracy": (int, float),
    "results": list,
    "checks": list,
}
RESULT_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "attack": str,
    "eps": str,
    "robust_accuracy": (int, float),
    "n": int,
}


class CorruptEvaluationError(CorruptFileError):
    """An evaluation record the report cannot use (same class as a corrupt run record, see loading)."""


# --------------------------------------------------------------------------- upgrading older shapes


def upgrade(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `raw` in the current shape: every field an older record lacks gets the value that
    shape meant. The only place that knows the older shapes (tests/test_evaluation_record.py)."""
    record = dict(raw)
    # Records written in one piece at the end (external, hand-written ones) have no status: complete.
    record.setdefault("status", "complete")
    # Records before the masking probes list no skipped checks.
    record.setdefault("checks_skipped", [])
    # Records without per-example flags (external, hand-written ones) name no flags file.
    record.setdefault("flags", None)
    # Records before the integrity pass (f1163a0) carry no checksum of their flags file.
    record.setdefault("flags_sha256", None)
    # External records may omit the test indices, the attack configuration and the environment.
    record.setdefault("test_indices", None)
    record.setdefault("config", {})
    record.setdefault("environment", {})
    return record


def _upgrade_row(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    row = dict(raw)
    # Result rows of external records may omit their sample count: the cell's length is then not checked.
    row.setdefault("n", None)
    return MappingProxyType(row)


def _upgrade_checkpoint(raw: Mapping[str, Any]) -> dict[str, Any]:
    checkpoint = dict(raw)
    # External records (a RobustBench or file model) may name no source, label or weights hash.
    checkpoint.setdefault("source", "?")
    checkpoint.setdefault("label", "?")
    checkpoint.setdefault("run_id", None)
    checkpoint.setdefault("name", None)
    checkpoint.setdefault("sha256", None)
    return checkpoint


# --------------------------------------------------------------------------- the typed view


@dataclass(frozen=True)
class EvaluationRecord:
    """A typed, read-only view of an upgraded evaluation record; `raw` is the (upgraded) dict itself."""

    status: str
    checkpoint: Mapping[str, Any]
    dataset: str
    model: str
    n: int | None
    test_indices: Any
    clean_accuracy: float | None
    results: tuple[Mapping[str, Any], ...]
    checks: tuple[Mapping[str, Any], ...]
    checks_skipped: tuple[Mapping[str, Any], ...]
    flags_name: str | None
    flags_sha256: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> EvaluationRecord:
        record = upgrade(raw)
        return cls(
            status=record["status"],
            checkpoint=MappingProxyType(_upgrade_checkpoint(record["checkpoint"])),
            dataset=record["dataset"],
            model=record["model"],
            n=record.get("n"),
            test_indices=record["test_indices"],
            clean_accuracy=record["clean_accuracy"],
            results=tuple(_upgrade_row(row) for row in record["results"]),
            checks=_dicts(record["checks"]),
            checks_skipped=_dicts(record["checks_skipped"]),
            flags_name=str(record["flags"]) if record["flags"] else None,
            flags_sha256=record["flags_sha256"],
            raw=record,
        )

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _dicts(items: list[Any]) -> tuple[Mapping[str, Any], ...]:
    return tuple(item for item in items if isinstance(item, dict))


# --------------------------------------------------------------------------- reading


def _schema_message(path: Path | str, schema: Any) -> str:
    return f"{path}: schema {schema} (this harness reads {SCHEMA_VERSION})"


def read_evaluation(path: Path) -> dict[str, Any]:
    """The store's read: a record this harness wrote (all of STORE_REQUIRED), upgraded; a damaged one
    is CorruptFileError (the user deletes it or reruns with --force), a future schema HarnessError."""
    try:
        record = read_json(path)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{exc}; delete it or rerun with --force") from None
    missing = [k for k in STORE_REQUIRED if k not in record] if isinstance(record, dict) else list(STORE_REQUIRED)
    if missing or record.get("kind") != "evaluation":
        raise CorruptFileError(
            f"{path}: not an evaluation record (missing {', '.join(missing) or 'kind'}); "
            f"delete it or rerun with --force"
        )
    if record["schema"] != SCHEMA_VERSION:
        raise HarnessError(_schema_message(path, record["schema"]))
    return upgrade(record)


def _check_fields(data: Any, required: Mapping[str, Any], source: str) -> None:
    if not isinstance(data, dict):
        raise CorruptEvaluationError(f"{source}: not a JSON object")
    for key, kind in required.items():
        if key not in data:
            raise CorruptEvaluationError(f"{source}: missing field {key!r}")
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise CorruptEvaluationError(f"{source}: field {key!r} has the wrong type")


def validate_for_report(data: Any, source: str) -> EvaluationRecord | None:
    """The report's check of a parsed record: None while it is still being written (`harness eval`
    saves after every cell: listed, not read); CorruptEvaluationError when unusable."""
    if isinstance(data, dict) and upgrade(data)["status"] != "complete":
        return None
    _check_fields(data, REPORT_REQUIRED, source)
    if data["schema"] != SCHEMA_VERSION or data["kind"] != "evaluation":
        raise CorruptEvaluationError(f"{source}: not a schema-{SCHEMA_VERSION} evaluation record")
    for i, item in enumerate(data["results"]):
        _check_fields(item, RESULT_REQUIRED, f"{source}: results[{i}]")
        if not math.isfinite(item["robust_accuracy"]):
            raise CorruptEvaluationError(f"{source}: results[{i}] robust_accuracy is not finite")
    return EvaluationRecord.from_raw(data)


def read_for_report(path: Path) -> EvaluationRecord | None:
    """`validate_for_report` of the file at `path` (CorruptFileError when it cannot be parsed)."""
    return validate_for_report(read_json(path), str(path))


def read_flags(directory: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """The flags file's arrays and the SHA-256 of its bytes ({} and None when there is none)."""
    path = Path(directory) / FLAGS_NAME
    if not path.exists():
        return {}, None
    return read_flags_file(path)


def read_flags_file(path: Path) -> tuple[dict[str, np.ndarray], str]:
    try:
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            flags = {k: archive[k].astype(bool) for k in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise CorruptFileError(
            f"{path}: unreadable flags file ({type(exc).__name__}: {exc}); delete it or rerun with --force"
        ) from None
    return flags, sha256_bytes(data)


# --------------------------------------------------------------------------- writing


def write_evaluation(directory: Path, record: dict[str, Any], flags: Mapping[str, np.ndarray]) -> None:
    """Flags first, then the record naming their checksum, each atomically: a reader never sees a
    record vouching for flags that are not on disk yet."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v, dtype=bool) for k, v in flags.items()})
    data = buffer.getvalue()
    atomic_write(directory / FLAGS_NAME, lambda f: f.write(data))
    record["flags_sha256"] = sha256_bytes(data)
    write_json(directory / EVALUATION_NAME, record, sealed=True)

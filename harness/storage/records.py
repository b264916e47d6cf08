"""Run records: one JSON file per run, validated on read; pandas gives the table of all runs.

A record is plain data (RobustBench's lesson): the report is a pure function of records on disk.
This module owns the record.json contract: reading, validating, writing and upgrading older shapes
(`upgrade_record`, the typed `StoredRun` view); the report, `harness runs` and evaluation read through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.storage.atomic import write_json
from harness.storage.integrity import CorruptFileError, read_json
from harness.storage.locks import holder

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
STATUSES = ("running", "complete")

REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "run_id": str,
    "status": str,
    "spec": dict,
    "defense": dict,
    "environment": dict,
    "epochs": list,
    "final": dict,
    "checkpoints": dict,
    "created": str,
}


class CorruptRecordError(CorruptFileError):
    """A record file that cannot be parsed, fails its checksum or lacks required fields."""


def validate(record: Any, source: str = "record") -> dict[str, Any]:
    if not isinstance(record, dict):
        raise CorruptRecordError(f"{source}: not a JSON object")
    for key, kind in REQUIRED.items():
        if key not in record:
            raise CorruptRecordError(f"{source}: missing field {key!r}")
        if not isinstance(record[key], kind):
            raise CorruptRecordError(f"{source}: field {key!r} should be {getattr(kind, '__name__', kind)}")
    if record["schema"] != SCHEMA_VERSION:
        raise CorruptRecordError(f"{source}: schema {record['schema']} (this harness reads {SCHEMA_VERSION})")
    if record["status"] not in STATUSES:
        raise CorruptRecordError(f"{source}: status {record['status']!r} is not one of {STATUSES}")
    for i, epoch in enumerate(record["epochs"]):
        if not isinstance(epoch, dict) or "train_seconds" not in epoch:
            raise CorruptRecordError(f"{source}: epoch entry {i} lacks train_seconds")
    return record


def read_record(path: Path) -> dict[str, Any]:
    """Parse, verify the checksum (records written by the harness carry one) and validate."""
    try:
        data = read_json(path)
    except CorruptFileError as exc:
        raise CorruptRecordError(str(exc)) from None
    return validate(data, str(path))


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_json(path, validate(record, str(path)), sealed=True)


# --------------------------------------------------------------------------- older shapes and the typed view


def upgrade_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a run spec in the current shape (the report's protocol of an older run)."""
    spec = dict(spec)
    # Records before mixed precision, torch.compile and multi-process training ran plain fp32 on one process.
    spec.setdefault("precision", "fp32")
    spec.setdefault("compile", "none")
    spec.setdefault("world_size", 1)
    spec.setdefault("batchnorm", "global")
    # Records before dropout and model revisions trained revision 1 without dropout ("or": null meant none).
    spec["dropout"] = spec.get("dropout") or 0.0
    spec.setdefault("model_revision", 1)
    # Records before presets and seeds in the spec.
    spec.setdefault("preset", "?")
    spec.setdefault("seed", 0)
    return spec


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a validated record in the current shape (never written back: the runner's resume keeps
    what it read). The only place that knows the older shapes of record.json."""
    rec = dict(record)
    rec["spec"] = upgrade_spec(record["spec"])
    # Records before the collapse diagnostic (diagnostics.collapsed) name no collapsed checkpoint.
    rec["diagnostics"] = {"collapsed": [], "collapse_share": 0.99, **(record.get("diagnostics") or {})}
    # Records before the protocol block: the report derives it from the spec (see StoredRun).
    rec["protocol"] = dict(record.get("protocol") or {})
    # Records before checkpoints were hashed bind no evaluation to weights.
    rec["checkpoint_sha256"] = dict(record.get("checkpoint_sha256") or {})
    # Records before replayed defenses and config digests: one replay, empty config.
    rec["defense"] = {"replays": 1, "config": {}, **record["defense"]}
    # Records whose environment lacks a device or git block (a CPU run outside a clone).
    rec["environment"] = {
        **record["environment"],
        "device": record["environment"].get("device") or {},
        "git": record["environment"].get("git") or {},
    }
    return rec


@dataclass(frozen=True)
class StoredRun:
    """A typed, read-only view of an upgraded run record: what readers need beyond `raw` (the upgraded dict)."""

    run_id: str
    status: str
    spec: Mapping[str, Any]
    device_name: str | None
    commit: str
    collapsed: tuple[str, ...]
    collapse_share: float
    replays: int
    eval_steps: int | None
    eval_restarts: int
    eval_step_size: Any
    test_indices: Any
    equivalent_epochs: int
    train_examples: int | None
    held_out_examples: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StoredRun:
        rec = upgrade_record(record)
        spec, proto = rec["spec"], rec["protocol"]
        attack, evaluation = proto.get("eval_attack") or {}, spec.get("eval") or {}
        return cls(
            run_id=rec["run_id"],
            status=rec["status"],
            spec=spec,
            device_name=rec["environment"]["device"].get("name"),
            commit=(rec["environment"]["git"].get("commit") or "")[:10],
            collapsed=tuple(rec["diagnostics"]["collapsed"]),
            collapse_share=rec["diagnostics"]["collapse_share"],
            replays=int(rec["defense"]["replays"] or 1),
            # Records before protocol.eval_attack: the spec's eval settings (one restart unless stated).
            eval_steps=attack.get("steps", evaluation.get("pgd_steps")),
            eval_restarts=attack.get("restarts", evaluation.get("pgd_restarts", 1)),
            eval_step_size=attack.get("step_size", spec.get("eval_step")),
            test_indices=proto.get("test_indices") or _indices_of_final(rec),
            # Records before protocol.equivalent_epochs: the schedule's epochs, else the epochs logged.
            equivalent_epochs=int(
                proto.get("equivalent_epochs", (spec.get("schedule") or {}).get("epochs", len(rec["epochs"])))
            ),
            train_examples=proto.get("train_examples"),
            held_out_examples=int(proto.get("held_out_examples") or 0),
            raw=rec,
        )


def _indices_of_final(rec: Mapping[str, Any]) -> str:
    """Records before protocol.test_indices evaluated the first n test points (n of final.last)."""
    n = rec["final"].get("last", {}).get("n")
    return f"0..{n - 1}" if isinstance(n, int) else "unknown"


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def iter_records(
    results_dir: Path, status: str | None = "complete", on_problem: Callable[[str], None] = _warn
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid record below `results_dir`; a corrupt one is named (`on_problem`) and skipped."""
    for path in sorted(Path(results_dir).glob(f"*/{RECORD_NAME}")):
        try:
            record = read_record(path)
        except CorruptRecordError as exc:
            on_problem(f"skipped corrupt record {exc}")
            continue
        if status is None or record["status"] == status:
            yield path, record


def live_status(run_dir: Path, status: str) -> str:
    """A record's status as it stands now: a "running" record whose writer was killed is "interrupted".

    The run's lock file names its live writer (`harness.storage.locks.holder`); a writer on another host
    cannot be checked from here and is reported as such rather than guessed.
    """
    if status != "running":
        return status
    found = holder(run_dir)
    if found is None or found.alive is False:
        return "interrupted"
    return f"running ({found})" if found.alive else f"running? ({found}, not checked from here)"


def run_state(results_dir: Path, run_id: str) -> tuple[str, dict[str, Any] | None]:
    """(state, record or None) of one run of a grid: "not started", "corrupt: why", or its live status."""
    run_dir = Path(results_dir) / run_id
    path = run_dir / RECORD_NAME
    if not path.exists():
        found = holder(run_dir)
        return (f"starting ({found})" if found and found.alive else "not started"), None
    try:
        record = read_record(path)
    except CorruptRecordError as exc:
        return f"corrupt: {exc}", None
    return live_status(run_dir, record["status"]), record


def execution_columns(rec: dict[str, Any]) -> dict[str, Any]:
    """How a run's numbers were computed (part of its identity), and whether its final model collapsed
    onto one class (`diagnostics.collapsed`: the checkpoints that did; empty for records before it)."""
    run = StoredRun.from_record(rec)
    return {
        "precision": run.spec["precision"],
        "compile": run.spec["compile"],
        "world_size": run.spec["world_size"],
        "collapsed": ",".join(run.collapsed),
    }


def record_row(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """A record's row of the runs table: identity, protocol, execution, final metrics, mean epoch time."""
    run = StoredRun.from_record(rec)
    spec = run.spec
    row = {
        "run_id": rec["run_id"],
        "status": live_status(path.parent, rec["status"]),
        "defense": spec["defense"],
        "dataset": spec["dataset"],
        "model": spec["model"],
        "preset": spec["preset"],
        "seed": spec["seed"],
        "eps": spec["eps"],
        **execution_columns(rec),
        "epochs": len(rec["epochs"]),
        "mean_epoch_seconds": (
            sum(e["train_seconds"] for e in rec["epochs"]) / len(rec["epochs"]) if rec["epochs"] else None
        ),
        "device": run.device_name,
        "commit": run.commit,
        "path": str(path.parent),
    }
    for checkpoint, metrics in rec["final"].items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)):
                row[f"{checkpoint}_{metric}"] = value
    return row


def runs_table(
    results_dir: Path, status: str | None = "complete", on_problem: Callable[[str], None] = _warn
) -> pd.DataFrame:
    """One row per run (`record_row`)."""
    return pd.DataFrame([record_row(path, rec) for path, rec in iter_records(results_dir, status, on_problem)])


def collapse_message(record: dict[str, Any]) -> str | None:
    """The warning for a run whose final model put (almost) every test prediction in one class
    (`diagnostics.collapsed`, set by the runner): its accuracies are a constant predictor's."""
    run = StoredRun.from_record(record)
    collapsed, share = run.collapsed, run.collapse_share
    if not collapsed:
        return None
    return (
        f"run {record['run_id']} collapsed: its {' and '.join(collapsed)} model puts at least {share:.0%} of its "
        f"test predictions in one class (its accuracies are a constant predictor's)"
    )

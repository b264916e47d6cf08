"""One owner per record contract: harness.storage.records (record.json) and harness.evaluation.evaluation_record
(evaluation.json + flags.npz). Each older shape the readers handled upgrades to the current view; a
writer's record reads back unchanged; a future schema is refused in one line."""

from __future__ import annotations

import copy
import dataclasses
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from report_fixture import FakeRun, run_record

from harness.core.errors import HarnessError
from harness.evaluation.evaluation_record import (
    CorruptEvaluationError,
    EvaluationRecord,
    read_evaluation,
    read_for_report,
)
from harness.evaluation.flags import EvaluationStore, vouched_cells
from harness.reporting.loading import load_results
from harness.storage.atomic import write_json
from harness.storage.integrity import read_json
from harness.storage.records import CorruptRecordError, StoredRun, read_record, write_record

# ------------------------------------------------------------------------------------------ evaluation.json

HEADER = {
    "checkpoint": {"source": "harness", "run_id": "r1", "label": "last", "name": "r1", "sha256": "ab" * 32},
    "dataset": "fashion-mnist",
    "model": "small-cnn",
    "n": 8,
    "test_indices": "0..7",
    "config": {"attacks": ["pgd-20"]},
    "environment": {"device": {"name": "cpu"}},
}


def _written_evaluation(directory: Path) -> dict:
    """A record written by the store (the writer `harness eval` uses), read back as raw JSON."""
    store = EvaluationStore.create(directory, copy.deepcopy(HEADER))
    store.set_clean(np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=bool))
    store.add_cell("pgd-20", Fraction(8, 255), np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool), 1.0)
    store.finish([{"name": "robust_le_clean", "passed": True, "detail": "ok"}], [])
    return read_json(directory / "evaluation.json")  # checksum verified and left out


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_store_writer_round_trips_through_both_readers(tmp_path):
    raw = _written_evaluation(tmp_path)
    by_report, by_store = read_for_report(tmp_path / "evaluation.json"), read_evaluation(tmp_path / "evaluation.json")
    assert by_report == EvaluationRecord.from_raw(raw) == EvaluationRecord.from_raw(by_store)
    assert by_report.raw == raw  # the current shape is not touched by the upgrade
    assert by_report.complete and by_report.flags_name == "flags.npz" and by_report.flags_sha256 == raw["flags_sha256"]
    assert [(r["attack"], r["n"]) for r in by_report.results] == [("pgd-20", 8)]
    assert EvaluationStore.load(tmp_path).accuracy("pgd-20", Fraction(8, 255)) == 25.0


def test_evaluation_before_the_flags_checksum_upgrades_to_the_current_view(tmp_path):
    raw = _written_evaluation(tmp_path)
    old = EvaluationRecord.from_raw(_without(raw, "flags_sha256"))  # before the integrity pass
    assert old == dataclasses.replace(EvaluationRecord.from_raw(raw), flags_sha256=None)
    assert set(old.raw) == set(raw)


def test_evaluation_before_the_masking_probes_upgrades_to_the_current_view(tmp_path):
    raw = _written_evaluation(tmp_path)
    old = EvaluationRecord.from_raw(_without(raw, "checks_skipped"))
    assert old == EvaluationRecord.from_raw(raw) and set(old.raw) == set(raw)


@pytest.mark.parametrize("checkpoint", [{"source": "robustbench", "name": "Carmon2019"}, {"path": "model.pt"}])
def test_hand_written_external_evaluation_upgrades_to_the_current_view(tmp_path, checkpoint):
    """Only the report's required fields, a checkpoint naming little or nothing, no flags file."""
    raw = _written_evaluation(tmp_path)
    external = {
        **_without(
            raw,
            "status",
            "checks_skipped",
            "flags",
            "flags_sha256",
            "test_indices",
            "config",
            "environment",
            "created",
            "finished",
        ),
        "checkpoint": checkpoint,
    }
    old = EvaluationRecord.from_raw(external)
    expected = dataclasses.replace(
        EvaluationRecord.from_raw(raw),
        flags_name=None,
        flags_sha256=None,
        test_indices=None,
        checkpoint={"source": "?", "name": None, "label": "?", "run_id": None, "sha256": None, **checkpoint},
    )
    assert old == expected
    assert set(old.raw) == set(raw) - {"created", "finished"}
    assert (old.raw["config"], old.raw["environment"]) == ({}, {})


def test_result_rows_without_a_sample_count_are_checked_on_accuracy_only(tmp_path):
    raw = _written_evaluation(tmp_path)
    raw["results"] = [_without(row, "n") for row in raw["results"]]
    flags = {"clean": np.ones(8, dtype=bool), "pgd-20@8/255": np.array([1, 1] + [0] * 6, dtype=bool)}
    raw["clean_accuracy"] = 100.0
    assert set(vouched_cells(EvaluationRecord.from_raw(raw), flags, tmp_path)) == set(flags)


def test_future_evaluation_schema_is_refused_in_one_line(tmp_path):
    raw = _written_evaluation(tmp_path)
    write_json(tmp_path / "evaluation.json", {**raw, "schema": 2})
    with pytest.raises(HarnessError) as store_error:
        read_evaluation(tmp_path / "evaluation.json")
    with pytest.raises(CorruptEvaluationError) as report_error:
        read_for_report(tmp_path / "evaluation.json")
    for message in (str(store_error.value), str(report_error.value)):
        assert "\n" not in message and "schema" in message


# ------------------------------------------------------------------------------------------ record.json


def _current_run(tmp_path: Path) -> dict:
    """The fixture record with every field the runner now writes."""
    record = run_record(FakeRun("pgd-at", 0, clean=80.0, pgd=50.0), tmp_path)
    record["spec"].update(precision="fp32", compile="none", world_size=1, batchnorm="global", model_revision=1)
    record["diagnostics"] = {"collapsed": [], "collapse_share": 0.99}
    record["checkpoint_sha256"] = {"last": "cd" * 32}
    return record


def _shape(record: dict) -> dict:
    """The fields of a record and of its blocks that have fixed fields."""
    return {
        key: sorted(record[key]) if key in ("spec", "defense", "environment", "diagnostics") else None
        for key in sorted(record)
    }


OLD_RUN_SHAPES = {
    "before precision, compile, processes": lambda r: (
        r["spec"].__delitem__("precision") or [r["spec"].pop(k) for k in ("compile", "world_size", "batchnorm")]
    ),
    "before dropout and revisions": lambda r: r["spec"].update(dropout=None) or r["spec"].pop("model_revision"),
    "before presets and seeds": lambda r: [r["spec"].pop(k) for k in ("preset", "seed")],
    "before the collapse diagnostic": lambda r: r.pop("diagnostics"),
    "before hashed checkpoints": lambda r: r.pop("checkpoint_sha256"),
    "before replays": lambda r: [r["defense"].pop(k) for k in ("replays", "config")],
    "replays null": lambda r: r["defense"].update(replays=None),
    "without device and git": lambda r: r.update(environment={}),
}
CHANGED_BY_SHAPE = {  # what an older shape could not say, so its view differs there only
    "before presets and seeds": {"spec"},
    "without device and git": {"device_name", "commit"},
}


@pytest.mark.parametrize("shape", sorted(OLD_RUN_SHAPES))
def test_older_run_record_upgrades_to_the_current_view(tmp_path, shape):
    current = _current_run(tmp_path)
    old = copy.deepcopy(current)
    OLD_RUN_SHAPES[shape](old)
    view, now = StoredRun.from_record(old), StoredRun.from_record(current)
    changed = {
        f.name
        for f in dataclasses.fields(StoredRun)
        if f.name != "raw" and getattr(view, f.name) != getattr(now, f.name)
    }
    assert changed == CHANGED_BY_SHAPE.get(shape, set())
    assert _shape(view.raw) == _shape(now.raw)
    assert sorted(view.spec) == sorted(now.spec)


def test_run_record_before_the_protocol_block_derives_it_from_the_spec(tmp_path):
    current = _current_run(tmp_path)
    old = {k: v for k, v in current.items() if k != "protocol"}
    view, now = StoredRun.from_record(old), StoredRun.from_record(current)
    assert (view.eval_steps, view.eval_restarts, view.eval_step_size) == (20, 1, "2/255")
    assert (view.test_indices, view.equivalent_epochs) == (now.test_indices, now.equivalent_epochs)
    assert dataclasses.replace(view, train_examples=now.train_examples) == now


def test_run_record_before_protocol_and_schedule_counts_its_logged_epochs(tmp_path):
    current = _current_run(tmp_path)
    old = {k: v for k, v in current.items() if k != "protocol"}
    old["spec"] = {k: v for k, v in current["spec"].items() if k != "schedule"}
    assert StoredRun.from_record(old).equivalent_epochs == len(current["epochs"]) == 3


def test_held_out_examples_read_from_the_protocol_and_absent_before_bilevel(tmp_path):
    record = run_record(FakeRun("ades-bilevel", 0, clean=80.0, pgd=50.0, held_out=500), tmp_path)
    view = StoredRun.from_record(record)
    assert (view.held_out_examples, view.train_examples) == (500, 4500)
    record["protocol"].pop("held_out_examples")
    assert StoredRun.from_record(record).held_out_examples == 0


def test_run_record_round_trips_and_old_records_stay_unwritten(tmp_path):
    record = _current_run(tmp_path)
    path = tmp_path / "r" / "record.json"
    path.parent.mkdir()
    write_record(path, record)
    assert StoredRun.from_record(read_record(path)) == StoredRun.from_record(record)
    old = copy.deepcopy(record)
    old.pop("diagnostics")
    StoredRun.from_record(old)
    assert "diagnostics" not in old  # upgrading is a copy: the runner's resume writes back what it read


def test_future_run_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "r" / "record.json"
    path.parent.mkdir()
    write_json(path, {**_current_run(tmp_path), "schema": 2})
    with pytest.raises(CorruptRecordError) as error:
        read_record(path)
    assert "\n" not in str(error.value) and "schema 2" in str(error.value)


def test_report_names_a_future_evaluation_record_in_one_problem_line(tmp_path):
    record = _current_run(tmp_path)
    write_record(tmp_path / record["run_id"] / "record.json", record)
    evaluation = tmp_path / record["run_id"] / "eval" / "last"
    raw = _written_evaluation(evaluation)
    write_json(evaluation / "evaluation.json", {**raw, "schema": 2})
    problems = load_results(tmp_path).problems
    assert [p for p in problems if "schema" in p] == [
        f"skipped corrupt evaluation record {evaluation / 'evaluation.json'}: not a schema-1 evaluation record"
    ]


def test_report_reads_the_flags_checksum_through_the_view(tmp_path):
    """Same cells, other bytes (uncompressed): only the record's flags_sha256 tells this file from its own."""
    record = _current_run(tmp_path)
    write_record(tmp_path / record["run_id"] / "record.json", record)
    evaluation = tmp_path / record["run_id"] / "eval" / "last"
    _written_evaluation(evaluation)
    with np.load(evaluation / "flags.npz") as archive:
        cells = {key: archive[key] for key in archive.files}
    np.savez(evaluation / "flags.npz", **cells)
    results = load_results(tmp_path)
    assert [p for p in results.problems if "flags" in p] == [
        f"flags file {evaluation / 'flags.npz'} fails its checksum (corrupt; not used)"
    ]
    assert results.evaluations[0].flags == {}

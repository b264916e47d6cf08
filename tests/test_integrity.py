"""Integrity units: restricted data unpickling, checksums of every stored kind, locks, config rules.

The CLI-level crash, corruption and bad-input cases are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import methods  # noqa: F401
from harness.core.datasets import DATASETS, load_split, write_synthetic_cifar
from harness.core.defense import DEFENSES
from harness.core.errors import HarnessError
from harness.core.validation import DefenseConfig, at_least, check_seed, rules, validate_config
from harness.evaluation.flags import FLAGS_NAME, EvaluationStore, cell_key
from harness.storage.atomic import atomic_write, load_torch, save_torch, write_json
from harness.storage.integrity import CorruptFileError, read_json
from harness.storage.locks import Holder, hold, holder, lock_path, remove_stale_temps
from harness.storage.records import CorruptRecordError, iter_records, read_record, write_record

ROOT = Path(__file__).resolve().parent.parent

SYNTHETIC = DATASETS.get("synthetic")


def flip(path: Path, offset_fraction: float = 0.5, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


# --------------------------------------------------------------------------- safe data loading


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _synthetic_dir(tmp_path: Path) -> Path:
    write_synthetic_cifar(tmp_path / "synthetic-batches-py", n_train=64, n_test=32)
    return tmp_path


def test_crafted_data_batch_is_refused_and_runs_nothing(tmp_path):
    data_dir = _synthetic_dir(tmp_path)
    marker = tmp_path / "pwned"
    batch = data_dir / "synthetic-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}))
    with pytest.raises(HarnessError) as info:
        load_split(SYNTHETIC, data_dir, train=False)
    assert str(batch) in str(info.value) and "system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"data": np.array([object()], dtype=object), "labels": [0]}, "references builtins.object"),
        ({"data": np.array([1, "x"], dtype=object), "labels": [0]}, "refused: numpy array of dtype object"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "extra": {1, 2}}, "refused: a data batch holds a set"),
        ([1, 2, 3], "a CIFAR batch is a dict"),
    ],
)
def test_data_batch_with_foreign_types_is_refused(tmp_path, payload, message):
    data_dir = _synthetic_dir(tmp_path)
    batch = data_dir / "synthetic-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(payload))
    with pytest.raises(HarnessError, match=f"test_batch: .*{message}"):
        load_split(SYNTHETIC, data_dir, train=False)


def test_truncated_data_batch_is_one_line(tmp_path):
    data_dir = _synthetic_dir(tmp_path)
    truncate(data_dir / "synthetic-batches-py" / "test_batch")
    with pytest.raises(HarnessError, match="truncated or corrupt"):
        load_split(SYNTHETIC, data_dir, train=False)


def test_python2_style_and_numpy_batches_still_load(tmp_path):
    """The official CIFAR batches are protocol-2 pickles: the allowlist must admit them."""
    data_dir = _synthetic_dir(tmp_path)
    batch = data_dir / "synthetic-batches-py" / "test_batch"
    data = {
        "data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
        "labels": [3, 4],
        "batch_label": b"testing batch 1 of 1",
        "filenames": ["a.png", "b.png"],
    }
    for protocol in (2, 4, 5):
        batch.write_bytes(pickle.dumps(data, protocol=protocol))
        split = load_split(SYNTHETIC, data_dir, train=False)
        assert split.labels.tolist() == [3, 4] and int(split.images[1].flatten()[0]) == 3072 % 256


def test_concurrent_synthetic_preparation(tmp_path):
    """Two processes creating the synthetic set in one fresh directory: both succeed, same data."""
    code = (
        "import sys; from pathlib import Path; from harness.core.datasets import DATASETS, load_split; "
        "s = load_split(DATASETS.get('synthetic'), Path(sys.argv[1]), train=False); print(int(s.images.sum()))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert not list((tmp_path / "synthetic-batches-py").glob(".*.tmp"))


# --------------------------------------------------------------------------- checksums


def test_checkpoint_round_trip_and_flipped_or_truncated_bytes(tmp_path):
    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "pass": 3}
    save_torch(path, state)
    loaded = load_torch(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["pass"] == 3
    for damage in (lambda p: flip(p, 0.5), lambda p: flip(p, 0.9), truncate):
        save_torch(path, state)
        damage(path)
        with pytest.raises(CorruptFileError) as info:
            load_torch(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checksum_mismatch_names_expected_and_found(tmp_path):
    path = tmp_path / "best.pt"
    save_torch(path, {"w": torch.zeros(64)})
    outer = torch.load(path, weights_only=True)
    outer["payload"][-20] ^= 0xFF  # a valid file whose payload no longer matches its hash
    torch.save(outer, path)
    with pytest.raises(CorruptFileError, match=rf"{outer['sha256'][:16]}, found [0-9a-f]{{16}}"):
        load_torch(path)


def test_plain_state_dict_still_loads(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    assert torch.equal(load_torch(tmp_path / "plain.pt")["w"], torch.ones(3))


def record(**changes):
    base = {
        "schema": 1,
        "run_id": "r",
        "status": "complete",
        "spec": {},
        "defense": {},
        "environment": {},
        "epochs": [{"train_seconds": 1.0}],
        "final": {"last": {"clean": 12.5}},
        "checkpoints": {},
        "created": "now",
    }
    return base | changes


def test_record_is_sealed_and_a_changed_value_is_named(tmp_path):
    path = tmp_path / "run" / "record.json"
    write_record(path, record())
    assert "sha256" in json.loads(path.read_text()) and read_record(path) == record()
    path.write_text(path.read_text().replace("12.5", "20.3"))
    with pytest.raises(CorruptRecordError, match="checksum mismatch"):
        read_record(path)


def test_invalid_utf8_record_is_skipped_not_fatal(tmp_path):
    write_record(tmp_path / "good" / "record.json", record(run_id="good"))
    write_record(tmp_path / "bad" / "record.json", record(run_id="bad"))
    data = bytearray((tmp_path / "bad" / "record.json").read_bytes())
    data[10] = 0xFF
    (tmp_path / "bad" / "record.json").write_bytes(bytes(data))
    problems = []
    found = [r["run_id"] for _, r in iter_records(tmp_path, on_problem=problems.append)]
    assert found == ["good"] and len(problems) == 1 and "not UTF-8" in problems[0]


def _store(tmp_path: Path) -> EvaluationStore:
    store = EvaluationStore.create(
        tmp_path / "ev",
        {
            "checkpoint": {"name": "x", "label": "last", "sha256": "a" * 64},
            "dataset": "synthetic",
            "model": "m",
            "n": 8,
            "test_indices": "0..7",
            "config": {},
            "environment": {},
        },
    )
    store.set_clean(np.array([1, 1, 1, 1, 1, 1, 0, 0], bool))
    store.save()
    store.add_cell("pgd-20", Fraction(8, 255), np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), 1.0)
    store.save()
    return store


def test_flags_ahead_of_the_record_keep_only_vouched_cells(tmp_path):
    """A kill between the flags write and the record write: the extra cell is dropped, to be redone."""
    store = _store(tmp_path)
    before = json.loads((store.dir / "evaluation.json").read_text())
    store.add_cell("cw-inf", Fraction(8, 255), np.ones(8, bool), 1.0)
    store.save()
    write_json(store.dir / "evaluation.json", {k: v for k, v in before.items() if k != "sha256"}, sealed=True)
    again = EvaluationStore.load(store.dir)
    assert set(again.flags) == {"clean", cell_key("pgd-20", Fraction(8, 255))}
    assert len(again.record["results"]) == 1


def test_complete_evaluation_with_other_flags_is_refused(tmp_path):
    store = _store(tmp_path)
    store.finish([], [])
    np.savez_compressed(
        store.dir / FLAGS_NAME, clean=np.ones(8, bool), **{cell_key("pgd-20", Fraction(8, 255)): np.zeros(8, bool)}
    )
    with pytest.raises(CorruptFileError, match="flags.npz: checksum mismatch"):
        EvaluationStore.load(store.dir)


@pytest.mark.parametrize("damage", [truncate, flip])
def test_damaged_flags_file_is_named(tmp_path, damage):
    store = _store(tmp_path)
    damage(store.dir / FLAGS_NAME)
    with pytest.raises(CorruptFileError, match="flags.npz"):
        EvaluationStore.load(store.dir)


def test_flag_cell_that_disagrees_with_its_row_is_refused(tmp_path):
    store = _store(tmp_path)
    flags = dict(store.flags)
    flags[cell_key("pgd-20", Fraction(8, 255))] = np.ones(8, bool)
    np.savez_compressed(store.dir / FLAGS_NAME, **flags)
    with pytest.raises(CorruptFileError, match="does not match its record"):
        EvaluationStore.load(store.dir)


def test_resume_refuses_other_weights(tmp_path):
    store = EvaluationStore.load(_store(tmp_path).dir)
    store.check_weights("a" * 64)
    with pytest.raises(HarnessError, match="sha256 aaaaaaaaaaaaaaaa"):
        store.check_weights("b" * 64)


def test_unreadable_json_kinds(tmp_path):
    path = tmp_path / "x.json"
    for raw, message in ((b"\xff{}", "not UTF-8"), (b'{"a": ', "not valid JSON")):
        path.write_bytes(raw)
        with pytest.raises(CorruptFileError, match=message):
            read_json(path)


# --------------------------------------------------------------------------- writes and locks


def test_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(HarnessError, match="No space left on device"):
        atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x" * 100))
    assert list(tmp_path.iterdir()) == []


def test_lock_names_the_holder_and_wait_blocks_until_release(tmp_path):
    run = tmp_path / "run"
    released = threading.Event()
    with hold(run, what="run r"):
        assert lock_path(run).read_text().strip() == f"{os.getpid()} {socket.gethostname()}"
        assert holder(run) == Holder(os.getpid(), socket.gethostname()) and holder(run).alive
        with pytest.raises(HarnessError, match=rf"run r is in use by another harness process \(pid {os.getpid()}\)"):
            with hold(run, what="run r"):
                pass
        with pytest.raises(HarnessError):  # a reader is refused while a writer holds it
            with hold(run, what="run r", shared=True):
                pass

        def waiter():
            with hold(run, what="run r", wait=True):
                released.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)
        assert not released.is_set()
    thread.join(timeout=10)
    assert released.is_set()
    assert holder(run) is None  # a holder that let go leaves no pid behind
    with hold(run, what="run r", shared=True), hold(run, what="run r", shared=True):
        pass  # readers share


def test_a_killed_holder_is_told_from_a_live_one(tmp_path):
    """A SIGKILLed holder leaves its pid in the lock file; `holder` sees that pid is no longer alive."""
    run = tmp_path / "run"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from harness.storage.locks import hold\n"
            f"with hold(__import__('pathlib').Path({str(run)!r}), what='r'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout.readline().strip() == "held"
    assert holder(run) == Holder(child.pid, socket.gethostname()) and holder(run).alive is True
    child.kill()
    child.wait()
    assert holder(run).pid == child.pid and holder(run).alive is False
    elsewhere = Holder(child.pid, socket.gethostname() + "-other")
    assert elsewhere.alive is None and str(elsewhere) == f"pid {child.pid} on {socket.gethostname()}-other"


def test_stale_temps_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"keep")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".last.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    "defense, field, bad",
    [
        ("pgd-at", "steps", 0),
        ("pgd-at", "steps", -5),
        ("pgd-at", "step_size_rel", float("nan")),
        ("pgd-at", "step_size_rel", -1.0),
        ("pgd-at", "step_size_rel", float("inf")),
        ("trades", "steps", 0),
        ("trades", "step_size_rel", float("nan")),
        ("trades", "beta", -1.0),
        ("mart", "steps", 0),
        ("mart", "step_size_rel", float("nan")),
        ("mart", "init_noise", -0.1),
        ("mma", "steps", 0),
        ("mma", "step_scale", 0.0),
        ("mma", "clean_loss_coeff", float("nan")),
        ("free-at", "replays", 0),
        ("free-at", "step_rel", float("nan")),
        ("iaat", "steps", 0),
        ("iaat", "step_min_rel", -1.0),
        ("iaat", "step_per_eps", float("nan")),
        ("fat", "steps", 0),
        ("fat", "step_size_rel", float("nan")),
        ("fat", "omega", -1.0),
        ("fat", "taus", (0, -1, 2)),
        ("fat", "tau_milestones", (0.75, 0.4)),
        ("fat", "tau_milestones", (0.4, 1.5)),
        ("iaat", "beta", 0.0),
        ("iaat", "beta", 1.5),
        ("iaat", "warmup_frac", -0.1),
        ("trades", "init_noise", 0.0),
        ("cat", "max_steps", 0),
        ("cat", "step_size_rel", 0.0),
        ("ades-bilevel", "held_out_fraction", 1.0),
        ("ades-bilevel", "held_out_batch", 0),
        ("ades", "eps_min", Fraction(3, 2)),
        ("ades", "hidden", 0),
        ("ades", "budget_penalty", -1.0),
        ("static-des", "weights", (1.0, -1.0, 1.0)),
        ("static-des", "hist_bins", 0),
    ],
)
def test_every_config_rejects_bad_values(defense, field, bad):
    import dataclasses

    config = DEFENSES.get(defense).Config()
    validate_config(config, defense)  # the defaults pass
    with pytest.raises(HarnessError, match=rf"{defense}: {field} must be"):
        validate_config(dataclasses.replace(config, **{field: bad}), defense)


@pytest.mark.parametrize(
    "defense, changes, message",
    [
        (
            "fat",
            {"taus": (0, 1)},
            "fat: taus must be one more than tau_milestones, got taus=(0, 1) and "
            "tau_milestones=(0.4166666666666667, 0.75)",
        ),
        ("mma", {"min_eps_rel": 2.0}, "mma: min_eps_rel must be <= d_max_rel * search_max_factor, got 2 > 1.575"),
        (
            "trades",
            {"init_noise": 0.0},
            "trades: init_noise must be > 0, got 0.0 (the KL's gradient is zero at "
            "x' = x, so an attack started there never moves)",
        ),
        ("iaat", {"beta": 0.0}, "iaat: beta must be in (0, 1], got 0.0"),
        ("pgd-at", {"steps": 0}, "pgd-at: steps must be >= 1, got 0"),
        (
            "ades-bilevel",
            {"objective": "budget"},
            "ades-bilevel: objective must be bilevel, got budget (use -m ades or -m ades-joint for the others)",
        ),
    ],
)
def test_one_message_format_for_per_field_and_cross_field_rules(defense, changes, message):
    import dataclasses

    config = dataclasses.replace(DEFENSES.get(defense).Config(), **changes)
    with pytest.raises(HarnessError) as caught:
        validate_config(config, defense)
    assert str(caught.value) == message


def test_config_base_defaults_declare_no_rules():
    from harness.core.defense import NoConfig

    assert dict(DefenseConfig.RULES) == {} and NoConfig().validate() is None
    assert validate_config(NoConfig(), "none") == NoConfig()


def test_validate_config_refuses_a_config_without_the_base():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Plain:
        steps: int = 1

    with pytest.raises(TypeError, match="Plain is not a DefenseConfig"):
        validate_config(Plain())


def test_rules_naming_no_field_are_a_programming_error():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Typo(DefenseConfig):
        steps: int = 1
        RULES = rules(stpes=at_least(1))

    with pytest.raises(TypeError, match="stpes"):
        validate_config(Typo())


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_seed_range(seed):
    with pytest.raises(HarnessError, match="--seed must be in 0..4294967295"):
        check_seed(seed)
    assert check_seed(2**32 - 1) == 2**32 - 1

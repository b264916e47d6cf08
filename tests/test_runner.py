"""Runner: records, skip-if-complete, interrupted runs, resume to the same result."""

from __future__ import annotations

import json

import pytest
import torch

from harness.core.errors import HarnessError
from harness.storage.records import read_record, runs_table
from harness.training.runner import run
from harness.training.specs import make_spec


def strip_times(record):
    """Everything a rerun must reproduce: metrics, not wall-clock times or timestamps."""
    epochs = [{k: v for k, v in e.items() if not k.endswith("seconds") and k != "resources"} for e in record["epochs"]]
    final = {label: {k: v for k, v in m.items() if k != "seconds"} for label, m in record["final"].items()}
    return epochs, final


def test_record_has_provenance_and_metrics(tmp_path, run_options):
    spec = make_spec("pgd-at", "synthetic", "smoke", seed=1)
    record = run(spec, run_options(tmp_path / "results"))
    on_disk = read_record(tmp_path / "results" / spec.run_id / "record.json")
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["status"] == "complete"
    assert on_disk["spec"]["eps"] == "8/255" and on_disk["spec"]["seed"] == 1
    assert on_disk["defense"]["config"]["attack_bn"] == "train"
    env = on_disk["environment"]
    assert env["versions"]["torch"] and env["device"]["type"] == "cpu" and "commit" in env["git"]
    assert len(on_disk["epochs"]) == 1 and on_disk["epochs"][0]["train_seconds"] > 0
    for label in ("last", "best"):
        metrics = on_disk["final"][label]
        assert 0 <= metrics["pgd"] <= metrics["clean"] <= 100 and metrics["n"] == 64
    table = runs_table(tmp_path / "results")
    assert list(table["defense"]) == ["pgd-at"] and "last_pgd" in table


def test_completed_run_is_skipped_unless_forced(tmp_path, run_options):
    spec = make_spec("pgd-at", "synthetic", "smoke")
    first = run(spec, run_options(tmp_path))

    def no_training(pass_index):  # called as each training pass starts
        raise AssertionError("a completed run was retrained")

    assert run(spec, run_options(tmp_path, around_pass=no_training)) == first
    with pytest.raises(AssertionError, match="retrained"):
        run(spec, run_options(tmp_path, force=True, around_pass=no_training))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_record(tmp_path, run_options, interrupt_at_pass, passes_trained):
    spec = make_spec("pgd-at", "synthetic", "smoke", epochs=3)
    reference = run(spec, run_options(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        run(spec, run_options(tmp_path / "b", around_pass=interrupt_at_pass(2)))
    partial = read_record(tmp_path / "b" / spec.run_id / "record.json")
    assert partial["status"] == "running" and len(partial["epochs"]) == 2

    with pytest.raises(HarnessError, match="--resume"):
        run(spec, run_options(tmp_path / "b"))
    note, trained = passes_trained
    resumed = run(spec, run_options(tmp_path / "b", resume=True, around_pass=note))
    assert trained == [2]  # only the missing pass (a restart from scratch would reproduce the record too)
    assert strip_times(resumed) == strip_times(reference)


def test_no_partial_files_after_a_crash(tmp_path, run_options, monkeypatch):
    spec = make_spec("pgd-at", "synthetic", "smoke")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(RuntimeError):
        run(spec, run_options(tmp_path))
    run_dir = tmp_path / spec.run_id
    leftovers = [p.name for p in run_dir.iterdir()] if run_dir.exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp") or n.endswith(".pt")]


def test_lr_schedule_follows_equivalent_epochs():
    spec = make_spec("pgd-at", "synthetic", "paper")
    s = spec.schedule
    assert s.lr_at(0) == 0.1 and s.lr_at(74.9) == 0.1
    assert s.lr_at(75) == pytest.approx(0.01) and s.lr_at(90) == pytest.approx(0.001)
    short = make_spec("pgd-at", "synthetic", "paper", epochs=10).schedule
    assert short.lr_at(7.4) == 0.1 and short.lr_at(7.5) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"defense": "pgd-att"}, "did you mean 'pgd-at'"),
        ({"dataset": "cifar-10"}, "did you mean 'cifar10'"),
        ({"preset": "fast"}, "unknown preset"),
        ({"model": "resnet50"}, "unknown model"),
        ({"eps": "-1/255"}, "outside"),
        ({"eps": "1.5"}, "outside"),
        ({"eps": "eight"}, "not a number"),
        ({"epochs": 0}, "at least 1"),
        ({"overrides": ("steps=ten",)}, "cannot set steps"),
        ({"overrides": ("nope=1",)}, "no field 'nope'"),
        ({"overrides": ("attack_bn=half",)}, "choose one of"),
    ],
)
def test_make_spec_rejects_bad_input(kwargs, message):
    args = {"defense": "pgd-at", "dataset": "synthetic", "preset": "smoke"} | kwargs
    with pytest.raises(HarnessError, match=message):
        make_spec(args.pop("defense"), args.pop("dataset"), args.pop("preset"), **args)


def test_overrides_are_typed_and_change_the_run_id():
    base = make_spec("pgd-at", "synthetic", "smoke")
    changed = make_spec("pgd-at", "synthetic", "smoke", overrides=("steps=3", "attack_bn=eval"))
    assert changed.defense_config.steps == 3 and changed.defense_config.attack_bn == "eval"
    assert changed.run_id != base.run_id
    assert make_spec("pgd-at", "synthetic", "smoke").run_id == base.run_id


def test_reference_preset_uses_the_defense_schedule():
    spec = make_spec("pgd-at", "synthetic", "reference")
    assert spec.schedule.epochs == 200 and spec.schedule.lr_at(100) == pytest.approx(0.01)
    assert make_spec("pgd-at", "synthetic", "paper").schedule.epochs == 100


@pytest.mark.parametrize(
    "epochs, batches, replays, passes, last",
    [(3, 40, 1, 3, 40), (3, 40, 8, 1, 15), (200, 391, 8, 25, 391), (3, 4, 2, 2, 2)],
)
def test_minibatch_budget_matches_sgd_steps(epochs, batches, replays, passes, last):
    from harness.training.runner import MinibatchBudget

    budget = MinibatchBudget(epochs, batches, replays)
    assert budget.passes == passes and budget.minibatches_in_pass(passes - 1) == last
    steps = sum(budget.minibatches_in_pass(p) for p in range(passes)) * replays
    assert steps >= epochs * batches and steps - epochs * batches < replays
    assert budget.equivalent_epoch(passes - 1, last) == pytest.approx(steps / batches)


def test_compile_and_world_size_are_part_of_the_identity():
    """Numbers differ with compile (clean 53.1 vs 51.7 in issue 22) and with the process count, so
    neither may share a run id (or report cell) with a plain run; plain fp32 eager single-process
    runs keep the id they had before these fields existed."""
    plain = make_spec("pgd-at", "fashion-mnist", "smoke")  # smoke: the quick preset's scale changed (issue 20)
    assert plain.run_id == "fashion-mnist_pgd-at_small-cnn_seed0_acd7bb2309"  # named before issue 22
    ids = {
        plain.run_id,
        make_spec("pgd-at", "fashion-mnist", "smoke", compile_model=True).run_id,
        make_spec("pgd-at", "fashion-mnist", "smoke", ranks=2).run_id,
        make_spec("pgd-at", "fashion-mnist", "smoke", precision_name="bf16").run_id,
    }
    assert len(ids) == 4
    from harness.reporting.loading import numerics_label  # the report's protocol: never one cell

    labels = {
        numerics_label(make_spec("pgd-at", "fashion-mnist", "quick", **kw).to_dict())
        for kw in ({}, {"compile_model": True}, {"ranks": 2})
    }
    assert labels == {"fp32", "fp32, compiled inductor", "fp32, 2 processes"}


def test_a_spec_for_another_world_size_is_refused(tmp_path, run_options):
    spec = make_spec("pgd-at", "synthetic", "smoke", ranks=2)
    with pytest.raises(HarnessError, match="2 process"):
        run(spec, run_options(tmp_path))
    assert not (tmp_path / spec.run_id).exists()

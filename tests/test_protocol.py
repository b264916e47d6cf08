"""Reference protocols: the diff between a run and its authors' settings, the options that remove the
cheap departures (`--preset reference`), and how the report shows them (cards, Table 1 marks)."""

from __future__ import annotations

import pytest
import report_fixture as fx
import torch
from torch import nn

from harness.core.models import build_model, normalizes_input
from harness.core.protocol import INPUT_RAW, NO_REFERENCE, protocol_diff, reference_of, run_protocol
from harness.reporting import build, load_results
from harness.reporting.render import render_html
from harness.training.optim import decayed_and_undecayed, sgd_for
from harness.training.runner import run
from harness.training.specs import make_spec
from methods.fat import FAT


def record_of(spec) -> dict:
    return {"spec": spec.to_dict(), "defense": {"config": spec.to_dict()["defense_config"]}}


def departing(defense: str, spec) -> set[str]:
    diff = protocol_diff(reference_of(defense), record_of(spec))
    return {row["setting"] for row in diff["settings"] if row["departs"]}


# ------------------------------------------------------------------------------------------ the diff


def test_eps_0031_and_8_255_are_different_budgets():
    """TRADES' authors train at 0.031, the paper under test at 8/255: a departure; PGD-AT's is 8/255."""
    assert "eps (L-inf)" in departing("trades", make_spec("trades", "cifar10", "paper"))
    assert "eps (L-inf)" not in departing("pgd-at", make_spec("pgd-at", "cifar10", "paper"))
    assert "eps (L-inf)" not in departing("trades", make_spec("trades", "cifar10", "paper", eps="0.031"))


def test_config_and_input_departures_are_found():
    spec = make_spec("mart", "cifar10", "paper", overrides=("attack_bn=train",))
    found = departing("mart", spec)
    assert {"BatchNorm mode in the attack", "input normalisation", "weight decay", "lr schedule"} <= found
    assert "beta" not in found


@pytest.mark.parametrize(
    "defense, model, left",
    [
        ("trades", None, set()),
        ("mart", None, set()),
        ("fat", None, set()),
        ("pgd-at", "preact-resnet18", set()),
        ("iaat", None, set()),
        ("free-at", None, {"input normalisation"}),  # per-image standardisation is not offered
        ("mma", "wrn-28-4", {"input normalisation"}),
    ],
)
def test_reference_preset_removes_the_cheap_departures(defense, model, left):
    """Under --preset reference at the authors' eps only what the harness does not offer (and its
    never-on-test checkpoint choice) still departs."""
    eps = "0.031" if defense in ("trades", "mart", "fat") else None
    spec = make_spec(defense, "cifar10", "reference", eps=eps, model=model)
    assert departing(defense, spec) == left | {"checkpoint reported"}


def test_reference_preset_uses_raw_input_and_weight_decay_scope():
    assert make_spec("trades", "cifar10", "reference").model == "wrn-34-10-raw"
    assert make_spec("pgd-at", "cifar10", "reference").model == "wrn-34-10"  # Rice normalises
    assert make_spec("free-at", "cifar10", "reference").schedule.weight_decay_on == "conv-linear-weights"
    assert make_spec("free-at", "cifar10", "paper").schedule.weight_decay_on == "all"
    assert reference_of("trades").settings and any(s.reference == INPUT_RAW for s in reference_of("trades").settings)


def test_defenses_without_published_code_say_so():
    diff = run_protocol({"spec": {"defense": "ades"}, "defense": {"config": {}}})
    assert diff["source"] == NO_REFERENCE and diff["deviations"] is None


def test_fat_reference_schedule_is_the_authors_exactly():
    """FAT.py adjust_learning_rate (1-indexed epochs): 0.1, 0.01 from 60, 0.001 from 90, 0.0005 from 110."""
    lr = FAT.reference_schedule.lr_at
    expected = {0: 0.1, 58: 0.1, 59: 0.01, 88: 0.01, 89: 0.001, 108: 0.001, 109: 0.0005, 119: 0.0005}
    assert {epoch: lr(epoch) for epoch in expected} == pytest.approx(expected)


def test_run_record_carries_the_diff(tmp_path, run_options):
    spec = make_spec("trades", "synthetic", "smoke")
    record = run(spec, run_options(tmp_path))
    stored = record["reference_protocol"]
    assert stored["source"].startswith("yaodongyu/TRADES")
    assert stored == protocol_diff(reference_of("trades"), record)
    assert stored["deviations"] == len([r for r in stored["settings"] if r["departs"]]) > 0


# ------------------------------------------------------------------------------------------ the options


def test_weight_decay_only_on_conv_and_linear_weights(synthetic_info):
    model = build_model("small-cnn", synthetic_info)
    decayed, undecayed = decayed_and_undecayed(model)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decayed} == weights
    assert any(p.dim() == 1 for p in undecayed)  # BatchNorm scale/shift and biases
    schedule = make_spec("free-at", "synthetic", "reference").schedule
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sgd_for(model, schedule)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a zero gradient: only weight decay moves anything
    moved = {id(p) for p, b in zip(model.parameters(), before) if not torch.equal(p, b)}
    assert moved == {id(p) for p in decayed if p.abs().sum() > 0}


def test_raw_input_twin_feeds_pixels_unnormalised(synthetic_info):
    torch.manual_seed(0)
    raw = build_model("small-cnn-raw", synthetic_info)
    normalised = build_model("small-cnn", synthetic_info)
    normalised.load_state_dict(raw.state_dict())  # the checkpoint carries its input convention
    x = torch.rand(4, 3, 32, 32)
    expected = raw.classifier(raw.features(x))
    assert not normalizes_input(raw) and not normalizes_input(normalised)
    assert torch.allclose(raw(x), expected) and torch.allclose(normalised(x), expected)
    assert normalizes_input(build_model("small-cnn", synthetic_info))


# ------------------------------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    fx.build_results(root)
    return build(load_results(root))


def test_every_method_has_a_card_with_its_departures(report):
    cards = {card.defense: card for card in report.protocol_cards}
    defenses = {run.defense for run in report.results.runs}
    assert set(cards) == defenses
    for defense, card in cards.items():
        if reference_of(defense) is None:
            assert card.source == NO_REFERENCE and not card.rows
        else:
            assert len(card.rows) == len(reference_of(defense).settings)
            assert card.departures  # the fixture runs use the quick preset, not the authors' protocol
    html = render_html(report)
    assert 'id="protocol-cards"' in html and 'id="protocol-pgd-at"' in html


def test_table1_marks_numbers_of_departing_runs(report):
    table = report.table1[0]
    rows = {row["Method"].text: row for row in table.display}
    pgd_at = rows["PGD-AT"]
    assert pgd_at["Clean"].text.endswith("†") and "departs" in pgd_at["Clean"].title
    assert pgd_at["Authors' protocol"].text.startswith("†")
    assert table.export["protocol_departures"].str.len().gt(0).any()


def test_fat_is_not_paired_with_fat_trades(tmp_path):
    """RobustBench's Zhang2020Attacks is FAT applied to TRADES: Table 1's FAT row must not show it as FAT's."""
    import report_fixture as fx

    from harness.reporting import build, load_results, reference

    hits = reference.robustbench()
    row = hits[hits["name"] == "Zhang2020Attacks"].iloc[0]
    assert row["harness_method"] == "" and "TRADES" in row["note"]
    fx.build_results(tmp_path, runs=(fx.FakeRun("fat", 0, 80.0, 45.0), fx.FakeRun("trades", 0, 79.0, 47.0)))
    (table,) = build(load_results(tmp_path)).table1
    published = table.export.set_index(["defense", "checkpoint"])["robustbench"]
    assert published["fat", "last"] == ""  # no official FAT checkpoint on RobustBench's CIFAR-10 list
    assert "Zhang2019Theoretically" in published["trades", "last"]  # the lookup itself works


def test_records_from_before_the_scope_field_decayed_everything():
    spec = make_spec("free-at", "cifar10", "reference").to_dict()
    del spec["schedule"]["weight_decay_on"]
    row = next(
        r
        for r in protocol_diff(reference_of("free-at"), {"spec": spec, "defense": {"config": {}}})["settings"]
        if r["path"] == "spec.schedule.weight_decay_on"
    )
    assert row["ours"] == "all" and row["departs"]

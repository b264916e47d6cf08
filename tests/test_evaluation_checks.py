"""Reliability checks trigger on constructed bad models and bad results, and pass on a good sweep."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from evaluation_helpers import store_for, template_data, train_tiny
from torch import nn

from harness.core.errors import HarnessError
from harness.evaluation.attacks import ATTACKS, AttackOptions
from harness.evaluation.checks import model_checks, result_checks
from harness.evaluation.flags import WORST_CASE, cell_key, load_flags, percent, read_evaluation
from harness.evaluation.nesting import raw_key
from harness.evaluation.sweep import sweep


@pytest.fixture(scope="module")
def tiny():
    return train_tiny(steps=150)


@pytest.fixture(scope="module")
def data():
    return template_data(120, seed=3)


class Probabilities(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Randomized(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):  # noise on the input whatever the mode: a randomised defense
        return self.inner(x + 0.05 * torch.randn_like(x))


class Quantized(nn.Module):
    """Rounds the input to 8 levels: the rounding has zero gradient everywhere (shattered gradients)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 7) / 7)


def failed(checks) -> set[str]:
    return {c.name for c in checks if not c.passed}


def test_good_model_passes_model_checks(tiny, data):
    assert failed(model_checks(tiny, *data)) == set()


@pytest.mark.parametrize(
    "wrapper, expected",
    [
        (Probabilities, "outputs-are-logits"),
        (Randomized, "deterministic-outputs"),
        (Quantized, "nonzero-input-gradients"),
    ],
)
def test_bad_models_are_flagged(tiny, data, wrapper, expected):
    assert expected in failed(model_checks(wrapper(tiny), *data))


def test_inputs_outside_unit_range_are_refused_before_any_attack(tiny, data, tmp_path):
    x, y = data
    attack = ATTACKS.get("pgd-20").build(AttackOptions(batch_size=64))
    with pytest.raises(HarnessError, match=r"outside \[0, 1\]"):
        sweep(tiny, (x - 0.5) / 0.25, y, [attack], [Fraction(1, 10)], store_for(tmp_path, len(y)))
    assert not (tmp_path / "evaluation.json").exists()


def cells(clean: int, table: dict[str, list[int]], eps: list[Fraction]) -> dict[str, np.ndarray]:
    flags = {"clean": np.arange(100) < clean}
    for attack, accs in table.items():
        for e, acc in zip(eps, accs):
            flags[cell_key(attack, e)] = np.arange(100) < acc
    for i, e in enumerate(eps):
        flags[cell_key(WORST_CASE, e)] = np.arange(100) < min(accs[i] for accs in table.values())
    return flags


EPS = [Fraction(0), Fraction(4, 255), Fraction(8, 255)]


def rows(table: dict[str, list[int]], warnings: dict[str, list[str]] | None = None) -> list[dict]:
    return [{"attack": a, "eps": str(e), "warnings": (warnings or {}).get(a, [])} for a in table for e in EPS]


def test_result_checks_pass_on_consistent_results():
    table = {"pgd-20": [80, 60, 40], "cw-inf": [80, 62, 41], "autoattack-standard": [80, 58, 37]}
    checks, skipped = result_checks(cells(80, table, EPS), list(table), EPS, rows(table))
    assert failed(checks) == set()
    assert {c.name for c in checks} >= {
        "monotone-in-eps",
        "adversarial-examples-verified",
        "autoattack-le-pgd20",
        "pgd20-autoattack-gap",
        "pgd20-cw-gap",
        "autoattack-warnings",
    }
    assert [s.name for s in skipped] == ["square-vs-white-box"] and skipped[0].needs == ("square",)


def test_pgd20_alone_lists_what_it_skips_and_which_attacks_would_run_it():
    table = {"pgd-20": [80, 60, 40]}
    _, skipped = result_checks(cells(80, table, EPS), list(table), EPS, rows(table))
    needs = {s.name: s.needs for s in skipped}
    assert needs["pgd20-autoattack-gap"] == ("autoattack-standard",)
    assert needs["square-vs-white-box"] == ("square",) and needs["autoattack-warnings"] == ("autoattack-standard",)


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"pgd-20": [80, 40, 45], "autoattack-standard": [80, 38, 37]}, "monotone-in-eps"),
        ({"pgd-20": [80, 60, 40], "autoattack-standard": [80, 65, 37]}, "autoattack-le-pgd20"),
        ({"pgd-20": [80, 60, 40], "autoattack-standard": [80, 30, 20]}, "pgd20-autoattack-gap"),
        ({"pgd-20": [80, 60, 40], "cw-inf": [80, 45, 40]}, "pgd20-cw-gap"),  # 15 points > the 10-point gap
    ],
)
def test_result_checks_trigger(table, expected):
    checks, _ = result_checks(cells(80, table, EPS), list(table), EPS, rows(table))
    assert expected in failed(checks)


def test_monotonicity_is_checked_on_the_raw_flags_not_the_nested_ones():
    table = {"pgd-20": [80, 40, 40]}
    flags = cells(80, table, EPS)
    flags[raw_key("pgd-20", EPS[2])] = np.arange(100) < 45  # the attack alone found fewer at 8/255
    checks, _ = result_checks(flags, ["pgd-20"], EPS, rows(table))
    assert "monotone-in-eps" in failed(checks)


def test_square_beating_white_box_is_flagged():
    table = {"pgd-20": [80, 60, 40], "square": [80, 50, 40]}
    checks, _ = result_checks(cells(80, table, EPS), list(table), EPS, rows(table))
    assert "square-vs-white-box" in failed(checks)


def test_autoattack_warnings_become_a_failed_check():
    table = {"pgd-20": [80, 60, 40], "autoattack-standard": [80, 58, 37]}
    checks, _ = result_checks(
        cells(80, table, EPS),
        list(table),
        EPS,
        rows(table, {"autoattack-standard": ["Square Attack has decreased the robust accuracy"]}),
    )
    assert "autoattack-warnings" in failed(checks)


def test_sweep_is_monotone_eps0_is_clean_and_flags_give_the_table(tiny, data, tmp_path):
    x, y = data
    eps_list = [Fraction(0), Fraction(2, 100), Fraction(5, 100), Fraction(8, 100)]
    options = AttackOptions(batch_size=64)
    attacks = [ATTACKS.get(n).build(options) for n in ("pgd-20", "cw-inf")]
    result = sweep(tiny, x, y, attacks, eps_list, store_for(tmp_path, len(y)), batch_size=64)
    assert failed(result.checks) == set()
    record = read_evaluation(tmp_path / "evaluation.json")
    flags = load_flags(tmp_path)
    assert record["status"] == "complete"
    for row in record["results"]:  # every number is recomputed from the saved flags
        assert row["robust_accuracy"] == pytest.approx(percent(flags[f"{row['attack']}@{row['eps']}"]))
        if row["attack"] != WORST_CASE:
            assert row["raw_robust_accuracy"] == pytest.approx(percent(flags[f"raw:{row['attack']}@{row['eps']}"]))
    worst = [percent(flags[cell_key(WORST_CASE, e)]) for e in eps_list]
    assert worst == sorted(worst, reverse=True) and worst[0] == record["clean_accuracy"]
    assert worst[-1] < worst[0]  # the attacks do something at the largest eps
    for e in eps_list:
        assert not np.any(flags[cell_key(WORST_CASE, e)] & ~flags[cell_key("pgd-20", e)])


class ModeProbe(nn.Module):
    """Identity that remembers the train/eval flag of every forward pass."""

    def __init__(self):
        super().__init__()
        self.seen: set[bool] = set()

    def forward(self, x):
        self.seen.add(self.training)
        return x


def test_sweep_attacks_in_eval_mode_and_restores_the_model(tiny, data, tmp_path):
    x, y = data
    probe = ModeProbe()
    model = nn.Sequential(probe, tiny).train()
    store = store_for(tmp_path, 64)
    attack = ATTACKS.get("cw-inf").build(AttackOptions(batch_size=64))
    try:
        sweep(model, x[:64], y[:64], [attack], [Fraction(5, 100)], store, batch_size=64)
        assert probe.seen == {False}
        assert model.training and tiny.training and all(p.requires_grad for p in model.parameters())
    finally:
        tiny.eval()

"""Gradient masking cannot pass silently: the two classic masked models are flagged by PGD-20 alone
(the README main job) and by the default attack set; nested balls, eps 0 and verified examples."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from evaluation_helpers import ScaledLogits, Shattered, store_for, template_data, train_tiny, train_tiny_at
from torch import nn

from harness.evaluation.attacks import ATTACKS, AttackOptions, AttackOutcome, AutoAttackEval, EvalAttack
from harness.evaluation.flags import WORST_CASE, cell_key, load_flags, read_evaluation
from harness.evaluation.masking import ProbeBudget, off_grid
from harness.evaluation.nesting import raw_key
from harness.evaluation.sweep import sweep

EPS = [Fraction(0), Fraction(4, 100), Fraction(6, 100), Fraction(9, 100)]


@pytest.fixture(scope="module")
def tiny():
    return train_tiny(steps=150)


@pytest.fixture(scope="module")
def data():
    return template_data(160, seed=3)


def failed(result) -> set[str]:
    return {c.name for c in result.checks if not c.passed}


def attacks(*names: str, **options) -> list[EvalAttack]:
    return [ATTACKS.get(n).build(AttackOptions(batch_size=200, **options)) for n in names]


def pgd20_sweep(model, data, tmp_path, **options):
    x, y = data
    return sweep(
        model,
        x,
        y,
        attacks("pgd-20", **options),
        EPS,
        store_for(tmp_path, len(y)),
        batch_size=200,
        rerun=lambda names: "harness eval T " + " ".join(f"-a {n}" for n in names),
    )


@pytest.fixture(scope="module")
def robust_tiny():
    return train_tiny_at()


@pytest.fixture(scope="module")
def data400():
    return template_data(400, seed=3)


def test_honest_model_passes_every_check_with_pgd20_alone(robust_tiny, data400, tmp_path):
    result = pgd20_sweep(robust_tiny, data400, tmp_path)
    assert failed(result) == set()
    ran = {c.name for c in result.checks}
    assert {"ce-gradients-not-vanishing", "square-probe", "more-steps", "pgd20-cw-gap", "gradient-ascends-loss"} <= ran
    skipped = {s["name"]: s for s in result.skipped}
    assert skipped["pgd20-autoattack-gap"]["command"] == "harness eval T -a pgd-20 -a autoattack-standard"
    assert read_evaluation(tmp_path / "evaluation.json")["checks_skipped"] == result.skipped


def test_saturated_cross_entropy_is_flagged_by_pgd20_alone(tiny, data, tmp_path):
    result = pgd20_sweep(ScaledLogits(tiny), data, tmp_path)
    assert {"ce-gradients-not-vanishing", "pgd20-cw-gap"} <= failed(result)
    assert read_evaluation(tmp_path / "evaluation.json")["flags"]  # the record says so too


def test_shattered_gradients_are_flagged_by_pgd20_alone(tiny, data, tmp_path):
    result = pgd20_sweep(Shattered(tiny), data, tmp_path)
    assert "square-probe" in failed(result)
    x, y = data  # PGD-20 really is fooled: the model is as robust as the honest one, PGD says 100%
    assert result.store.accuracy("pgd-20", EPS[-1]) == result.store.record["clean_accuracy"]


def test_probes_off_leaves_masking_unflagged(tiny, data, tmp_path):
    """The probes are what catches it (this is the measurement of the issue, kept as a control)."""
    x, y = data
    result = sweep(
        Shattered(tiny), x, y, attacks("pgd-20"), EPS, store_for(tmp_path, len(y)), batch_size=200, probes=None
    )
    assert failed(result) == set()


def test_pgd20_that_has_not_converged_is_flagged_without_an_escalation_budget(tiny, data, tmp_path):
    """An absolute step far below eps/4 (the TRADES scripts' 0.003 at a large eps) stops short."""
    x, y = data
    result = sweep(
        tiny,
        x,
        y,
        attacks("pgd-20", pgd_step="0.001"),
        EPS,
        store_for(tmp_path, len(y)),
        batch_size=200,
        probes=ProbeBudget(escalation=None, white_box=None),
    )
    assert "more-steps" in failed(result) and "escalations" not in result.store.record


@pytest.mark.parametrize("seed", range(5))
def test_honest_model_raises_no_alarm_under_any_attack_seed(robust_tiny, data400, tmp_path, seed):
    """Every probe draws its randomness from the attack seed: none may fail an honest model by luck."""
    assert failed(pgd20_sweep(robust_tiny, data400, tmp_path, seed=seed)) == set()


@pytest.mark.parametrize(
    "wrapper, expected",
    [(ScaledLogits, {"pgd20-autoattack-gap", "pgd20-cw-gap"}), (Shattered, {"pgd20-autoattack-gap"})],
)
def test_masked_models_are_flagged_by_the_default_attack_set(tiny, data, tmp_path, wrapper, expected):
    x, y = data[0][:16], data[1][:16]  # AutoAttack on a shattered model runs every attack on every point
    eps = [Fraction(0), Fraction(9, 100)]
    result = sweep(
        wrapper(tiny),
        x,
        y,
        attacks("pgd-20", "cw-inf", "autoattack-standard"),
        eps,
        store_for(tmp_path, len(y)),
        batch_size=200,
        probes=ProbeBudget(subset=16),
    )
    assert expected <= failed(result)


def test_probe_cost_is_bounded_by_the_subset(tiny, data, tmp_path, monkeypatch):
    """Each probe attacks at most `subset` points, at one eps, whatever n and the sweep."""
    from harness.evaluation import masking

    seen = []
    original = masking.QuickSquare.robust

    def spy(self, model, x, y, eps, candidates):
        seen.append((int(candidates.sum()), eps))  # the points attacked (all n are passed, for seeding)
        return original(self, model, x, y, eps, candidates)

    monkeypatch.setattr(masking.QuickSquare, "robust", spy)
    x, y = data
    sweep(
        Shattered(tiny),
        x,
        y,
        attacks("pgd-20"),
        EPS,
        store_for(tmp_path, len(y)),
        batch_size=200,
        probes=ProbeBudget(subset=17),
    )
    assert seen == [(17, off_grid(EPS[-1], 255))]  # Square queries off the data's 1/255 grid


# --------------------------------------------------------------------------- nested balls, eps 0


@dataclass(frozen=True)
class Scripted(EvalAttack):
    """Breaks the points listed per eps (with a real example: the point moved to another class's
    template is not available here, so it reports x itself and expects `verify` to object)."""

    name: str
    broken: dict
    calls: list

    def config(self):
        return {"kind": "scripted"}

    def robust(self, model, x, y, eps, candidates):
        self.calls.append(eps)
        robust = candidates.clone()
        robust[list(self.broken.get(eps, []))] = False
        return AttackOutcome(x.clone(), robust)


def test_nested_balls_combine_flags_and_keep_the_raw_ones(tiny, data, tmp_path):
    x, y = data
    a, b = Fraction(4, 100), Fraction(9, 100)
    attack = Scripted("scripted", {a: [0, 1, 2], b: [1, 2]}, [])  # point 0: broken at 4/100 only
    result = sweep(tiny, x, y, [attack], [Fraction(0), a, b], store_for(tmp_path, len(y)), batch_size=200, probes=None)
    flags = load_flags(tmp_path)
    clean = flags["clean"]
    assert not flags[cell_key("scripted", b)][0] and flags[raw_key("scripted", b)][0] == clean[0]
    assert np.array_equal(flags[cell_key(WORST_CASE, b)], flags[cell_key("scripted", b)])
    row = next(r for r in result.store.record["results"] if r["attack"] == "scripted" and r["eps"] == "9/100")
    assert row["raw_robust_accuracy"] > row["robust_accuracy"]
    assert attack.calls == [a, b]  # eps 0 is the clean pass: no attack call
    assert np.array_equal(flags[cell_key("scripted", Fraction(0))], clean)
    assert "monotone-in-eps" in failed(result)  # the raw flags did rise: the attack is inconsistent


def test_nested_balls_can_be_turned_off(tiny, data, tmp_path):
    x, y = data
    a, b = Fraction(4, 100), Fraction(9, 100)
    attack = Scripted("scripted", {a: [0, 1], b: [1]}, [])
    sweep(tiny, x, y, [attack], [a, b], store_for(tmp_path, len(y)), batch_size=200, nested=False, probes=None)
    flags = load_flags(tmp_path)
    assert flags[cell_key("scripted", b)][0] == flags["clean"][0] and raw_key("scripted", b) not in flags


def test_points_counted_broken_without_an_adversarial_example_fail_verification(tiny, data, tmp_path):
    x, y = data
    attack = Scripted("scripted", {Fraction(4, 100): [3, 4, 5]}, [])
    result = sweep(tiny, x, y, [attack], [Fraction(4, 100)], store_for(tmp_path, len(y)), batch_size=200, probes=None)
    assert "adversarial-examples-verified" in failed(result)
    detail = next(c.detail for c in result.checks if c.name == "adversarial-examples-verified")
    assert "still classified correctly" in detail


class BatchSizes(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.inner(x)


def test_autoattack_clean_pass_at_eps0_is_batched(tiny, data):
    x, y = data
    model = BatchSizes(tiny)
    outcome = AutoAttackEval("autoattack-standard", "standard", 0, 50, None).robust(
        model, x, y, Fraction(0), torch.ones(len(y), dtype=torch.bool)
    )
    assert max(model.sizes) == 50 and sum(model.sizes) == len(y)
    assert torch.equal(outcome.robust, tiny(x).argmax(1) == y)


def test_nested_balls_and_over_every_smaller_eps_not_only_the_previous(tiny, data, tmp_path):
    """Broken at eps1, not at eps2: the point stays broken at eps3 (eps1's ball lies inside eps3's)."""
    x, y = data
    a, b, c = Fraction(2, 100), Fraction(4, 100), Fraction(6, 100)
    with torch.no_grad():
        point = int((tiny(x).argmax(1) == y).nonzero()[0])
    attack = Scripted("scripted", {a: [point]}, [])  # raw: broken at 2/100, robust at 4/100 and 6/100
    sweep(tiny, x, y, [attack], [a, b, c], store_for(tmp_path, len(y)), batch_size=200, probes=None)
    flags = load_flags(tmp_path)
    assert flags[raw_key("scripted", c)][point]
    assert not flags[cell_key("scripted", b)][point]
    assert not flags[cell_key("scripted", c)][point]


class SaturatedOnSome(nn.Module):
    """Two pixels: class 0 wins where the first is above 0.5; the second scales the logits by up to
    10^4, so where it is 1 the softmax saturates and the CE gradient is exactly zero."""

    def forward(self, x):
        v, s = x.flatten(1)[:, :1], x.flatten(1)[:, 1:2]
        z = (1 + 1e4 * s) * (2 * v - 1)
        return torch.cat([z, -z], 1)


def test_vanishing_ce_counts_clean_correct_points_only(tmp_path):
    """50% clean accuracy, 12 of the 128 correct probe points saturated: 9.4% of the correct points,
    4.7% of all, so only the count over correct points (what the check says it measures) fails it."""
    from harness.evaluation.sweep import PROBE_SIZE

    n = 256
    assert PROBE_SIZE >= n  # every point is a probe point
    x = torch.zeros(n, 1, 1, 2)
    x[: n // 2, ..., 0] = 0.9  # correct (label 0); the rest are misclassified with a live gradient
    x[:12, ..., 1] = 1.0  # saturated
    y = torch.zeros(n, dtype=torch.long)
    result = pgd20_sweep(SaturatedOnSome(), (x, y), tmp_path)
    check = next(c for c in result.checks if c.name == "ce-gradients-not-vanishing")
    assert not check.passed and "of 128 clean-correct" in check.detail, check.detail


def test_step_count_probe_starts_each_point_where_pgd20_started(tiny, data, tmp_path, monkeypatch):
    """PGD-100 must measure steps alone: a point's random start equals the sweep's PGD-20 start, so
    what PGD-100 breaks is not a second restart in disguise."""
    from harness.evaluation import attacks as attacks_module

    starts: dict[int, dict[bytes, torch.Tensor]] = {20: {}, 100: {}}
    original = attacks_module.pgd_until_fooled

    def spy(model, x, y, eps, *, steps, delta_init, **kwargs):
        for point, delta, e in zip(x, delta_init, eps):
            if steps in starts and float(e) > 0:
                starts[steps].setdefault(point.numpy().tobytes(), delta / e)  # escalation rounds restart
        return original(model, x, y, eps, steps=steps, delta_init=delta_init, **kwargs)

    monkeypatch.setattr(attacks_module, "pgd_until_fooled", spy)
    x, y = data
    result = sweep(
        tiny, x, y, attacks("pgd-20"), [Fraction(0), Fraction(6, 100)], store_for(tmp_path, len(y)), batch_size=200
    )
    assert "more-steps" in {c.name for c in result.checks}
    assert len(starts[100]) > 5
    for point, start in starts[100].items():
        assert torch.equal(start, starts[20][point])

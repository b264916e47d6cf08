"""Cross-checks of the evaluation attacks against torchattacks and the AutoAttack package itself."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from evaluation_helpers import template_data, train_tiny
from torch import nn

from harness.core.errors import HarnessError
from harness.core.pgd import frozen_parameters, model_mode, pgd
from harness.evaluation.attacks import (
    APGDAttack,
    AutoAttackEval,
    PGDAttack,
    QuickSquare,
    cw_margin_loss,
    run_autoattack,
)


@pytest.fixture(scope="module")
def tiny():
    return train_tiny(steps=150)


@pytest.fixture(scope="module")
def test_set():
    return template_data(300, seed=2)


def accuracy(flags: torch.Tensor) -> float:
    return flags.float().mean().item() * 100


def torchattacks_pgd_accuracy(model, x, y, eps: float, steps: int, seed: int) -> float:
    import torchattacks

    torch.manual_seed(seed)
    x_adv = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)(x, y)
    with torch.no_grad():
        return accuracy(model(x_adv).argmax(1) == y)


def our_pgd(model, x, y, eps, steps=20, seed=0, restarts=1):
    with model_mode(model, "eval"), frozen_parameters(model):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        attack = PGDAttack("pgd", steps=steps, loss="ce", restarts=restarts, step="eps/4", seed=seed, batch_size=128)
        return attack.robust(model, x, y, eps, clean)


def intermediate_eps(model, x, y) -> float:
    """An eps at which torchattacks' PGD-20 leaves between 20% and 80% accuracy (a test that can fail)."""
    for eps in (0.04, 0.05, 0.06, 0.07, 0.08):
        if 20 <= torchattacks_pgd_accuracy(model, x, y, eps, 20, seed=0) <= 80:
            return eps
    pytest.fail("no eps with intermediate robustness; the tiny model changed")


def test_pgd_matches_torchattacks_within_one_point(tiny, test_set):
    x, y = test_set
    eps = intermediate_eps(tiny, x, y)
    theirs = torchattacks_pgd_accuracy(tiny, x, y, eps, 20, seed=0)
    ours = accuracy(our_pgd(tiny, x, y, eps, seed=0).robust)
    assert abs(ours - theirs) <= 1.0, (ours, theirs)


def test_any_iterate_counting_is_at_least_as_strong_as_the_last_iterate(tiny, test_set):
    x, y = test_set
    eps = intermediate_eps(tiny, x, y)
    outcome = our_pgd(tiny, x, y, eps, seed=0)
    torch.manual_seed(0)
    start = (torch.rand_like(x) * 2 - 1) * eps
    last_iterate = pgd(tiny, x, y, eps, steps=20, step_size=eps / 4, delta_init=start)
    with torch.no_grad():
        plain = accuracy(tiny(last_iterate).argmax(1) == y)
    assert accuracy(outcome.robust) <= plain
    # the returned points are valid adversarial examples: in the ball, in [0, 1], and they fool the model
    assert (outcome.x_adv - x).abs().max() <= eps + 1e-6 and outcome.x_adv.min() >= 0 and outcome.x_adv.max() <= 1
    broken = ~outcome.robust & (tiny(x).argmax(1) == y)
    with torch.no_grad():
        assert (tiny(outcome.x_adv[broken]).argmax(1) != y[broken]).all()


def test_restarts_never_raise_accuracy(tiny, test_set):
    x, y = test_set
    eps = intermediate_eps(tiny, x, y)
    one = our_pgd(tiny, x, y, eps, steps=5, restarts=1).robust
    three = our_pgd(tiny, x, y, eps, steps=5, restarts=3).robust
    assert not (three & ~one).any() and accuracy(three) <= accuracy(one)


def test_per_sample_eps_zero_leaves_points_untouched(tiny, test_set):
    x, y = test_set
    eps = torch.where(torch.arange(len(y)) % 2 == 0, 0.0, 0.08)
    outcome = our_pgd(tiny, x, y, eps)
    assert torch.equal(outcome.x_adv[::2], x[::2])
    assert (outcome.x_adv[1::2] - x[1::2]).abs().max() <= 0.08 + 1e-6


def test_cw_margin_loss_is_the_clamped_margin():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 0])
    loss = cw_margin_loss(50)(logits, y)
    assert torch.allclose(loss, torch.tensor([-(3 - 2 + 50.0), -(0 - 5 + 50.0)]))
    assert torch.equal(cw_margin_loss(0)(logits, y), torch.tensor([-1.0, 0.0]))


def direct_autoattack_flags(model, x, y, eps, attacks, batch_size, state_path=None):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, attacks=list(attacks), device="cpu", eps=eps, seed=0, version="custom")
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    return y_adv == y


def ours_autoattack(model, x, y, eps, attacks, batch_size, state_dir=None):
    with model_mode(model, "eval"), frozen_parameters(model):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        attack = AutoAttackEval("autoattack-custom", "custom", 0, batch_size, tuple(attacks), state_dir)
        return attack.robust(model, x, y, Fraction(round(eps * 100), 100), clean).robust


def test_autoattack_flags_equal_a_direct_call(tiny, test_set):
    x, y = test_set[0][:60], test_set[1][:60]
    eps = 0.07
    direct = direct_autoattack_flags(tiny, x, y, eps, ["apgd-ce", "apgd-t"], batch_size=32)
    ours = ours_autoattack(tiny, x, y, eps, ["apgd-ce", "apgd-t"], batch_size=32)
    assert 0 < accuracy(direct) < 100  # the comparison means something
    assert torch.equal(ours, direct)


def test_autoattack_resumes_from_its_own_state_file(tiny, test_set, tmp_path):
    """Interrupted after APGD-CE: continuing gives exactly the uninterrupted run's flags."""
    from pyautoattack.state import EvaluationState

    from harness.evaluation.attacks import read_autoattack_state

    x, y = test_set[0][:60], test_set[1][:60]
    eps, attacks = 0.07, ["apgd-ce", "apgd-t"]
    full = direct_autoattack_flags(tiny, x, y, eps, attacks, batch_size=32)
    after_ce = direct_autoattack_flags(tiny, x, y, eps, ["apgd-ce"], batch_size=32)
    attack = AutoAttackEval("autoattack-custom", "custom", 0, 32, tuple(attacks), tmp_path)
    state_path = attack.state_path(Fraction(7, 100))
    state = EvaluationState(set(attacks), path=state_path)
    state.robust_flags = after_ce.clone()
    state.clean_accuracy = 1.0
    state.add_run_attack("apgd-ce")
    state.to_disk(force=True)
    resumed = ours_autoattack(tiny, x, y, eps, attacks, batch_size=32, state_dir=tmp_path)
    assert torch.equal(resumed, full)
    assert read_autoattack_state(state_path).run_attacks == set(attacks)
    # a state file of another attack list is refused, not silently mixed in
    with pytest.raises(Exception, match="another AutoAttack configuration"):
        from pyautoattack import AutoAttack

        run_autoattack(
            AutoAttack(tiny, attacks=["apgd-ce"], device="cpu", eps=eps, seed=0, version="custom"),
            x,
            y,
            batch_size=32,
            state_path=state_path,
        )


class Band(nn.Module):
    """One pixel; class 1 wins only within 0.005 of 0.52. Signed steps of eps/4 = 0.025 around 0.52
    oscillate between two points, and some iterate lands in the band though the last may not."""

    def forward(self, x):
        z1 = 1 - (x.flatten(1)[:, :1] - 0.52).abs() / 0.005
        return torch.cat([torch.zeros_like(z1), z1], 1)


def test_a_point_counts_as_broken_when_any_iterate_fools_not_only_the_last():
    x, y = torch.full((400, 1, 1, 1), 0.5), torch.zeros(400, dtype=torch.long)
    model = Band()
    ours = our_pgd(model, x, y, 0.1, steps=20, seed=0).robust
    torch.manual_seed(0)
    start = (torch.rand_like(x) * 2 - 1) * 0.1  # the same start as ours (one restart, seed 0)
    last = pgd(model, x, y, 0.1, steps=20, step_size=0.025, delta_init=start)
    with torch.no_grad():
        last_robust = model(last).argmax(1) == y
    assert not (ours & ~last_robust).any()
    assert accuracy(ours) < accuracy(last_robust) - 5, (accuracy(ours), accuracy(last_robust))


def test_every_restart_draws_a_new_random_start(tiny, test_set, monkeypatch):
    from harness.evaluation import attacks

    starts = []
    original = attacks.pgd_until_fooled

    def spy(model, x, y, eps, **kwargs):
        starts.append((x.clone(), kwargs["delta_init"].clone()))
        return original(model, x, y, eps, **kwargs)

    monkeypatch.setattr(attacks, "pgd_until_fooled", spy)
    x, y = test_set
    eps = 0.05
    one = our_pgd(tiny, x, y, eps, steps=2, restarts=1).robust
    starts.clear()
    robust = our_pgd(tiny, x, y, eps, steps=2, restarts=3).robust
    by_point: dict[bytes, list[torch.Tensor]] = {}  # every start each point got, over restarts and batches
    for xs, deltas in starts:
        for point, delta in zip(xs, deltas):
            by_point.setdefault(point.numpy().tobytes(), []).append(delta)
    repeated = [d for d in by_point.values() if len(d) > 1]
    assert repeated and all(not torch.equal(d[0], d[1]) for d in repeated)
    assert (robust <= one).all()


class Threshold(nn.Module):
    """One pixel, linear: class 1 wins above 0.5."""

    def forward(self, x):
        z = x.flatten(1)[:, :1] - 0.5
        return torch.cat([torch.zeros_like(z), z], 1)


def test_the_final_iterate_is_checked_one_step_that_crosses_the_boundary_breaks_the_point():
    from harness.core.pgd import pgd_until_fooled

    x, y = torch.full((8, 1, 1, 1), 0.45), torch.zeros(8, dtype=torch.long)
    x_adv, fooled = pgd_until_fooled(Threshold(), x, y, 0.1, steps=1, step_size=0.1, random_start=False)
    assert fooled.all() and bool((x_adv > 0.5).all())
    # the evaluation attack (random start in [0.35, 0.55], steps of eps/4 = 0.025): PGD-7 ends past 0.5
    # from every start; from a start below 0.375 only its final iterate does
    x, y = torch.full((400, 1, 1, 1), 0.45), torch.zeros(400, dtype=torch.long)
    assert not our_pgd(Threshold(), x, y, 0.1, steps=7).robust.any()


def test_resumed_autoattack_attacks_only_the_points_its_state_file_lists_as_robust(tiny, test_set, tmp_path):
    """What the state file says an earlier attack broke stays broken: the remaining attacks run on the
    points still robust only. Points the whole attack list cannot break are listed as broken in the
    state file here, so re-attacking every point would bring them back as robust."""
    from pyautoattack.state import EvaluationState

    x, y = test_set[0][:60], test_set[1][:60]
    eps, attacks = 0.07, ["apgd-ce", "apgd-t"]
    full = direct_autoattack_flags(tiny, x, y, eps, attacks, batch_size=32)
    listed_broken = full.nonzero().squeeze(1)[:5]
    assert len(listed_broken) == 5
    state_flags = full.clone()
    state_flags[listed_broken] = False
    attack = AutoAttackEval("autoattack-custom", "custom", 0, 32, tuple(attacks), tmp_path)
    state = EvaluationState(set(attacks), path=attack.state_path(Fraction(7, 100)))
    state.robust_flags = state_flags
    state.clean_accuracy = 1.0
    state.add_run_attack("apgd-ce")
    state.to_disk(force=True)
    resumed = ours_autoattack(tiny, x, y, eps, attacks, batch_size=32, state_dir=tmp_path)
    assert not resumed[listed_broken].any()
    assert torch.equal(resumed, state_flags)


@pytest.mark.parametrize(
    "attack",
    [
        PGDAttack("pgd", steps=3, loss="ce", restarts=2, step="eps/4", seed=5, batch_size=32),
        QuickSquare("square", queries=20, seed=5, batch_size=32),
        APGDAttack("apgd-ce", targeted=False, iterations=3, seed=5, batch_size=32),
        APGDAttack("apgd-t", targeted=True, iterations=2, seed=5, batch_size=32, target_classes=2),
    ],
    ids=lambda a: a.name,
)
def test_an_attack_leaves_the_callers_random_state_as_it_found_it(tiny, test_set, attack):
    """Attacks reseed torch's generator (pyautoattack's do so themselves); an evaluation must not shift the
    randomness of whatever runs after it, e.g. the next attack's start or a training run in the same process."""
    x, y = test_set
    x, y = x[:40], y[:40]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with model_mode(tiny, "eval"), frozen_parameters(tiny):
        outcome = attack.robust(tiny, x, y, Fraction(8, 255), torch.ones_like(y, dtype=torch.bool))
    assert outcome.robust.shape == y.shape
    assert torch.equal(torch.rand(3), expected_next)


@pytest.mark.parametrize(
    "attack",
    [
        QuickSquare("square", queries=5, seed=0, batch_size=8),
        APGDAttack("apgd-ce", targeted=False, iterations=2, seed=0, batch_size=8),
    ],
    ids=lambda a: a.name,
)
def test_pyautoattack_attacks_refuse_a_per_sample_eps_in_one_line(tiny, test_set, attack):
    x, y = test_set
    with pytest.raises(HarnessError, match="one eps for all points"):
        attack.robust(tiny, x[:4], y[:4], torch.full((4,), 8 / 255), torch.ones(4, dtype=torch.bool))

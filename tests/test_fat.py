"""FAT: an example stops being attacked tau steps after it is first misclassified; tau follows a
schedule expressed in fractions of the run."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from harness.core.defense import DefenseContext
from harness.core.errors import HarnessError
from harness.core.pgd import pgd
from harness.training.specs import make_spec
from methods.fat import FAT, EarlyStop, FATConfig

STEP = 0.01
K = 10
# Example i is first misclassified after FIRST_WRONG[i] steps (0: already at the clean input;
# 20: never within K steps).
FIRST_WRONG = [0, 1, 3, 6, 20]


def threshold_model() -> nn.Module:
    """Two classes; class 1 wins once the pixel sum of a 2x2 image exceeds 2. Every PGD step on the
    true class 0 adds STEP to each of the 4 pixels, so the step at which each example crosses is known."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        linear.bias.copy_(torch.tensor([0.0, -2.0]))
    return nn.Sequential(nn.Flatten(), linear)


def crossing_batch() -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([0.505 - STEP * k for k in FIRST_WRONG])
    return values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), torch.zeros(len(FIRST_WRONG), dtype=torch.long)


def steps_moved(x_adv: torch.Tensor, x: torch.Tensor) -> list[int]:
    return ((x_adv - x).flatten(1).mean(1) / STEP).round().long().tolist()


@pytest.mark.parametrize("tau", [0, 1, 2, 4])
def test_example_stops_tau_steps_after_first_misclassified(tau):
    model, (x, y) = threshold_model(), crossing_batch()
    stopper = EarlyStop(y, tau)
    x_adv = pgd(model, x, y, 0.5, steps=K, step_size=STEP, random_start=False, keep_stepping=stopper)
    expected = [min(k + tau, K) for k in FIRST_WRONG]
    assert steps_moved(x_adv, x) == expected
    assert stopper.steps_taken.tolist() == expected
    assert stopper.stopped.tolist() == [k + tau < K for k in FIRST_WRONG]


def test_without_early_stopping_every_example_takes_all_steps():
    model, (x, y) = threshold_model(), crossing_batch()
    x_adv = pgd(model, x, y, 0.5, steps=K, step_size=STEP, random_start=False)
    assert steps_moved(x_adv, x) == [K] * len(FIRST_WRONG)


def test_countdown_pauses_while_the_example_is_classified_correctly_again():
    """The reference spends budget only on misclassified checks: wrong, right, wrong with tau = 1 stops
    at the second wrong check."""
    y = torch.tensor([0])
    wrong, right = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    stopper = EarlyStop(y, tau=1)
    assert [bool(stopper(z, y)) for z in (wrong, right, wrong, right)] == [True, True, False, False]


def make_fat(info, epochs=10, **overrides):
    ctx = DefenseContext(eps=Fraction(1, 2), dataset=info, train_size=5, epochs=epochs, device=torch.device("cpu"))
    return FAT(FATConfig(**overrides), ctx)


def test_defense_uses_the_tau_of_the_epoch(synthetic_info):
    from harness.core.datasets import Batch

    model, (x, y) = threshold_model(), crossing_batch()
    fat = make_fat(synthetic_info, epochs=12, steps=K, step_size_rel=STEP / 0.5, omega=0.0, random_start=False)
    for epoch, tau in ((0, 0), (5, 1), (9, 2)):
        fat.start_epoch(epoch)
        x_adv = fat.perturb(model, Batch(x, y, torch.arange(len(y)))).x_adv
        assert steps_moved(x_adv, x) == [min(k + tau, K) for k in FIRST_WRONG]
        assert fat.end_epoch(epoch)["tau"] == tau


def test_tau_schedule_scales_with_the_run_and_is_recorded(synthetic_info):
    cfg = FATConfig()
    assert [cfg.tau_at(e, 120) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    assert [cfg.tau_at(e, 12) for e in range(12)] == [0] * 5 + [1] * 4 + [2] * 3
    assert cfg.tau_at(0, 1) == 0
    assert make_fat(synthetic_info, epochs=120).record()["tau_schedule"] == [
        {"from_epoch": 1, "tau": 0},
        {"from_epoch": 51, "tau": 1},
        {"from_epoch": 91, "tau": 2},
    ]
    assert make_fat(synthetic_info, epochs=3).record()["tau_schedule"] == [
        {"from_epoch": 1, "tau": 0},
        {"from_epoch": 3, "tau": 1},
        {"from_epoch": 4, "tau": 2},
    ]


def test_fixed_tau_via_overrides():
    spec = make_spec("fat", "synthetic", "smoke", overrides=("taus=1", "tau_milestones="))
    assert spec.defense_config.taus == (1,) and spec.defense_config.tau_milestones == ()
    assert spec.defense_config.tau_at(7, 10) == 1


@pytest.mark.parametrize(
    "overrides", [("taus=0,1",), ("tau_milestones=0.9,0.5", "taus=0,1,2"), ("taus=-1,0,1",), ("steps=0",)]
)
def test_bad_hyperparameters_are_refused(overrides):
    with pytest.raises(HarnessError):
        make_spec("fat", "synthetic", "smoke", overrides=overrides)


def test_keep_stepping_refuses_a_precomputed_first_gradient():
    model, (x, y) = threshold_model(), crossing_batch()
    with pytest.raises(ValueError):
        pgd(model, x, y, 0.5, steps=2, step_size=STEP, keep_stepping=EarlyStop(y, 0), first_grad=torch.zeros_like(x))

"""IAAT: eps rises for examples that stay robust, holds, falls for those that do not, zero when misclassified."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from harness.core.datasets import DATASETS, Batch
from harness.core.defense import DefenseContext
from methods.iaat import IAAT, IAATConfig

EPS = Fraction(1, 10)


def threshold_model(k: float = 50.0) -> nn.Module:
    """Two logits (0, k * (x[0] - 1/2)): class 1 iff the first pixel exceeds 1/2, so an example's
    L-inf margin is exactly its first pixel's distance from 1/2."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0] = k
        model[1].bias.copy_(torch.tensor([0.0, -k / 2]))
    return model


def iaat(epochs: int = 10, **overrides) -> IAAT:
    ctx = DefenseContext(
        eps=EPS, dataset=DATASETS.get("fashion-mnist"), train_size=8, epochs=epochs, device=torch.device("cpu")
    )
    defense = IAAT(IAATConfig(**overrides), ctx)
    defense.setup(None)
    return defense


def batch_with_margins(first_pixel: list[float]) -> Batch:
    n = len(first_pixel)
    x = torch.full((n, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor(first_pixel)
    return Batch(x, torch.ones(n, dtype=torch.long), torch.arange(n))


def train_once(defense: IAAT, model: nn.Module, batch: Batch) -> torch.Tensor:
    defense.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch)  # lr 0: eps only
    return defense.eps_state[batch.index].clone()


def test_eps_moves_with_robustness_after_warmup():
    torch.manual_seed(0)
    defense, model = iaat(), threshold_model()
    prev, gamma, beta = 0.05, defense.gamma, defense.config.beta
    # margins: far beyond prev + gamma | between prev and prev + gamma | below prev | misclassified
    batch = batch_with_margins([0.5 + 0.2, 0.5 + 0.06, 0.5 + 0.03, 0.4])
    assert prev < 0.06 < prev + gamma
    defense.eps_state[:] = prev
    defense.start_epoch(defense.warmup_epochs)
    eps = train_once(defense, model, batch)
    expected = torch.tensor(
        [beta * (prev + gamma) + (1 - beta) * prev, prev, beta * (prev - gamma) + (1 - beta) * prev, (1 - beta) * prev]
    )
    assert torch.allclose(eps, expected, atol=1e-7)
    assert eps[0] > prev and eps[2] < prev and eps[3] < eps[2]


def test_misclassified_examples_get_zero():
    torch.manual_seed(0)
    batch = batch_with_margins([0.5 + 0.2, 0.4])
    defense, model = iaat(), threshold_model()
    defense.start_epoch(0)  # warm-up: eps for correct examples, 0 for the rest
    assert defense.in_warmup
    assert torch.allclose(train_once(defense, model, batch), torch.tensor([float(EPS), 0.0]))
    unsmoothed = iaat(beta=1.0)  # after warm-up the proposal for a misclassified example is 0
    unsmoothed.eps_state[:] = 0.05
    unsmoothed.start_epoch(unsmoothed.warmup_epochs)
    eps = train_once(unsmoothed, model, batch)
    assert eps[1] == 0 and eps[0] > 0.05


@pytest.mark.parametrize("epochs, warmup", [(110, 10), (100, 9), (3, 1), (1, 1)])
def test_warmup_scales_with_the_run(epochs, warmup):
    defense = iaat(epochs=epochs)
    assert defense.warmup_epochs == warmup
    assert defense.record()["warmup_epochs"] == warmup

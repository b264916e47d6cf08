"""MART: the KL term is weighted per example by 1 - p_y(x), and the boosted CE targets the strongest
wrong class on x'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.core.errors import HarnessError
from harness.training.specs import make_spec
from methods.mart import MART, mart_loss, misclassification_weight, strongest_wrong_class


def logits_with_true_probability(p_true: list[float], y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Logits whose softmax gives p_true[i] to class y[i] and spreads the rest evenly."""
    p = torch.tensor(p_true)[:, None]
    probs = ((1 - p) / (classes - 1)).repeat(1, classes)
    probs.scatter_(1, y[:, None], p)
    return probs.log()


def test_kl_weight_is_per_example():
    """Per example: sum_i KL_i * (1 - p_y_i) / B, which is not mean(KL) * mean(1 - p_y)."""
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 3])
    clean = logits_with_true_probability([0.999, 0.9, 0.5, 0.05], y)
    adv = torch.randn(4, 10) * 2
    clean_p = F.softmax(clean, 1)
    kl = (clean_p * (clean_p.log() - F.softmax(adv, 1).log())).sum(1)
    weight = 1 - clean_p[torch.arange(4), y]
    assert torch.allclose(weight, torch.tensor([0.001, 0.1, 0.5, 0.95]), atol=1e-5)

    loss = mart_loss(clean, adv, y, beta=1.0)

    assert torch.allclose(loss.weighted_kl, (kl * weight).mean(), atol=1e-5)
    assert not torch.allclose(loss.weighted_kl, kl.mean() * weight.mean(), rtol=0.05)


def test_confidently_correct_examples_barely_enter_the_kl_term():
    """Changing x' of an example with p_y(x) ~ 1 leaves the KL term unchanged; of a misclassified one, not."""
    torch.manual_seed(1)
    y = torch.tensor([0, 1])
    clean = logits_with_true_probability([1 - 1e-6, 0.02], y)
    adv = torch.randn(2, 10)
    base = mart_loss(clean, adv, y, beta=1.0).weighted_kl
    moved_confident, moved_wrong = adv.clone(), adv.clone()
    moved_confident[0] += torch.randn(10) * 5
    moved_wrong[1] += torch.randn(10) * 5
    assert torch.allclose(mart_loss(clean, moved_confident, y, 1.0).weighted_kl, base, atol=1e-4)
    assert not torch.allclose(mart_loss(clean, moved_wrong, y, 1.0).weighted_kl, base, atol=1e-2)


def test_weight_carries_gradient_to_the_clean_output():
    """As in the reference the weight 1 - p_y(x) is not detached."""
    y = torch.tensor([0])
    clean = torch.zeros(1, 10, requires_grad=True)
    (grad,) = torch.autograd.grad(misclassification_weight(clean, y).sum(), clean)
    assert grad[0, 0] < 0 and (grad[0, 1:] > 0).all()


def test_boosted_ce_targets_the_strongest_wrong_class():
    y = torch.tensor([0, 0])
    adv = torch.tensor([[5.0, 1.0, 3.0, 0.0], [1.0, 4.0, 2.0, 0.0]])
    assert strongest_wrong_class(adv, y).tolist() == [2, 1]
    adv_p = F.softmax(adv, 1)
    expected = F.cross_entropy(adv, y) - torch.log(1.0001 - adv_p[[0, 1], [2, 1]] + 1e-12).mean()
    assert torch.allclose(mart_loss(adv, adv, y, beta=6.0).boosted_ce, expected, atol=1e-6)


def test_beta_scales_only_the_weighted_kl():
    torch.manual_seed(2)
    clean, adv, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    one, six = mart_loss(clean, adv, y, 1.0), mart_loss(clean, adv, y, 6.0)
    assert torch.allclose(six.total - one.total, 5 * one.weighted_kl, atol=1e-5)


@pytest.mark.parametrize("override", ["beta=-1", "steps=0", "step_size_rel=0"])
def test_bad_hyperparameters_are_refused(override):
    with pytest.raises(HarnessError):
        make_spec("mart", "synthetic", "smoke", overrides=(override,))


def test_reference_schedule_is_the_authors():
    sched = MART.reference_schedule
    assert (sched.epochs, sched.lr, sched.weight_decay, sched.batch_size) == (90, 0.1, 7e-4, 128)
    assert [sched.lr_at(e) for e in (73, 74, 88, 89)] == pytest.approx([0.1, 0.01, 0.01, 0.001])

"""TRADES: the loss reduces to clean training at beta = 0, its KL is per example ('batchmean'), and the
attack computes the clean logits once per batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.core.defense import DefenseContext
from harness.core.errors import HarnessError
from harness.training.specs import make_spec
from methods.trades import TRADES, TRADESConfig, kl_per_example, trades_loss


def make_trades(info, **overrides):
    ctx = DefenseContext(eps=info.eps, dataset=info, train_size=600, epochs=10, device=torch.device("cpu"))
    return TRADES(TRADESConfig(**overrides), ctx)


def test_beta_zero_is_clean_training(trained_model, train_batch, synthetic_info):
    """With beta = 0 a TRADES step moves the weights exactly as a clean cross-entropy step does."""
    trades_model, clean_model = trained_model, copy.deepcopy(trained_model)
    trades_opt = torch.optim.SGD(trades_model.parameters(), lr=0.1, momentum=0.9)
    clean_opt = torch.optim.SGD(clean_model.parameters(), lr=0.1, momentum=0.9)

    stats = make_trades(synthetic_info, beta=0.0).train_step(trades_model, trades_opt, train_batch)

    clean_model.train()
    clean_loss = F.cross_entropy(clean_model(train_batch.x), train_batch.y)
    clean_opt.zero_grad()
    clean_loss.backward()
    clean_opt.step()

    assert torch.allclose(stats["loss"], clean_loss.detach(), atol=1e-6)
    assert float(stats["kl"]) > 0  # the adversarial term exists; beta = 0 only switches it off
    for p_trades, p_clean in zip(trades_model.parameters(), clean_model.parameters()):
        assert torch.allclose(p_trades, p_clean, atol=1e-6)


def test_kl_reduction_is_per_example_batchmean():
    torch.manual_seed(0)
    batch, classes = 8, 10
    clean, adv = torch.randn(batch, classes) * 3, torch.randn(batch, classes) * 3
    y = torch.randint(0, classes, (batch,))
    p, log_p, log_q = F.softmax(clean, 1), F.log_softmax(clean, 1), F.log_softmax(adv, 1)
    per_example = torch.stack(
        [sum(p[i, c] * (log_p[i, c] - log_q[i, c]) for c in range(classes)) for i in range(batch)]
    )

    loss = trades_loss(clean, adv, y, beta=1.0)

    assert torch.allclose(kl_per_example(clean, adv), per_example, atol=1e-6)
    assert torch.allclose(loss.robust, per_example.mean(), atol=1e-6)
    assert torch.allclose(loss.robust, F.kl_div(log_q, p, reduction="batchmean"), atol=1e-6)
    elementwise_mean = (p * (log_p - log_q)).mean()  # PyTorch's 'mean': the silent beta / classes pitfall
    assert not torch.allclose(loss.robust, elementwise_mean, rtol=0.5)
    assert torch.allclose(loss.total, F.cross_entropy(clean, y) + per_example.mean(), atol=1e-6)


def test_beta_scales_only_the_kl_term():
    torch.manual_seed(1)
    clean, adv, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    one, six = trades_loss(clean, adv, y, 1.0), trades_loss(clean, adv, y, 6.0)
    assert torch.allclose(six.total - one.total, 5 * one.robust, atol=1e-6)


class ForwardLog(torch.nn.Module):
    """Wraps a model and remembers the inputs and BatchNorm mode of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def forward(self, x):
        self.calls.append((x.detach().clone(), self.training))
        return self.model(x)


def test_clean_logits_computed_once_per_batch(trained_model, train_batch, synthetic_info):
    defense = make_trades(synthetic_info)
    logged = ForwardLog(trained_model)
    defense.perturb(logged, train_batch)
    clean_calls = [c for c in logged.calls if torch.equal(c[0], train_batch.x)]
    assert len(logged.calls) == defense.config.steps + 1  # one clean forward, then one per step
    assert len(clean_calls) == 1 and clean_calls[0][1] is False  # clean target computed in eval mode
    assert all(not training for _, training in logged.calls)

    logged.calls.clear()
    defense.train_step(logged, torch.optim.SGD(logged.parameters(), lr=0.01), train_batch)
    clean_modes = [training for x, training in logged.calls if torch.equal(x, train_batch.x)]
    assert clean_modes == [False, True]  # the attack's target (eval) and the loss's f(x) (train), once each


def test_attack_raises_the_kl_from_its_start(trained_model, train_batch, synthetic_info):
    defense = make_trades(synthetic_info)
    torch.manual_seed(0)
    x_adv = defense.perturb(trained_model, train_batch).x_adv
    trained_model.eval()
    with torch.no_grad():
        clean = trained_model(train_batch.x)
        start = train_batch.x + 0.001 * torch.randn_like(train_batch.x)
        kl_start = kl_per_example(clean, trained_model(start.clamp(0, 1))).mean()
        kl_adv = kl_per_example(clean, trained_model(x_adv)).mean()
    assert kl_adv > 10 * kl_start


@pytest.mark.parametrize("override", ["beta=-1", "init_noise=0", "steps=0"])
def test_bad_hyperparameters_are_refused(override):
    with pytest.raises(HarnessError):
        make_spec("trades", "synthetic", "smoke", overrides=(override,))


def test_reference_schedule_is_the_authors():
    sched = TRADES.reference_schedule
    assert (sched.epochs, sched.lr, sched.weight_decay, sched.batch_size) == (76, 0.1, 2e-4, 128)
    assert sched.lr_at(73.99) == pytest.approx(0.1) and sched.lr_at(74.0) == pytest.approx(0.01)

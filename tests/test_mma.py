"""MMA: the bisection recovers a known margin; the per-example eps survives an interrupted run's resume."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from harness.core.datasets import DATASETS
from harness.core.defense import DefenseContext
from harness.storage.atomic import load_torch
from harness.training.runner import run
from harness.training.specs import make_spec
from methods.mma import MMA, MMAConfig, soft_logit_margin


def two_logit_linear(w: torch.Tensor, b: float) -> nn.Module:
    """Logits (0, w.x + b): a binary linear classifier whose soft logit margin is exactly -/+(w.x + b)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = w
        model[1].bias.copy_(torch.tensor([0.0, b]))
    return model


def mma_for(eps: Fraction, train_size: int = 64) -> MMA:
    info = DATASETS.get("fashion-mnist")
    ctx = DefenseContext(eps=eps, dataset=info, train_size=train_size, epochs=1, device=torch.device("cpu"))
    defense = MMA(MMAConfig(), ctx)
    defense.setup(None)
    return defense


@pytest.mark.parametrize("prev_rel", [0.2, 1.0, 1.5])  # PGD budget below, near and above the margins
def test_bisection_finds_linear_margin(prev_rel):
    torch.manual_seed(0)
    defense = mma_for(Fraction(1, 10))
    n, shape = 24, (1, 4, 4)
    w = torch.randn(16)
    b = -0.5 * w.sum().item()  # boundary through x = 0.5
    target = torch.linspace(0.01, 0.13, n)  # L-inf margins, all below 1.05 * d_max = 0.1575
    y = torch.arange(n) % 2
    side = torch.where(y == 1, 1.0, -1.0)
    x = 0.5 + 0.03 * (torch.rand(n, 16) * 2 - 1)
    x = x + ((side * target * w.abs().sum() - (x @ w + b)) / w.abs().sum())[:, None] * w.sign()
    x = x.reshape(n, *shape)
    model = two_logit_linear(w, b)
    true_margin = (x.flatten(1) @ w + b).abs() / w.abs().sum()  # closed form, L-inf distance to w.x+b=0
    assert torch.allclose(true_margin, target, atol=1e-5)
    assert (soft_logit_margin(model(x), y) < 0).all()  # all correct, as AN-PGD requires

    eps_prev = torch.full((n,), prev_rel * 0.1)
    x_star, eps_star = defense.an_pgd(model, x, y, eps_prev)

    tolerance = defense.search_max / 2**defense.config.search_steps + 1e-5
    assert (eps_star - true_margin).abs().max() <= tolerance
    assert ((x_star - x).flatten(1).abs().max(1).values <= eps_star + 1e-6).all()


def test_margin_beyond_search_range_lands_at_the_hinge():
    torch.manual_seed(0)
    defense = mma_for(Fraction(1, 10))
    w = torch.randn(16)
    b = -0.5 * w.sum().item()
    x = (0.5 + 0.3 * w.sign()).reshape(1, 1, 4, 4)  # margin 0.3 > 1.05 * d_max
    _, eps_star = defense.an_pgd(two_logit_linear(w, b), x, torch.tensor([1]), torch.tensor([0.05]))
    assert eps_star.item() >= defense.d_max  # excluded from the MMA loss by the d_max hinge


class Interrupted(Exception):
    pass


def test_per_example_eps_survives_resume(tmp_path, run_options, interrupt_at_pass, trained_model, monkeypatch):
    """A smoke run interrupted after its first pass resumes with the eps it had remembered.

    The run starts from the conftest's partly trained model (patched into the runner), so that
    examples already have margins after one pass and the check is not a comparison of zeros.
    """
    import harness.training.runner

    monkeypatch.setattr(harness.training.runner, "build_model", lambda *args, **kwargs: trained_model)
    # fewer attack steps: what is tested is where the state goes, not how it is computed
    spec = make_spec("mma", "synthetic", "smoke", seed=0, epochs=2, overrides=("steps=3", "search_steps=4"))
    at_pass_end, at_pass_start = [], []
    original_start, original_end = MMA.start_epoch, MMA.end_epoch

    def spy_end(self, epoch):
        diagnostics = original_end(self, epoch)
        at_pass_end.append(self.eps_state.clone())
        return diagnostics

    monkeypatch.setattr(MMA, "end_epoch", spy_end)
    with pytest.raises(Interrupted):
        run(spec, run_options(tmp_path, download=False, around_pass=interrupt_at_pass(1, Interrupted)))
    saved = load_torch(tmp_path / spec.run_id / "last.pt")["defense"]["eps"]
    assert (saved > 0).sum() >= 10, "too few examples had a margin: the check would be vacuous"
    assert len(at_pass_end) == 1 and torch.equal(saved, at_pass_end[0])

    def spy_start(self, epoch):
        at_pass_start.append((epoch, self.eps_state.clone()))
        original_start(self, epoch)

    monkeypatch.setattr(MMA, "start_epoch", spy_start)
    record = run(spec, run_options(tmp_path, resume=True, download=False))
    assert record["status"] == "complete" and len(record["epochs"]) == 2
    assert [epoch for epoch, _ in at_pass_start] == [1]  # only the missing pass was trained
    assert torch.equal(at_pass_start[0][1], saved)

"""ADES behaviours that a degenerate implementation would lose (issue 13): the scheduler's direction,
mean-preserving budget control, cue definitions, the shared first PGD step, honest diagnostics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from harness.core.defense import DEFENSES, DefenseContext
from harness.core.models import build_model
from harness.core.validation import validate_config
from harness.training.eps_stats import collapse_warning
from harness.training.runner import run
from harness.training.specs import make_spec
from methods.ades.cue_schedule import hold_mean, preserved_buffers
from methods.ades.cues import clean_pass, compute_cues, entropy, grad_norm, mc_variance_full, minmax
from methods.ades.eps_scheduler import through_eps

DETERMINISTIC_CUES = ("grad_norm", "entropy")  # head-mode MC dropout draws fresh masks every call


def make(name, info, **changes):
    cls = DEFENSES.get(name)
    changes.setdefault("steps", 3)
    config = dataclasses.replace(cls.Config(), **changes)
    validate_config(config, name)
    ctx = DefenseContext(eps=info.eps, dataset=info, train_size=600, epochs=1, device=torch.device("cpu"))
    return cls(config, ctx)


# --------------------------------------------------------------------------- the scheduler's direction


def surrogate(defense, model, x, y, direction):
    """CE at x + eps_i * d_i for the defense's current map, PGD direction d fixed."""
    eps = defense.schedule(model, x, y).eps.detach()  # the cue pass needs input gradients
    with torch.no_grad():
        x_in = (x + eps.view(-1, 1, 1, 1) * direction).clamp(0, 1)
        return F.cross_entropy(model.eval()(x_in), y).item(), eps.mean().item()


@pytest.mark.parametrize("name,rises", [("ades", True), ("ades-joint", False)])
def test_scheduler_steps_move_the_surrogate_loss_the_right_way(name, rises, trained_model, train_batch, synthetic_info):
    """Model frozen (lr 0, BN statistics restored after each step), cues deterministic: `ades` (maximise
    at a held mean) raises the loss at the fixed PGD directions, keeping the mean; `ades-joint` lowers it."""
    defense = make(name, synthetic_info, cues=DETERMINISTIC_CUES, attack_bn="eval", scheduler_lr=0.05)
    defense.setup(trained_model)
    x, y = train_batch.x, train_batch.y
    scheduled = defense.schedule(trained_model, x, y)
    x_adv = defense.attack(trained_model, x, y, scheduled)
    direction = (x_adv - x) / scheduled.eps.view(-1, 1, 1, 1)
    before, mean_before = surrogate(defense, trained_model, x, y, direction)
    frozen = torch.optim.SGD(trained_model.parameters(), lr=0.0)
    for _ in range(5):
        torch.manual_seed(0)
        with preserved_buffers(trained_model):
            defense.train_step(trained_model, frozen, train_batch)
    after, mean_after = surrogate(defense, trained_model, x, y, direction)
    assert (after > before) if rises else (after < before), (before, after)
    if name == "ades":
        assert mean_after == pytest.approx(mean_before, rel=1e-5)


# --------------------------------------------------------------------------- budget control


@pytest.mark.parametrize(
    "scores",
    [
        torch.tensor([0.45, 0.5, 0.52, 0.6, 0.55]),  # no shrink needed
        torch.tensor([0.05, 0.9, 0.95, 0.99, 0.7]),
    ],
)  # shrunk to stay in [0, 1]
def test_hold_mean_jacobian_columns_sum_to_zero(scores):
    """Every gradient through hold_mean is mean-preserving: d(sum of outputs)/d(each score) = 0."""
    out = hold_mean(scores, 0.5)
    assert out.mean().item() == pytest.approx(0.5, abs=1e-6)
    jacobian = torch.autograd.functional.jacobian(lambda g: hold_mean(g, 0.5), scores)
    assert jacobian.abs().sum() > 0.5, "the map must still respond to the scores"
    assert torch.allclose(jacobian.sum(0), torch.zeros(len(scores)), atol=1e-6)


def test_through_eps_gradient_is_the_direction():
    x = torch.full((2, 1, 2, 2), 0.5)
    direction = torch.sign(torch.randn(2, 1, 2, 2))
    eps = torch.tensor([0.1, 0.2], requires_grad=True)
    out = through_eps(x, x + eps.detach().view(-1, 1, 1, 1) * direction, eps)
    (out * direction).sum().backward()
    assert torch.allclose(eps.grad, torch.full((2,), 4.0))


# --------------------------------------------------------------------------- cues


def test_entropy_of_uniform_and_confident_logits():
    k = 10
    assert entropy(torch.zeros(3, k)) == pytest.approx(torch.full((3,), math.log(k)), rel=1e-6)
    confident = torch.zeros(1, k)
    confident[0, 3] = 50.0
    assert entropy(confident).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("norm,order", [("l2", 2), ("l1", 1)])
def test_grad_norm_cue_is_the_asked_norm_of_the_input_gradient(norm, order, trained_model, train_batch):
    x, y = train_batch.x[:8], train_batch.y[:8]
    clean = clean_pass(trained_model, x, y, "eval")
    expected = torch.linalg.vector_norm(clean.grad.flatten(1), ord=order, dim=1)
    assert torch.allclose(grad_norm(clean.grad, norm), expected)
    cues = compute_cues(
        trained_model, x, clean, ("grad_norm",), norm=norm, mc_mode="head", mc_samples=2, mc_head_dropout=0.5
    )
    assert torch.allclose(cues["grad_norm"], expected)


def test_cue_bn_eval_gives_each_example_its_own_gradient(trained_model, train_batch, synthetic_info):
    """Train-mode BN couples the batch: example 0's cue changes with its batch mates; eval mode does not."""
    x, y = train_batch.x, train_batch.y
    for cue_bn, coupled in (("eval", False), ("attack", True)):
        defense = make("static-des", synthetic_info, cues=("grad_norm",), weights=(1.0,), cue_bn=cue_bn)
        full = defense.schedule(trained_model, x, y).cues["grad_norm"][:4]
        part = defense.schedule(trained_model, x[:4], y[:4]).cues["grad_norm"]
        assert torch.allclose(full, part, rtol=1e-4) != coupled
    assert not make("ades", synthetic_info, cue_bn="eval").config.shares_first_step
    assert "own gradient" in make("ades", synthetic_info, cue_bn="eval").record()["grad_norm_cue"]


def test_clean_cue_pass_runs_with_dropout_off(train_batch, synthetic_info):
    torch.manual_seed(0)
    model = build_model("small-cnn", synthetic_info, dropout=0.3)
    x, y = train_batch.x[:16], train_batch.y[:16]
    a, b = clean_pass(model, x, y, "train"), clean_pass(model, x, y, "train")
    assert torch.equal(a.grad, b.grad) and torch.equal(a.logits, b.logits)
    assert all(m.training for m in model.modules()), "the model's flags are restored"


def test_full_mode_mc_passes_leave_batchnorm_statistics_untouched(train_batch, synthetic_info):
    torch.manual_seed(0)
    model = build_model("small-cnn", synthetic_info, dropout=0.3)
    model.train()
    buffers = [b.clone() for b in model.buffers()]
    variance = mc_variance_full(model, train_batch.x[:16], samples=4)
    assert (variance > 0).any()
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_minmax_treats_rounding_noise_as_constant():
    noisy = torch.tensor([1000.0, 1000.0001, 1000.0002])  # relative span 2e-7
    assert torch.equal(minmax(noisy), torch.full((3,), 0.5))
    assert torch.allclose(minmax(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))


# --------------------------------------------------------------------------- PGD's shared first step


def test_shared_first_step_still_starts_at_the_seeds_random_point(trained_model, train_batch, synthetic_info):
    x, y = train_batch.x[:8], train_batch.y[:8]
    outputs = {}
    for random_start in (True, False):
        defense = make("static-des", synthetic_info, random_start=random_start, steps=1)
        assert defense.config.shares_first_step
        scheduled = defense.schedule(trained_model, x, y)
        for seed in (0, 1):
            torch.manual_seed(seed)
            outputs[random_start, seed] = defense.attack(trained_model, x, y, scheduled)
    assert not torch.equal(outputs[True, 0], outputs[True, 1]), "the random start was dropped"
    assert torch.equal(outputs[False, 0], outputs[False, 1])


# --------------------------------------------------------------------------- diagnostics


def test_collapse_onto_the_held_mean_is_a_warning():
    flat = torch.full((100,), 0.2) + 1e-4 * torch.randn(100)
    message = collapse_warning(flat, 0.1, 0.3, held_mean=0.2)
    assert message and "held mean" in message and "PGD-AT" in message
    assert "single value" in collapse_warning(flat, 0.1, 0.3)
    assert collapse_warning(torch.linspace(0.12, 0.28, 100), 0.1, 0.3, held_mean=0.2) is None


def test_within_batch_correlation_is_not_the_pooled_one(trained_model, synthetic_info):
    """Two batches where eps rises with the cue inside each batch but the batch with larger cues gets
    smaller eps: within-batch +1, pooled negative."""
    defense = make("static-des", synthetic_info)
    defense.log.add(torch.tensor([0.5, 0.6, 0.7]), {"grad_norm": torch.tensor([10.0, 11.0, 12.0])})
    defense.log.add(torch.tensor([0.1, 0.2, 0.3]), {"grad_norm": torch.tensor([20.0, 21.0, 22.0])})
    diag = defense.log.summary(0.0, 1.0, ("grad_norm", "entropy"), 10, None)
    assert diag["spearman"]["grad_norm"] == pytest.approx(1.0)
    assert diag["spearman_pooled"]["grad_norm"] < 0
    assert diag["spearman"]["entropy"] is None and diag["eps_std_rel"] > 0


def test_a_frozen_scheduler_run_warns_that_it_is_pgd_at(tmp_path, run_options, capsys):
    spec = make_spec("ades", "synthetic", "smoke", overrides=("scheduler_lr=0", "steps=2"))
    record = run(spec, run_options(tmp_path))
    warning = record["epochs"][0]["defense"]["collapse_warning"]
    assert warning and "held mean" in warning and "PGD-AT" in warning
    assert "held mean" in capsys.readouterr().out
    assert record["defense"]["scheduler"]["lr"] == 0

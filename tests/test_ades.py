"""ADES, ADES-joint and Static-DES: budgets, gradients to the scheduler, cues, diagnostics, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.core.datasets import Batch
from harness.core.defense import DEFENSES, DefenseContext
from harness.core.errors import HarnessError
from harness.core.models import build_model
from harness.core.pgd import input_gradient, model_mode, pgd
from harness.core.validation import validate_config
from harness.training.eps_stats import collapse_warning, eps_summary, spearman
from harness.training.specs import make_spec
from methods.ades.cue_schedule import hold_mean
from methods.ades.cues import grad_norm, mc_variance_full, mc_variance_head, minmax
from methods.ades.eps_scheduler import through_eps

VARIANTS = ("ades", "ades-joint", "static-des")


def make(name, info, **changes):
    cls = DEFENSES.get(name)
    changes.setdefault("steps", 3)  # PGD-3: these tests check budgets and plumbing, not attack strength
    config = dataclasses.replace(cls.Config(), **changes)
    validate_config(config, name)
    ctx = DefenseContext(eps=info.eps, dataset=info, train_size=600, epochs=1, device=torch.device("cpu"))
    return cls(config, ctx)


def linf(a, b):
    return (a - b).flatten(1).abs().max(1).values


@pytest.mark.parametrize("name", VARIANTS)
def test_each_perturbation_inside_its_own_ball_box_and_bounds(name, trained_model, train_batch, synthetic_info):
    defense = make(name, synthetic_info)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.train_step(trained_model, opt, train_batch)
    x_adv, eps = defense.perturb(trained_model, train_batch)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (linf(x_adv, train_batch.x) <= eps + 1e-6).all()
    assert (eps >= defense.eps_min - 1e-7).all() and (eps <= defense.eps_max + 1e-7).all()
    assert eps.std() > 0, "per-sample budgets should differ between samples"
    # every budget of the training pass, too
    logged = torch.cat(defense.log.eps)
    assert (logged >= defense.eps_min - 1e-7).all() and (logged <= defense.eps_max + 1e-7).all()


def test_training_input_equals_pgd_output_and_carries_eps_gradient(train_batch):
    x = train_batch.x
    eps = torch.linspace(0.01, 0.05, len(x)).requires_grad_(True)
    x_adv = (x + per_sample_sign(x) * eps.detach().view(-1, 1, 1, 1)).clamp(0, 1)
    rebuilt = through_eps(x, x_adv, eps)
    assert torch.allclose(rebuilt, x_adv, atol=1e-6)
    rebuilt.sum().backward()
    assert eps.grad is not None and (eps.grad != 0).any()


def per_sample_sign(x):
    return torch.sign(torch.randn_like(x))


@pytest.mark.parametrize("name", ("ades", "ades-joint"))
def test_gradients_reach_the_scheduler(name, trained_model, train_batch, synthetic_info):
    defense = make(name, synthetic_info)
    defense.setup(trained_model)
    before = [p.detach().clone() for p in defense.scheduler.parameters()]
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.train_step(trained_model, opt, train_batch)
    first = defense.scheduler.net[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0 and torch.isfinite(first.grad).all()
    assert not torch.equal(before[0], first.detach()), "the scheduler's optimiser did not step"


def test_update_frequency_skips_scheduler_steps(trained_model, train_batch, synthetic_info):
    defense = make("ades", synthetic_info, scheduler_every=2)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.train_step(trained_model, opt, train_batch)  # step 0: updates
    after_first = [p.detach().clone() for p in defense.scheduler.parameters()]
    defense.train_step(trained_model, opt, train_batch)  # step 1: skipped
    assert all(torch.equal(a, p) for a, p in zip(after_first, defense.scheduler.parameters()))


def test_budget_variant_holds_the_batch_mean_at_target(trained_model, train_batch, synthetic_info):
    defense = make("ades", synthetic_info, scheduler_lr=0.05)
    defense.setup(trained_model)
    with torch.no_grad():  # push the raw scores far from 0.5, so renormalisation has work to do
        defense.scheduler.net[2].bias.fill_(3.0)
        defense.scheduler.net[2].weight.mul_(50)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    target = float(synthetic_info.eps)
    for _ in range(3):
        defense.train_step(trained_model, opt, train_batch)
    for eps in defense.log.eps:
        assert abs(eps.mean().item() - target) <= 0.01 * target
        assert eps.min() >= defense.eps_min - 1e-7 and eps.max() <= defense.eps_max + 1e-7
    assert torch.cat(defense.log.eps).std() > 0


def test_static_des_holds_the_batch_mean_by_default(trained_model, train_batch, synthetic_info):
    held = make("static-des", synthetic_info, weights=(1.0, 0.0, 0.0))
    free = make("static-des", synthetic_info, weights=(1.0, 0.0, 0.0), budget_control="none")
    for defense in (held, free):
        defense.setup(trained_model)
    torch.manual_seed(0)
    eps_held = held.schedule(trained_model, train_batch.x, train_batch.y).eps
    torch.manual_seed(0)
    eps_free = free.schedule(trained_model, train_batch.x, train_batch.y).eps
    target = float(synthetic_info.eps)
    assert abs(eps_held.mean().item() - target) <= 1e-3 * target and eps_held.std() > 0
    assert abs(eps_free.mean().item() - target) > 1e-2 * target  # so the control had work to do
    assert eps_held.min() >= held.eps_min - 1e-7 and eps_held.max() <= held.eps_max + 1e-7
    assert spearman(eps_held, eps_free) == pytest.approx(1.0, abs=1e-6)  # the order of the budgets is kept


def test_hold_mean_keeps_mean_bounds_and_order():
    g = torch.tensor([0.99, 0.98, 0.97, 0.2])
    out = hold_mean(g, 0.5)
    assert abs(out.mean().item() - 0.5) < 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out.argsort(), g.argsort())
    assert hold_mean(torch.tensor([0.9]), 0.3).item() == pytest.approx(0.3)


def test_joint_variant_drifts_towards_eps_min(trained_model, data_dir, synthetic_info):
    from harness.core.datasets import load_split

    split = load_split(synthetic_info, data_dir, train=True)
    defense = make("ades-joint", synthetic_info, scheduler_lr=0.05)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    means = []
    for _ in range(12):
        idx = torch.randint(0, len(split.labels), (32,), generator=gen)
        batch = Batch(split.images[idx].float() / 255, split.labels[idx], idx)
        defense.train_step(trained_model, opt, batch)
        means.append(defense.log.eps[-1].mean().item())
    gap_start = means[0] - defense.eps_min
    gap_end = means[-1] - defense.eps_min
    assert gap_end < 0.5 * gap_start, f"mean eps went {means[0]:.4f} -> {means[-1]:.4f} (eps_min {defense.eps_min:.4f})"


def test_mc_variance_is_zero_without_dropout_and_positive_with_it(trained_model, train_batch, synthetic_info):
    features = trained_model.embed(train_batch.x).detach()
    assert torch.equal(mc_variance_head(trained_model, features, 8, 0.0), torch.zeros(len(features)))
    assert (mc_variance_head(trained_model, features, 8, 0.5) > 0).all()
    torch.manual_seed(0)
    plain = build_model("small-cnn", synthetic_info, 0.0)
    assert torch.equal(mc_variance_full(plain, train_batch.x, 4), torch.zeros(len(features)))
    dropped = build_model("small-cnn", synthetic_info, 0.3)
    assert (mc_variance_full(dropped, train_batch.x, 4) > 0).any()
    assert torch.equal(mc_variance_head(trained_model, features, 1, 0.5), torch.zeros(len(features)))


def test_normalisation_of_constant_cues_and_single_examples():
    assert torch.equal(minmax(torch.full((5,), 3.0)), torch.full((5,), 0.5))
    assert torch.equal(minmax(torch.tensor([2.0])), torch.tensor([0.5]))
    assert torch.equal(minmax(torch.tensor([1.0, 3.0, 2.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert minmax(torch.zeros(4), constant_value=0.0).eq(0).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_batch_of_one_gives_finite_budgets(name, trained_model, train_batch, synthetic_info):
    defense = make(name, synthetic_info)
    defense.setup(trained_model)
    one = Batch(train_batch.x[:1], train_batch.y[:1], train_batch.index[:1])
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    stats = defense.train_step(trained_model, opt, one)
    assert all(math.isfinite(float(v)) for v in stats.values())
    eps = defense.log.eps[-1]
    assert torch.isfinite(eps).all() and defense.eps_min <= eps.item() <= defense.eps_max
    if name != "ades-joint":  # the held mean of a batch of one is its budget
        assert eps.item() == pytest.approx(float(synthetic_info.eps), rel=1e-5)


def test_static_des_with_gradient_weight_only_orders_like_grad_norm(trained_model, train_batch, synthetic_info):
    defense = make("static-des", synthetic_info, weights=(1.0, 0.0, 0.0), budget_control="none")
    defense.setup(trained_model)
    _, eps = defense.perturb(trained_model, train_batch)
    with model_mode(trained_model, defense.config.attack_bn):
        _, _, grad = input_gradient(trained_model, train_batch.x, train_batch.y)
    norms = grad_norm(grad, "l2")
    assert torch.equal(eps.argsort(), norms.argsort())
    expected = defense.eps_min + (defense.eps_max - defense.eps_min) * minmax(norms)
    assert torch.allclose(eps, expected, atol=1e-7)


def test_shared_first_gradient_is_pgds_own_first_gradient(trained_model, train_batch, synthetic_info):
    """Without a random start, sharing the clean gradient must give exactly PGD's iterates."""
    defense = make("static-des", synthetic_info, random_start=False)
    defense.setup(trained_model)
    scheduled = defense.schedule(trained_model, train_batch.x, train_batch.y)
    shared = defense.attack(trained_model, train_batch.x, train_batch.y, scheduled)
    eps = scheduled.eps.detach()
    own = pgd(
        trained_model,
        train_batch.x,
        train_batch.y,
        eps,
        steps=3,
        step_size=0.25 * eps,
        random_start=False,
        mode=defense.config.attack_bn,
    )
    assert torch.allclose(shared, own, atol=1e-6)


def test_full_mode_trains_on_a_model_with_dropout(train_batch, synthetic_info):
    torch.manual_seed(0)
    model = build_model("small-cnn", synthetic_info, 0.1)
    defense = make("ades", synthetic_info, mc_mode="full", mc_samples=3)
    defense.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = defense.train_step(model, opt, train_batch)
    assert math.isfinite(float(stats["loss"]))
    assert (torch.cat(defense.log.cues["mc_variance"]) > 0).any()


def test_full_mode_on_a_model_without_dropout_fails_at_setup(trained_model, synthetic_info):
    defense = make("ades", synthetic_info, mc_mode="full")
    with pytest.raises(HarnessError, match="dropout"):
        defense.setup(trained_model)


# --------------------------------------------------------------------------- diagnostics

CONTRACT_A = {
    "eps_mean",
    "eps_std",
    "eps_p05",
    "eps_p50",
    "eps_p95",
    "eps_hist",
    "spearman",
    "probe_eps",
    "collapse_warning",
    "eps_std_rel",
    "eps_p05_p95_rel",
    "spearman_pooled",
    "spearman_last_batch",
}


@pytest.mark.parametrize("name", VARIANTS)
def test_end_epoch_diagnostics_follow_contract_a(name, trained_model, train_batch, synthetic_info):
    defense = make(name, synthetic_info, probe_size=16, collapse_spread=0.0)  # two steps: the spread is tiny
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    for _ in range(2):
        defense.train_step(trained_model, opt, train_batch)
    buffers = [b.clone() for b in trained_model.buffers()]
    diag = defense.end_epoch(0)
    assert CONTRACT_A <= diag.keys()
    assert defense.eps_min <= diag["eps_p05"] <= diag["eps_p50"] <= diag["eps_p95"] <= defense.eps_max
    assert sum(diag["eps_hist"]["counts"]) == 2 * len(train_batch.y) == diag["n"]
    assert len(diag["eps_hist"]["edges"]) == len(diag["eps_hist"]["counts"]) + 1
    assert set(diag["spearman"]) == {"grad_norm", "entropy", "mc_variance"}
    assert all(r is None or -1 <= r <= 1 for r in diag["spearman"].values())
    assert len(diag["probe_eps"]) == 16 and diag["collapse_warning"] is None
    assert all(torch.equal(a, b) for a, b in zip(buffers, trained_model.buffers()))
    assert defense.end_epoch(1) == {}, "the epoch log is reset"


def test_probe_outputs_survive_a_state_round_trip(trained_model, train_batch, synthetic_info):
    defense = make("ades", synthetic_info, scheduler_lr=0.05)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.train_step(trained_model, opt, train_batch)
    fresh = make("ades", synthetic_info, scheduler_lr=0.05)
    fresh.setup(trained_model)
    assert fresh.probe_eps() == []
    fresh.load_state_dict(defense.state_dict())
    assert fresh.probe_eps() == defense.probe_eps()


def test_eps_statistics_helpers():
    eps = torch.linspace(0.1, 0.3, 101)
    s = eps_summary(eps, 0.1, 0.3, bins=4)
    assert s["eps_p50"] == pytest.approx(0.2) and s["eps_mean"] == pytest.approx(0.2)
    assert sum(s["eps_hist"]["counts"]) == 101 and s["eps_hist"]["edges"][0] == pytest.approx(0.1)
    a = torch.tensor([1.0, 2.0, 2.0, 5.0, 7.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(5)) is None
    assert 0 < spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0])) < 1
    low = torch.full((100,), 0.1)
    low[:5] = 0.2
    assert "eps_min" in collapse_warning(low, 0.1, 0.3)
    assert "eps_max" in collapse_warning(torch.full((10,), 0.2999), 0.1, 0.3)
    assert collapse_warning(eps, 0.1, 0.3) is None


@pytest.mark.parametrize("name,objective", [("ades", "budget"), ("ades-joint", "joint"), ("static-des", "static")])
def test_record_carries_resolved_bounds_cues_and_objective(name, objective, synthetic_info):
    record = make(name, synthetic_info).record()
    assert record["eps_min"] == "4/255" and record["eps_max"] == "4/85"  # 12/255
    assert record["eps_target"] == (None if name == "ades-joint" else "8/255")
    assert record["objective"] == objective and record["cues"] == ["grad_norm", "entropy", "mc_variance"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,dropout,message",
    [
        (("eps_min=0.2", "eps_max=0.1"), 0.0, r"eps_min must be <= eps_max \(swap them\), got 1/5 > 1/10"),
        (("eps_min_rel=2", "eps_max_rel=1"), 0.0, r"eps_min must be <= eps_max \(swap them\), got 2.0 > 1.0"),
        (("eps_max_rel=20",), 0.0, r"eps_max must be in \[0, 1\], got 2 at run eps 1/10 \(lower eps_max_rel"),
        (("mc_samples=0",), 0.0, "mc_samples must be >= 1, got 0"),
        (("mc_mode=full",), 0.0, r"mc_mode must be head for a model built without dropout, got full \(pass --dropout"),
        (("cues=grad_norm,curvature",), 0.0, "cues must be one of grad_norm, entropy, mc_variance, got curvature"),
        (("cues=entropy,entropy",), 0.0, "cues must be listed once each, got entropy,entropy"),
        (("eps_target_rel=1.5",), 0.0, "eps_target_rel must be such that the target mean eps lies strictly between"),
        (("objective=bilevel",), 0.0, r"objective must be budget or joint, got bilevel \(bilevel is its own defense"),
        (("mc_head_dropout=1",), 0.0, r"mc_head_dropout must be in \[0, 1\), got 1.0"),
        (("collapse_fraction=0",), 0.0, r"collapse_fraction must be in \(0, 1\], got 0.0"),
        (("scheduler_every=0",), 0.0, "scheduler_every must be >= 1, got 0"),
    ],
)
def test_bad_input_fails_before_training(overrides, dropout, message):
    """Every rule, per-field (RULES) or cross-field (validate, check_spec), in the one message format."""
    with pytest.raises(HarnessError, match="^ades: " + message):
        make_spec("ades", "fashion-mnist", "smoke", overrides=overrides, dropout=dropout)


def test_bad_static_weights_and_good_full_mode_spec():
    with pytest.raises(
        HarnessError,
        match=r"^static-des: weights must be one weight per cue \(grad_norm,entropy,"
        r"mc_variance\), got 2 weights \(e.g. --set weights=1,0,0\)$",
    ):
        make_spec("static-des", "fashion-mnist", "smoke", overrides=("weights=1,0",))
    with pytest.raises(HarnessError, match="^static-des: weights must be of positive sum, got 0.0,0.0,0.0$"):
        make_spec("static-des", "fashion-mnist", "smoke", overrides=("weights=0,0,0",))
    with pytest.raises(HarnessError, match="is outside"):  # --set parses eps bounds as eps (harness.core.config)
        make_spec("static-des", "fashion-mnist", "smoke", overrides=("eps_max=3/2",))
    with pytest.raises(HarnessError, match="strictly between"):
        make_spec("static-des", "fashion-mnist", "smoke", overrides=("eps_target_rel=1.5",))
    make_spec("static-des", "fashion-mnist", "smoke", overrides=("eps_target_rel=1.5", "budget_control=none"))
    spec = make_spec("ades", "fashion-mnist", "smoke", overrides=("mc_mode=full",), dropout=0.1)
    assert spec.defense_config.mc_mode == "full"


def test_cli_reports_bad_input_with_exit_status_2(tmp_path):
    result = CliRunner().invoke(
        main,
        ["run", "--method", "ades-joint", "--preset", "smoke", "--set", "mc_samples=0", "--results", str(tmp_path)],
    )
    assert result.exit_code == 2 and "mc_samples" in result.output
    assert not any(tmp_path.iterdir())


def test_penalty_control_only_acts_on_the_budget_scheduler(synthetic_info):
    target = float(synthetic_info.eps)
    off = torch.full((8,), 1.2 * target)
    penalised = make("ades", synthetic_info, budget_control="penalty", budget_penalty=10.0)
    assert float(penalised.scheduler_penalty(off)) == pytest.approx(-10.0 * 0.2**2, rel=1e-4)
    assert float(penalised.scheduler_penalty(torch.full((8,), target))) == pytest.approx(0.0, abs=1e-9)
    assert make("ades", synthetic_info).scheduler_penalty(off) == 0.0
    assert make("ades-joint", synthetic_info, budget_control="penalty").scheduler_penalty(off) == 0.0

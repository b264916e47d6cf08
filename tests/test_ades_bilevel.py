"""ADES-bilevel: phi descends the held-out robust loss after a one-step look-ahead; the held-out split
is carved from the training subset; runs resume exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from harness.core.datasets import DATASETS, Split
from harness.core.defense import DEFENSES, DefenseContext
from harness.core.errors import HarnessError
from harness.core.pgd import per_sample
from harness.core.validation import validate_config
from harness.storage.records import read_record
from harness.training.runner import prepare_data, run
from harness.training.specs import make_spec
from methods.ades.eps_scheduler import through_eps


def make_bilevel(info, held_out, **changes):
    cls = DEFENSES.get("ades-bilevel")
    config = dataclasses.replace(cls.Config(), **{"steps": 2, **changes})
    validate_config(config, "ades-bilevel")
    ctx = DefenseContext(
        eps=info.eps, dataset=info, train_size=32, epochs=1, device=torch.device("cpu"), held_out=held_out
    )
    return cls(config, ctx)


def test_hypergradient_reaches_phi_through_the_lookahead(trained_model, train_batch, synthetic_info):
    """The held-out loss after theta' = theta - lr g(phi) depends on phi (second order): nonzero, finite
    gradient for every scheduler tensor, and phi's optimiser steps on it."""
    x, y = train_batch.x[:16], train_batch.y[:16]
    held = Split(train_batch.x[16:], train_batch.y[16:])
    defense = make_bilevel(synthetic_info, held, cues=("grad_norm", "entropy"), held_out_batch=16, init_scale=1.0)
    defense.setup(trained_model)
    x_adv = defense.attack(trained_model, x, y, defense.schedule(trained_model, x, y))
    held_adv = defense.held_out_adversarial(trained_model)
    scheduled = defense.schedule(trained_model, x, y, track=True)
    trained_model.train()
    loss = F.cross_entropy(trained_model(through_eps(x, x_adv, scheduled.eps)), y)
    params = dict(trained_model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    outer = defense.lookahead_outer_loss(trained_model, params, grads, 0.5, held_adv)
    phi = list(defense.scheduler.parameters())
    hyper = torch.autograd.grad(outer, phi, retain_graph=True, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in hyper)
    assert sum(g.abs().sum() for g in hyper) > 0
    before = [p.detach().clone() for p in phi]
    defense.hypergradient_step(trained_model, params, grads, 0.5, held_adv)
    assert any(not torch.equal(a, p) for a, p in zip(before, phi))


def test_bilevel_needs_a_held_out_split(trained_model, synthetic_info):
    with pytest.raises(HarnessError, match="held-out"):
        make_bilevel(synthetic_info, None).setup(trained_model)


def test_held_out_split_is_carved_from_training_and_disjoint(tmp_path, run_options):
    spec = make_spec("ades-bilevel", "synthetic", "smoke")
    options = run_options(tmp_path)
    data = prepare_data(spec, DATASETS.get("synthetic"), options)
    assert len(data.held_out.labels) == 25 and data.train.num_examples == 256 - 25

    def rows(images):
        return {
            bytes(r)
            for r in (images.float() * (255 if images.is_floating_point() else 1))
            .round()
            .to(torch.uint8)
            .flatten(1)
            .numpy()
        }

    held = rows(data.held_out.images)
    assert not held & rows(data.train.images) and not held & rows(data.val.images)
    plain = prepare_data(make_spec("ades", "synthetic", "smoke"), DATASETS.get("synthetic"), options)
    assert plain.held_out is None and plain.train.num_examples == 256


def strip_times(record):
    epochs = [
        {k: v for k, v in e.items() if not k.endswith("seconds") and k != "resources"}  # wall, CPU, load
        for e in record["epochs"]
    ]
    final = {label: {k: v for k, v in m.items() if k != "seconds"} for label, m in record["final"].items()}
    return epochs, final


def test_bilevel_run_resumes_exactly(tmp_path, run_options, interrupt_at_pass, passes_trained):
    spec = make_spec("ades-bilevel", "synthetic", "smoke", epochs=2, overrides=("steps=2",))
    reference = run(spec, run_options(tmp_path / "a"))
    assert reference["protocol"]["held_out_examples"] == 25
    assert reference["defense"]["scheduler"]["direction"].startswith("minimise held-out")
    with pytest.raises(KeyboardInterrupt):
        run(spec, run_options(tmp_path / "b", around_pass=interrupt_at_pass(1)))
    assert len(read_record(tmp_path / "b" / spec.run_id / "record.json")["epochs"]) == 1
    note, trained = passes_trained
    resumed = run(spec, run_options(tmp_path / "b", resume=True, around_pass=note))
    assert trained == [1] and strip_times(resumed) == strip_times(reference)


def test_hypergradient_step_descends_the_held_out_loss_after_the_lookahead(trained_model, train_batch, synthetic_info):
    """Direction: phi's own optimiser step lowers the held-out loss after the look-ahead (a maximising
    scheduler raises it) by about the first-order prediction (Adam's first step is lr * sign(g), so
    the drop is lr * sum|g|). The training input is x + eps_i(phi) d_i with the PGD directions d_i
    fixed at the first schedule: the surrogate ADES differentiates (`through_eps` keeps the value at
    x_adv, so only its gradient sees eps). The model runs in float64 so one small step is visible;
    train-mode BatchNorm throughout, so running statistics never enter these values."""
    model = trained_model.double()
    x, y = train_batch.x[:16].double(), train_batch.y[:16]
    held = Split(train_batch.x[16:].double(), train_batch.y[16:])
    defense = make_bilevel(
        synthetic_info,
        held,
        cues=("grad_norm", "entropy"),
        held_out_batch=16,
        init_scale=1.0,
        attack_bn="train",
        cue_bn="attack",
    )
    defense.setup(model)
    lr_phi = 1e-6  # small enough for the first-order prediction (1e-4 already leaves the linear regime)
    for group in defense.scheduler_optimizer.param_groups:
        group["lr"] = lr_phi
    torch.manual_seed(0)
    first = defense.schedule(model, x, y)
    eps0 = per_sample(first.eps.detach(), x)
    directions = (defense.attack(model, x, y, first) - x) / eps0
    held_adv = defense.held_out_adversarial(model)
    params = dict(model.named_parameters())

    def outer_loss():
        eps = per_sample(defense.schedule(model, x, y, track=True).eps, x)
        model.train()
        loss = F.cross_entropy(model((x + eps * directions).clamp(0, 1)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        lookahead = {name: p.detach() - 0.5 * g for (name, p), g in zip(params.items(), grads)}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        held_logits = functional_call(model, {**lookahead, **buffers}, (held_adv[0],))
        return F.cross_entropy(held_logits, held_adv[1]), grads  # written here, not the defense's helper

    before, grads = outer_loss()
    phi = list(defense.scheduler.parameters())
    hyper = torch.autograd.grad(before, phi, retain_graph=True)
    predicted = lr_phi * sum(g.abs().sum() for g in hyper).item()
    defense.hypergradient_step(model, params, grads, 0.5, held_adv)
    drop = (before - outer_loss()[0]).item()
    assert predicted > 1e-9
    assert 0.5 * predicted < drop < 1.5 * predicted, (drop, predicted)


def one_train_step(model, train_batch, synthetic_info, spy: dict):
    """`train_step` on 16 training examples with the other 16 held out; `spy` records what the
    hypergradient step received and the buffers around the held-out attack."""
    from harness.core.datasets import Batch

    held = Split(train_batch.x[16:], train_batch.y[16:])
    defense = make_bilevel(synthetic_info, held, held_out_batch=16)
    defense.setup(model)
    hyper, adversarial = defense.hypergradient_step, defense.held_out_adversarial

    def spy_hyper(model, params, grads, lr, held_out):
        spy["outer"] = held_out
        return hyper(model, params, grads, lr, held_out)

    def spy_adversarial(model):
        spy["buffers_before"] = [b.detach().clone() for b in model.buffers()]
        result = adversarial(model)
        spy["buffers_after"] = [b.detach().clone() for b in model.buffers()]
        return result

    defense.hypergradient_step, defense.held_out_adversarial = spy_hyper, spy_adversarial
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = Batch(train_batch.x[:16], train_batch.y[:16], torch.arange(16))
    defense.train_step(model, optimizer, batch)
    return defense


def test_train_step_takes_every_outer_example_from_the_held_out_split(trained_model, train_batch, synthetic_info):
    spy: dict = {}
    defense = one_train_step(trained_model, train_batch, synthetic_info, spy)
    x_outer, y_outer = spy["outer"]
    eps = defense.context.eps_float
    held_x, held_y = train_batch.x[16:], train_batch.y[16:]
    train_x = train_batch.x[:16]
    assert len(y_outer) == 16
    for x, y in zip(x_outer, y_outer):
        near_held = (held_x - x).flatten(1).abs().max(1).values <= eps + 1e-6
        near_train = (train_x - x).flatten(1).abs().max(1).values <= eps + 1e-6
        assert near_held.any() and not near_train.any()
        assert bool((held_y[near_held] == y).all())


def test_held_out_attack_in_train_step_leaves_batchnorm_statistics_alone(trained_model, train_batch, synthetic_info):
    spy: dict = {}
    one_train_step(trained_model, train_batch, synthetic_info, spy)
    assert any(b.is_floating_point() for b in spy["buffers_before"])  # the model has BN statistics
    for before, after in zip(spy["buffers_before"], spy["buffers_after"]):
        assert torch.equal(before, after)

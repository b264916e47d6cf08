"""Free-AT: m optimiser steps per minibatch from one forward/backward each; a persistent perturbation;
the runner's pass / equivalent-epoch accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from harness.core.datasets import Batch
from harness.core.defense import DefenseContext
from harness.training.runner import run
from harness.training.specs import make_spec
from methods.free_at import FreeAT, FreeATConfig

M = 3


def linear_model(info) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(info.channels * info.image_size**2, info.num_classes))


def free_at(info, replays: int = M) -> FreeAT:
    ctx = DefenseContext(eps=info.eps, dataset=info, train_size=600, epochs=8, device=torch.device("cpu"))
    defense = FreeAT(FreeATConfig(replays=replays), ctx)
    defense.setup(None)
    return defense


def counting(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, list]:
    """Record every forward pass's input and count optimiser steps."""
    inputs, steps = [], []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    return inputs, steps


def test_m_steps_per_minibatch_one_forward_each(train_batch, synthetic_info):
    model, defense = linear_model(synthetic_info), free_at(synthetic_info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, steps = counting(model, optimizer)
    defense.train_step(model, optimizer, train_batch)
    assert len(steps) == M and len(inputs) == M  # one forward (and so one backward) per step
    assert defense.replays == M
    assert torch.equal(inputs[0], train_batch.x)  # the buffer starts at zero
    eps = float(synthetic_info.eps)
    for before, after in zip(inputs, inputs[1:]):  # each replay moves delta by one FGSM step
        moved = (after - before).abs().flatten(1).max(1).values
        assert (moved > 0).all() and (moved <= eps + 1e-6).all()


def test_perturbation_persists_across_minibatches_and_a_smaller_last_batch(train_batch, synthetic_info):
    model, defense = linear_model(synthetic_info), free_at(synthetic_info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    eps = float(synthetic_info.eps)
    defense.train_step(model, optimizer, train_batch)
    carried = defense.delta.clone()
    assert carried.shape == train_batch.x.shape and carried.abs().max() > 0
    assert carried.abs().max() <= eps + 1e-7

    inputs, _ = counting(model, optimizer)
    small = Batch(train_batch.x[:20].flip(0), train_batch.y[:20].flip(0), train_batch.index[:20])
    defense.train_step(model, optimizer, small)
    assert torch.equal(inputs[0], (small.x + carried[:20]).clamp(0, 1))  # starts where the last batch ended
    assert defense.delta.shape == carried.shape  # the buffer keeps its size
    assert torch.equal(defense.delta[20:], carried[20:])  # rows the small batch did not use are kept
    assert not torch.equal(defense.delta[:20], carried[:20])

    after_small = defense.delta.clone()
    defense.train_step(model, optimizer, train_batch)
    assert torch.equal(inputs[M], (train_batch.x + after_small).clamp(0, 1))

    state = defense.state_dict()
    restored = free_at(synthetic_info)
    restored.load_state_dict(state)
    assert torch.equal(restored.delta, defense.delta)


def test_runner_matches_sgd_steps_and_keeps_the_lr_schedule(tmp_path, run_options):
    """Smoke: 4 minibatches per pass. epochs 3 with m = 2 is 3 * 4 / 2 = 6 minibatches (12 SGD
    steps, as PGD-AT's 3 epochs): one full pass and 2 minibatches of a second. The milestone at
    half the run (1.5 equivalent epochs) falls at the 4th minibatch of the first pass."""
    spec = make_spec("free-at", "synthetic", "smoke", epochs=3, overrides=("replays=2",))
    spec = dataclasses.replace(spec, schedule=dataclasses.replace(spec.schedule, lr_milestones=(0.5,)))
    record = run(spec, run_options(tmp_path, download=False))
    protocol = record["protocol"]
    assert (protocol["passes"], protocol["minibatches"], protocol["sgd_steps"]) == (2, 6, 12)
    assert protocol["equivalent_epochs"] == 3
    assert [e["minibatches"] for e in record["epochs"]] == [4, 2]
    assert [e["equivalent_epoch"] for e in record["epochs"]] == [2, 3]
    decayed = spec.schedule.lr * spec.schedule.lr_decay
    assert [e["lr"] for e in record["epochs"]] == [pytest.approx(decayed)] * 2
    assert record["defense"]["replays"] == 2 and record["defense"]["attack_bn"] == "train"

"""Every registered defense honours the interface the runner relies on (timm-style: the whole
registry, parametrized, so a new defense is tested the moment it registers)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.core.datasets import Split
from harness.core.defense import DEFENSES, Defense, DefenseContext, Perturbation
from harness.core.validation import DefenseConfig
from harness.reporting import compute, reference

ALL = DEFENSES.names()


def make_defense(name, info, train_size=600):
    cls = DEFENSES.get(name)
    held_out = None
    if cls.held_out_size(cls.Config(), train_size):  # e.g. ADES-bilevel's outer loss: random stand-in data
        generator = torch.Generator().manual_seed(0)
        held_out = Split(
            torch.rand(16, info.channels, info.image_size, info.image_size, generator=generator),
            torch.randint(0, info.num_classes, (16,), generator=generator),
        )
    ctx = DefenseContext(
        eps=info.eps, dataset=info, train_size=train_size, epochs=10, device=torch.device("cpu"), held_out=held_out
    )
    return cls(cls.Config(), ctx)


def test_registry_is_populated():
    assert "pgd-at" in ALL


@pytest.mark.parametrize("name", ALL)
def test_train_step_is_finite_and_updates_parameters(name, trained_model, train_batch, synthetic_info):
    defense = make_defense(name, synthetic_info)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in trained_model.parameters()]
    defense.start_epoch(0)
    stats = defense.train_step(trained_model, opt, train_batch)
    assert "loss" in stats and math.isfinite(float(stats["loss"]))
    assert all(math.isfinite(float(v)) for v in stats.values())
    changed = sum(not torch.equal(b, p) for b, p in zip(before, trained_model.parameters()))
    assert changed >= len(before) // 2, f"{name}: only {changed}/{len(before)} parameter tensors changed"
    assert isinstance(defense.end_epoch(0), dict)


@pytest.mark.parametrize("name", ALL)
def test_perturbation_inside_its_ball_and_box_and_raises_loss(name, trained_model, train_batch, synthetic_info):
    defense = make_defense(name, synthetic_info)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.start_epoch(0)
    defense.train_step(trained_model, opt, train_batch)  # stateful defenses get their state first
    pert = defense.perturb(trained_model, train_batch)
    if not (pert.eps > 0).any():  # a curriculum may start without attacking (CAT's lesson 0): its last epoch
        defense.start_epoch(defense.context.epochs - 1)
        pert = defense.perturb(trained_model, train_batch)
    assert isinstance(pert, Perturbation)
    x, x_adv, eps = train_batch.x, pert.x_adv, pert.eps
    assert x_adv.shape == x.shape and eps.shape == (len(x),)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (eps >= 0).all() and (eps <= 1).all()
    linf = (x_adv - x).flatten(1).abs().max(1).values
    assert (linf <= eps + 1e-6).all(), f"{name}: perturbation outside its eps ball by {(linf - eps).max():.2e}"
    attacked = eps > 0
    assert attacked.any(), f"{name}: no example was attacked"
    trained_model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(trained_model(x[attacked]), train_batch.y[attacked], reduction="none")
        adv = F.cross_entropy(trained_model(x_adv[attacked]), train_batch.y[attacked], reduction="none")
    assert adv.mean() > clean.mean(), f"{name}: adversarial loss {adv.mean():.4f} <= clean {clean.mean():.4f}"


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips(name, trained_model, train_batch, synthetic_info):
    defense = make_defense(name, synthetic_info)
    defense.setup(trained_model)
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.start_epoch(0)
    defense.train_step(trained_model, opt, train_batch)
    state = defense.state_dict()
    fresh = make_defense(name, synthetic_info)
    fresh.setup(trained_model)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert state.keys() == again.keys()
    for key in state:
        a, b = state[key], again[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        elif not isinstance(a, dict):
            assert a == b, key


@pytest.mark.parametrize("name", ALL)
def test_documented_and_recorded(name, synthetic_info):
    cls = DEFENSES.get(name)
    module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__ or ""
    assert cls.__doc__ and module_doc, f"{name}: class and module docstrings cite the paper and reference"
    assert "Reference" in module_doc or "reference" in module_doc
    record = make_defense(name, synthetic_info).record()
    assert record["name"] == name and isinstance(record["config"], dict)


# --------------------------------------------------------------------------- declared hooks

DOCS = Path(__file__).resolve().parent.parent / "docs" / "defenses.md"


def documented_hooks() -> set[str]:
    """The hooks named in the first column of docs/defenses.md's "Hooks" tables."""
    section = DOCS.read_text().split("\n## Hooks\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`(\w+)", cell)}


def declared_hooks() -> set[str]:
    """What a defense may override: the public attributes of `Defense` and `DefenseConfig`, and `__init__`."""
    public = {n for cls in (Defense, DefenseConfig) for n in vars(cls) if not n.startswith("_")}
    return public | {"__init__"}


def test_docs_document_every_declared_hook_and_no_other():
    documented, declared = documented_hooks(), declared_hooks()
    assert declared - documented == set(), "declared on Defense/DefenseConfig but not in docs/defenses.md"
    assert documented - declared == set(), "in docs/defenses.md but not declared on Defense/DefenseConfig"


def test_every_config_subclasses_the_config_base():
    for name in ALL:
        assert issubclass(DEFENSES.get(name).Config, DefenseConfig), name


# forward-equivalents per example of one training step at PGD-10 and PGD-3 (docs/recipes.md, "Compute
# conventions"), as each defense states them; None: the defense says it has no cost model
STEP_COSTS = {
    "pgd-at": (23, 9),
    "static-des": (23, 9),
    "ades": (23, 9),
    "ades-joint": (23, 9),
    "trades": (27, 13),
    "mart": (26, 12),
    "free-at": (3, 3),
    "mma": (37, 23),
    "fat": (5, 5),
    "iaat": (63, 21),
    "cat": (None, None),
    "ades-bilevel": (None, None),
}


@pytest.mark.parametrize("name", ALL)
def test_every_defense_declares_its_step_cost_and_label(name):
    cls = DEFENSES.get(name)
    assert cls.step_cost.__func__ is not Defense.step_cost.__func__, f"{name} inherits the 'no cost model' default"
    assert name in STEP_COSTS, f"{name}: state its expected cost in STEP_COSTS"
    at_10, at_3 = (compute.step_cost(name, config) for config in ({}, {"steps": 3}))
    got = tuple(cost.forward_equivalents if cost else None for cost in (at_10, at_3))
    assert got == STEP_COSTS[name]
    assert at_10 is None or at_10.assumption
    assert cls.label and cls.label != name, f"{name} declares no report label"
    assert reference.method_label(name) == cls.label


def test_labels_are_distinct_and_unknown_names_stay_as_they_are():
    assert len({DEFENSES.get(n).label for n in ALL}) == len(ALL)
    assert reference.method_label("no-such-defense") == "no-such-defense"
    assert compute.step_cost("no-such-defense") is None


def test_defense_base_declares_the_documented_defaults():
    from harness.core.defense import NoConfig

    class Bare(Defense):
        def perturb(self, model, batch):
            raise NotImplementedError

        def train_step(self, model, optimizer, batch):
            raise NotImplementedError

    assert Bare.step_cost({"steps": 10}) is None and compute.step_cost("bare") is None
    assert Bare.reference_protocol is None and Bare.reference_schedule is None and Bare.Config is NoConfig
    assert not Bare.distributed_ready and Bare.held_out_size(NoConfig(), 100) == 0 and Bare.replays == 1
    assert Bare.label == "" and Bare.check_spec(None) is None

"""CAT (Cai et al. 2018): lessons over epochs, batch mixing, clean lesson 0, the wired attack, the report."""

from __future__ import annotations

import dataclasses

import pytest
import report_fixture as fx
import torch

import methods.cat as cat_module
from harness.core.defense import DEFENSES, DefenseContext
from harness.core.errors import HarnessError
from harness.core.validation import validate_config
from harness.reporting import build, load_results
from harness.training.specs import make_spec
from methods.cat import lesson_for, mixed_steps


def make(info, epochs=8, **changes):
    cls = DEFENSES.get("cat")
    config = dataclasses.replace(cls.Config(), **changes)
    validate_config(config, "cat")
    ctx = DefenseContext(eps=info.eps, dataset=info, train_size=32, epochs=epochs, device=torch.device("cpu"))
    return cls(config, ctx)


def test_lessons_split_the_epochs_evenly_and_end_at_k():
    lessons = [lesson_for(e, 100, 7) for e in range(100)]
    assert lessons[0] == 0 and lessons[-1] == 7 and lessons == sorted(lessons)
    assert {lessons.count(k) for k in range(8)} <= {12, 13}
    assert [lesson_for(e, 8, 7) for e in range(8)] == list(range(8))
    assert [lesson_for(e, 3, 7) for e in range(3)] == [0, 2, 5]


def test_batch_mixing_splits_the_batch_over_attacks_zero_to_l():
    assert mixed_steps(8, 3, True).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert mixed_steps(8, 3, False).tolist() == [3] * 8
    assert mixed_steps(5, 0, True).tolist() == [0] * 5


def test_lesson_zero_trains_on_clean_inputs(trained_model, train_batch, synthetic_info):
    defense = make(synthetic_info)
    defense.start_epoch(0)
    assert torch.equal(defense.perturb(trained_model, train_batch).x_adv, train_batch.x)


def test_each_part_gets_its_own_pgd_iterations(trained_model, train_batch, synthetic_info, monkeypatch):
    calls = []
    real = cat_module.pgd

    def counting(model, x, y, eps, *, steps, **kw):
        calls.append((steps, len(x)))
        return real(model, x, y, eps, steps=steps, **kw)

    monkeypatch.setattr(cat_module, "pgd", counting)
    defense = make(synthetic_info, epochs=8)
    defense.start_epoch(3)  # lesson 3 of 0..7
    opt = torch.optim.SGD(trained_model.parameters(), lr=0.01)
    defense.train_step(trained_model, opt, train_batch)
    assert calls == [(1, 8), (2, 8), (3, 8)]
    x_adv, eps = defense.perturb(trained_model, train_batch)
    delta = (x_adv - train_batch.x).flatten(1).abs().max(1).values
    assert (delta[:8] == 0).all() and (delta[8:] > 0).all() and (delta <= eps + 1e-6).all()
    assert (eps[:8] == 0).all() and (eps[8:] == float(synthetic_info.eps)).all()
    assert defense.end_epoch(3) == {"lesson": 3, "pgd_steps": [0, 1, 2, 3]}


def test_bad_config_fails_before_training():
    with pytest.raises(HarnessError, match="max_steps"):
        make_spec("cat", "synthetic", "smoke", overrides=("max_steps=0",))


def test_cat_is_in_table1_and_table2_as_a_control(tmp_path):
    runs = (
        fx.FakeRun("pgd-at", 0, 80, 45, 40),
        fx.FakeRun("cat", 0, 81, 46, 41),
        fx.FakeRun("static-des", 0, 80, 45, 40),
        fx.FakeRun("ades", 0, 81, 47, 42),
    )
    fx.build_results(tmp_path, runs=runs, corrupt=False)
    report = build(load_results(tmp_path))
    assert any(str(row["Method"].text) == "CAT" for row in report.table1[0].display)
    methods = [row["Method"].text for row in report.table2[0].display]
    assert "CAT" in methods and "ADES − CAT" in methods and "ADES − Static-DES" in methods


@pytest.mark.parametrize("random_start, low, high", [(True, 0.4, 0.65), (False, 0.0, 0.3)])
def test_pgd1_lesson_honours_random_start(trained_model, train_batch, synthetic_info, random_start, low, high):
    """PGD-1 with step eps/4: a uniform start puts |delta| near eps/2 on average, a zero start at
    eps/4 at most, so the control's perturbation size is the one its record states."""
    defense = make(synthetic_info, epochs=8, batch_mixing=False, random_start=random_start)
    defense.start_epoch(1)  # lesson 1: PGD-1 on the whole batch
    x_adv, _ = defense.perturb(trained_model, train_batch)
    reach = float((x_adv - train_batch.x).abs().mean()) / float(synthetic_info.eps)
    assert low < reach < high, reach

"""Escalation instead of FAILED where PGD-20 has not converged, and two independent lines of defence
for every kind of masked model: each kind below is flagged by at least two checks of the README main
job's evaluation (PGD-20 alone, default probes), and the probes that are the second line (the
gradient-ascent check, Square off the data's grid and with few survivors) each have a model that only
they catch."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from evaluation_helpers import (
    ConstantWhereWrong,
    LyingBackward,
    OffGridMasked,
    Quantised,
    Randomised,
    ScaledLogits,
    Shattered,
    on_grid,
    store_for,
    template_data,
    train_tiny,
    train_tiny_at,
)

from harness.evaluation.attacks import ATTACKS, AttackOptions, AttackOutcome, EvalAttack
from harness.evaluation.escalation import ESCALATED, WHITEBOX_ESCALATED, EscalationBudget
from harness.evaluation.flags import WORST_CASE, cell_key, load_flags, read_evaluation
from harness.evaluation.masking import ProbeBudget, off_grid, probe_eps
from harness.evaluation.sweep import sweep

EPS = [Fraction(0), Fraction(4, 100), Fraction(6, 100), Fraction(9, 100)]


@pytest.fixture(scope="module")
def tiny():
    return train_tiny(steps=150)


@pytest.fixture(scope="module")
def robust_tiny():
    return train_tiny_at()


@pytest.fixture(scope="module")
def data():
    return template_data(160, seed=3)


@pytest.fixture(scope="module")
def data400():
    return template_data(400, seed=3)


def pgd20(**options) -> list[EvalAttack]:
    return [ATTACKS.get("pgd-20").build(AttackOptions(batch_size=200, **options))]


def run(model, data, tmp_path, eps=EPS, probes=ProbeBudget(), **options):
    x, y = data
    return sweep(model, x, y, pgd20(**options), eps, store_for(tmp_path, len(y)), batch_size=200, probes=probes)


def failed(result) -> set[str]:
    return {c.name for c in result.checks if not c.passed}


def check(result, name: str):
    return next(c for c in result.checks if c.name == name)


# --------------------------------------------------------------------------- escalation


def test_unconverged_pgd20_is_escalated_on_every_point_still_robust_and_reported(robust_tiny, data400, tmp_path):
    """Step 0.003: 20 steps cannot leave a ball of 0.06 around the start, 100 can. The number at the
    probe eps is repaired (not FAILED), on every survivor (not the probe's 10), and both are kept."""
    result = run(robust_tiny, data400, tmp_path, probes=ProbeBudget(subset=10), pgd_step="0.003")
    more_steps = check(result, "more-steps")
    assert more_steps.passed and "escalated" in more_steps.detail, more_steps.detail
    record = read_evaluation(tmp_path / "evaluation.json")
    first = record["escalations"][0]
    assert first["eps"] == "9/100" and first["converged"]
    flags = load_flags(tmp_path)
    sweep_robust = flags[cell_key("pgd-20", EPS[-1])]
    assert first["rounds"][0]["attacked"] == int(sweep_robust.sum()) > 10  # every point still robust
    assert first["rounds"][0]["broken"] > 10  # PGD-100 broke more than the probe's 10 points could
    assert first["before"] == pytest.approx(100 * sweep_robust.mean())
    worst = flags[cell_key(WORST_CASE, EPS[-1])]  # what every escalation at this eps or below left robust
    escalated = [flags[cell_key(ESCALATED, Fraction(e["eps"]))] for e in record["escalations"]]
    assert np.array_equal(worst, np.logical_and.reduce([sweep_robust] + escalated))
    assert first["after"] == pytest.approx(100 * worst.mean()) and first["after"] < first["before"] - 1
    assert result.store.accuracy("pgd-20", EPS[-1]) == pytest.approx(first["before"])  # PGD-20 kept
    row = next(r for r in record["results"] if r["attack"] == ESCALATED)  # its examples were re-checked
    assert row["verified"]["broken"] == sum(r["broken"] for r in first["rounds"]) and row["verified"]["failed"] == 0
    assert "adversarial-examples-verified" not in failed(result)
    assert len({r["seed"] for r in first["rounds"]}) == len(first["rounds"])  # each round new random starts


def test_escalation_walks_down_the_sweep_and_keeps_the_worst_case_monotone(robust_tiny, data400, tmp_path):
    """Step 0.001: PGD-20 has not converged at 9/100 nor at 6/100, and has at 4/100 (a ball the model
    resists): both are escalated, largest first, the walk stops at the eps where PGD-100 agrees, and
    with nested balls what broke at a smaller eps counts at every larger one."""
    result = run(robust_tiny, data400, tmp_path, pgd_step="0.001")
    escalated = [e["eps"] for e in result.store.record["escalations"]]
    assert escalated == ["9/100", "3/50"]
    last = check(result, "more-steps").detail.split(" | ")[-1]
    assert last.startswith("pgd-100 breaks") and " at 1/25 " in last and "not converged" not in last, last
    flags = result.store.flags
    top, below = (flags[cell_key(ESCALATED, e)] for e in (EPS[-1], EPS[-2]))
    sweep_top = flags[cell_key("pgd-20", EPS[-1])]
    assert np.array_equal(flags[cell_key(WORST_CASE, EPS[-1])], sweep_top & top & below)  # nested balls
    worst = [result.store.accuracy(WORST_CASE, e) for e in EPS]
    assert all(a >= b for a, b in zip(worst, worst[1:])), worst
    pgd = [result.store.accuracy("pgd-20", e) for e in EPS]
    assert worst[1] == pgd[1] and all(w < p - 1 for w, p in zip(worst[2:], pgd[2:]))  # 1/25 not escalated


def test_escalation_that_runs_out_of_budget_fails_and_still_reports_the_worst_case(robust_tiny, data400, tmp_path):
    """No rounds beyond the probe's PGD-100: the number still falls by more than the limit, so the check
    fails (an upper bound, not a repaired number), while the record has what did run."""
    result = run(
        robust_tiny, data400, tmp_path, probes=ProbeBudget(escalation=EscalationBudget(rounds=())), pgd_step="0.001"
    )
    assert "more-steps" in failed(result)
    first = result.store.record["escalations"][0]
    assert not first["converged"] and [r["attack"] for r in first["rounds"]] == ["pgd-100"]
    assert result.store.accuracy(WORST_CASE, EPS[-1]) == pytest.approx(first["after"])
    assert first["after"] < first["before"]


# --------------------------------------------------------------------------- two lines of defence

MASKED = {  # kind -> the checks that must flag it (at least two independent ones)
    "saturated softmax": (lambda m, x, y: ScaledLogits(m), {"ce-gradients-not-vanishing", "pgd20-cw-gap"}),
    "shattered gradients": (lambda m, x, y: Shattered(m), {"square-probe", "gradient-ascends-loss"}),
    "negated gradient": (lambda m, x, y: LyingBackward(m, "negated"), {"square-probe", "gradient-ascends-loss"}),
    "noise gradient": (lambda m, x, y: LyingBackward(m, "noise"), {"square-probe", "gradient-ascends-loss"}),
    "zero gradient": (lambda m, x, y: LyingBackward(m, "zero"), {"nonzero-input-gradients", "gradient-ascends-loss"}),
    "input quantisation": (lambda m, x, y: Quantised(m), {"nonzero-input-gradients", "gradient-ascends-loss"}),
    "quantisation with gradient jitter": (
        lambda m, x, y: Quantised(m, jitter=0.5),
        {"more-steps", "gradient-ascends-loss"},
    ),
    "randomised": (lambda m, x, y: Randomised(m), {"deterministic-outputs", "gradient-ascends-loss"}),
    "off-grid detector": (lambda m, x, y: OffGridMasked(m, x, y), {"square-probe", "gradient-ascends-loss"}),
}


@pytest.mark.parametrize("kind", list(MASKED))
def test_every_masked_kind_is_flagged_by_two_independent_checks(tiny, data, tmp_path, kind):
    build, expected = MASKED[kind]
    x, y = on_grid(data[0]), data[1]  # 8-bit images, as every data set the harness reads
    result = run(build(tiny, x, y), (x, y), tmp_path)
    assert expected <= failed(result), (kind, {c.name: c.detail for c in result.checks if not c.passed})


def test_a_robust_model_whose_backward_is_negated_is_caught_without_square(robust_tiny, data400, tmp_path):
    """The issue's thin margin: only Square caught it. The gradient check is a second line on its own."""
    result = run(LyingBackward(robust_tiny, "negated"), data400, tmp_path)
    assert {"square-probe", "gradient-ascends-loss"} <= failed(result)
    detail = check(result, "gradient-ascends-loss").detail
    assert "backward pass does not describe the forward one" in detail


def test_square_probes_off_the_data_grid_where_pgd_is(tiny, data, tmp_path):
    """The off-grid detector answers every on-grid query by memory: Square at 23/255 (on the grid) would
    see only that branch; at 45/510 = 3/34 it sees the branch PGD was misled on."""
    x, y = on_grid(data[0]), data[1]
    eps = [Fraction(0), Fraction(23, 255)]
    result = run(OffGridMasked(tiny, x, y), (x, y), tmp_path, eps=eps)
    square = check(result, "square-probe")
    assert not square.passed and "queries at 3/34 (off the 1/255 grid)" in square.detail, square.detail


def test_off_grid_eps():
    assert off_grid(Fraction(51, 255), 255) == Fraction(101, 510)  # Fashion-MNIST's 1/5
    assert off_grid(Fraction(1, 10), 255) == Fraction(1, 10)  # 25.5/255: already half-way
    assert off_grid(Fraction(1, 40), 255) == Fraction(1, 40)  # 6.375/255: far enough from the grid
    assert off_grid(Fraction(8, 255), 255) == Fraction(15, 510)


@dataclass(frozen=True)
class Lying(EvalAttack):
    """A sweep attack that reports as broken exactly the points listed per eps (a masked PGD would)."""

    name: str
    broken: dict

    def config(self):
        return {"kind": "scripted"}

    def robust(self, model, x, y, eps, candidates):
        robust = candidates.clone()
        robust[list(self.broken.get(eps, []))] = False
        return AttackOutcome(x.clone(), robust)


def test_square_probe_moves_to_an_eps_with_enough_survivors(tiny, data, tmp_path):
    """The sweep says: nothing broken at 9/100, all but one point broken at 15/100. On one survivor
    the Square probe cannot fail; at 9/100, where the sweep's claim is false, it must."""
    x, y = data
    eps = [Fraction(0), Fraction(9, 100), Fraction(15, 100)]
    with torch.no_grad():
        correct = (tiny(x).argmax(1) == y).nonzero().squeeze(1).tolist()
    attack = Lying("lying", {eps[-1]: correct[1:]})
    result = sweep(
        tiny, x, y, [attack], eps, store_for(tmp_path, len(y)), batch_size=200, probes=ProbeBudget(white_box=None)
    )
    square = check(result, "square-probe")
    assert not square.passed and "at 9/100" in square.detail, square.detail


def test_a_square_alarm_on_a_weak_sweep_is_escalated_with_apgd_and_passes(tiny, data, tmp_path):
    """The sweep's attack is weak (it breaks nothing at 9/100 on a non-robust model), Square finds
    that, APGD finds it too: the number is escalated (worst case from APGD, verified, record + cell),
    Square's breaks are re-checked against it, and the check passes saying so."""
    x, y = data
    eps = [Fraction(0), Fraction(9, 100), Fraction(15, 100)]
    with torch.no_grad():
        correct = (tiny(x).argmax(1) == y).nonzero().squeeze(1).tolist()
    result = sweep(
        tiny, x, y, [Lying("lying", {eps[-1]: correct[1:]})], eps, store_for(tmp_path, len(y)), batch_size=200
    )
    square, store = check(result, "square-probe"), result.store
    assert square.passed and "escalated with white-box attacks" in square.detail, square.detail
    [record] = store.record["escalations"]
    assert record["trigger"] == "square-probe" and record["eps"] == "9/100" and record["after"] < record["before"]
    assert record["budget_passes_per_point"] == 100 + 9 * 100 and record["verified"]["failed"] == 0
    assert [r["attack"] for r in record["rounds"]] == ["apgd-ce-100", "apgd-t-100x9"]
    escalated = store.flags[cell_key(WHITEBOX_ESCALATED, eps[1])]
    assert (store.flags[cell_key(WORST_CASE, eps[1])] == (store.flags[cell_key("lying", eps[1])] & escalated)).all()
    assert (store.flags[cell_key(WORST_CASE, eps[2])] <= escalated).all()  # nested balls
    assert store.accuracy(WORST_CASE, eps[1]) == record["after"]
    from harness.commands.eval import escalation_lines, escalation_note

    assert "escalated worst-case@9/100 (white-box after Square)" in escalation_note(store.record)
    assert "apgd-ce-100, apgd-t-100x9" in escalation_lines(store.record)[0]


def test_square_recheck_fails_when_the_white_box_escalation_misses_what_square_breaks(
    tiny, data, tmp_path, monkeypatch
):
    """If the white-box attack cannot account for Square's breaks (here it is made to break nothing:
    what masked gradients do to it), the re-check keeps the alarm: FAILED, not a silent pass."""
    import harness.evaluation.attacks as attacks_module

    x, y = data
    eps = [Fraction(0), Fraction(9, 100), Fraction(15, 100)]
    with torch.no_grad():
        correct = (tiny(x).argmax(1) == y).nonzero().squeeze(1).tolist()
    monkeypatch.setattr(
        attacks_module.APGDAttack,
        "robust",
        lambda self, model, x, y, eps, candidates: AttackOutcome(x.clone(), candidates.clone()),
    )
    result = sweep(
        tiny, x, y, [Lying("lying", {eps[-1]: correct[1:]})], eps, store_for(tmp_path, len(y)), batch_size=200
    )
    square = check(result, "square-probe")
    assert not square.passed and "re-check" in square.detail and "still misses" in square.detail, square.detail
    assert result.store.record["escalations"][0]["after"] == result.store.record["escalations"][0]["before"]
    assert probe_eps(result.store.flags, eps, 1) == eps[-1]  # the old choice: the largest with a survivor
    assert probe_eps(result.store.flags, eps, 20) == eps[1]


# --------------------------------------------------------------------------- the wired-up path


def test_cli_line_record_and_report_say_which_number_was_escalated_and_by_how_much(run_dir, data_dir, tmp_path):
    """`harness eval` (the README main job's command) on a run whose PGD-20 cannot converge (step 0.001):
    the --quiet line names the escalated number, evaluation.json keeps both, the report shows it."""
    import json
    import shutil

    from click.testing import CliRunner

    from harness.cli import main

    run = shutil.copytree(run_dir, tmp_path / "results" / run_dir.name, ignore=shutil.ignore_patterns("eval"))
    args = [
        "eval",
        str(run),
        "--attack",
        "pgd-20",
        "--n",
        "64",
        "--eps",
        "0,4/255,8/255",
        "--pgd-step",
        "0.001",
        "--data-dir",
        str(data_dir),
    ]
    out = CliRunner().invoke(main, args + ["--quiet"])
    assert out.exit_code == 0, out.output
    (line,) = out.output.strip().splitlines()
    (path,) = run.glob("eval/last-*/evaluation.json")
    record = json.loads(path.read_text())
    first = record["escalations"][0]
    assert f"escalated worst-case@8/255 {first['before']:.2f}% -> {first['after']:.2f}%" in line, line
    assert first["after"] < first["before"]
    assert record["config"]["masking_probes"]["escalation"] == {"rounds": [[100, 2], [100, 4]]}
    pgd = next(r for r in record["results"] if r["attack"] == "pgd-20" and r["eps"] == "8/255")
    worst = next(r for r in record["results"] if r["attack"] == "worst-case" and r["eps"] == "8/255")
    assert pgd["robust_accuracy"] == pytest.approx(first["before"]) and worst["robust_accuracy"] == first["after"]
    shown = CliRunner().invoke(main, args)  # already evaluated: the full summary says it too
    assert shown.exit_code == 0 and "escalated worst-case@8/255" in shown.output and ESCALATED in shown.output
    report = CliRunner().invoke(main, ["report", "--results", str(run.parent), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert f"escalated worst-case@8/255 {first['before']:.2f} → {first['after']:.2f}" in html
    assert "skipped evaluation" not in html and "does not match" not in html  # flags vouch for the escalated cell


def test_a_probe_fails_only_beyond_its_sampling_noise():
    """145 of 500 points left robust, 100 probed: 2 broken by luck (≈0.58% of n, above the 0.5% limit)
    is within the noise of a 100-point subset; 10 broken is not (an honest model's Square false alarm
    on the README main job was the former)."""
    from harness.evaluation.checks import Thresholds
    from harness.evaluation.masking import Standing, probe_verdict

    robust = torch.zeros(500, dtype=torch.bool)
    robust[:145] = True
    standing = Standing.of(robust, Fraction(1, 5), 100)
    lucky = probe_verdict("square-probe", 2, 0.58, "square", standing, 0.5, Thresholds(), "masking")
    masked = probe_verdict("square-probe", 10, 2.9, "square", standing, 0.5, Thresholds(), "masking")
    assert lucky.passed and "95% lower bound 0.07%" in lucky.detail, lucky.detail
    assert not masked.passed and "masking" in masked.detail, masked.detail


def test_an_escalation_counts_at_every_larger_eps_with_nested_balls():
    """A point the escalation at 3/50 broke is broken at 9/100 too (the larger ball contains the
    example), even where the escalation at 9/100 missed it; without nesting it counts only at 3/50."""
    from harness.evaluation.escalation import Escalated, escalated_worst_case

    flags = {cell_key(WORST_CASE, e): np.ones(4, dtype=bool) for e in EPS}

    def escalated(eps, robust):
        return Escalated(eps, torch.tensor(robust), torch.zeros(4), 100.0, (), True, 0, 0.0)

    runs = [escalated(EPS[-1], [False, True, True, True]), escalated(EPS[-2], [True, False, True, True])]
    nested = escalated_worst_case(flags, EPS, runs, nested=True)
    assert nested[EPS[-1]].tolist() == [False, False, True, True] and nested[EPS[1]].all()
    flat = escalated_worst_case(flags, EPS, runs, nested=False)
    assert flat[EPS[-1]].tolist() == [False, True, True, True] and flat[EPS[-2]].tolist() == [True, False, True, True]


def test_zero_gradients_on_misclassified_points_are_no_alarm(tiny, data):
    """Free-AT seed 2 of the README main job: 7 of 256 probe points had an all-zero input gradient, all
    misclassified (a constant-output region). Only clean-correct points can hide robustness."""
    from harness.evaluation.checks import Thresholds, nonzero_input_gradients

    x, y = data[0], data[1].clone()
    y[:40] = (y[:40] + 1) % 10  # mislabelled: the tiny model misclassifies these 40 of 160
    model = ConstantWhereWrong(tiny, x, y)
    with torch.no_grad():
        assert (model(x).argmax(1) != y).float().mean() > 0.05  # many points have a zero gradient...
    assert nonzero_input_gradients(model, x, y, Thresholds()).passed  # ...none of them correct
    assert not nonzero_input_gradients(LyingBackward(tiny, "zero"), x, y, Thresholds()).passed

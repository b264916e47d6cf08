"""Masking probes: cheap second opinions on the sweep's numbers, run on every evaluation.

Gradient masking makes a defense look robust by starving the attack, not by removing adversarial
examples (Athalye et al. 2018): saturated cross-entropy (logits scaled up) or shattered gradients
(`f(x + 0.004 sin(2000 x))`) leave PGD-20 at 100%. Each probe asks a question PGD-20 cannot answer
for itself, on at most `subset` points at one eps, so its cost is bounded whatever n and the sweep:

- `ce-gradients-not-vanishing` (model check, whenever a cross-entropy attack runs): the fraction of
  clean-correct probe points whose CE input gradient is exactly zero or vanishing.
- `pgd20-cw-gap` (probe when cw-inf is not in the sweep): CW-30 on the margin loss (scale-free, so it
  sees through a saturated softmax) against PGD-20.
- `more-steps` : PGD-100 with PGD-20's settings and the same random start per point; points it still
  breaks mean PGD-20 had not converged (a fixed start: it measures steps, not a second restart). Then
  the evaluation escalates at that eps (`escalation`) and probes the next smaller eps, instead of
  leaving a number it knows is too high behind a "FAILED".
- `square-probe`: Square with a small query budget, gradient-free, against every attack of the sweep
  (and the escalation), at the probe eps moved off the data's 1/255 grid, where PGD's iterates are.
  On an alarm, unless the backward pass lies (`gradient-ascends-loss` failed), APGD-CE then APGD-T
  escalate at that eps (`square_escalation`) and Square's breaks are re-checked against the new worst
  case: it passes when the white-box attack found them, fails (masking) when it did not.
- `gradient-ascends-loss`: one small step along the model's own input gradient, from PGD's kind of
  random start, must raise the loss it is the gradient of; a lying backward pass (noise, zero, the
  negated gradient, a quantised or shattered input) fails it even where the others pass.

The probe eps is the largest of the sweep at which the sweep's worst case still leaves at least
`min_standing` points robust (the most room to find what the attacks missed, and enough points for a
probe to reach its limit; if no eps leaves that many, the one leaving most); the subset is the first
`subset` of those points. A subset probe reports the % of all n points it breaks beyond the sweep,
extrapolated from the subset. `more-steps` escalates above its threshold; `square-probe` and
`pgd20-cw-gap` fail only when the 95% lower confidence bound of that share exceeds theirs (and on at
least `probe_min_points` points), so a few lucky points on a 100-point subset are not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from harness.core.config import fraction_str
from harness.core.pgd import input_gradient
from harness.evaluation.attacks import AttackOutcome, EvalAttack, PGDAttack, QuickSquare, predict_correct, step_size
from harness.evaluation.checks import PROBE_SIZE, Check, Skipped, Thresholds, ce_gradients_not_vanishing
from harness.evaluation.escalation import (
    Escalated,
    EscalationBudget,
    WhiteBoxBudget,
    escalate,
    escalate_white_box,
    escalated_worst_case,
)
from harness.evaluation.flags import WORST_CASE, cell_key, percent


@dataclass(frozen=True)
class ProbeBudget:
    """What the probes may spend per target (recorded in the evaluation config)."""

    subset: int = 100  # points attacked by each probe, at one eps
    min_standing: int = 20  # the probe eps is the largest leaving at least this many points robust
    square_queries: int = 200  # Square's model calls per point
    more_steps: int = 100  # the PGD-k that PGD-20 is compared with
    cw_steps: int = 30  # the CW-inf of the sweep
    data_grid: int = 255  # inputs are multiples of 1/data_grid (8-bit images): Square probes off that grid
    escalation: EscalationBudget | None = EscalationBudget()  # None: a failed more-steps probe stays failed
    white_box: WhiteBoxBudget | None = WhiteBoxBudget()  # None: a Square alarm fails without escalating

    def to_dict(self) -> dict:
        return asdict(self)


def uses_cross_entropy(attack: EvalAttack) -> bool:
    config = attack.config()
    if config.get("kind") == "pgd":
        return config.get("loss") == "ce"
    if config.get("kind") == "autoattack":
        return config.get("version") != "custom" or "apgd-ce" in (config.get("attacks") or [])
    return False


def gradient_check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack], t: Thresholds
) -> tuple[list[Check], list[Skipped]]:
    if any(uses_cross_entropy(a) for a in attacks):
        return [ce_gradients_not_vanishing(model, x, y, t)], []
    return [], [Skipped("ce-gradients-not-vanishing", "no cross-entropy attack ran", ("pgd-20",))]


def probe_eps(flags: dict[str, np.ndarray], eps_list: list[Fraction], min_standing: int = 1) -> Fraction | None:
    """The largest eps > 0 at which the sweep's worst case leaves at least `min_standing` points robust
    (a probe on one or two survivors cannot reach its limit); failing that, the eps leaving the most."""
    counts = {
        e: int(flags[cell_key(WORST_CASE, e)].sum()) for e in eps_list if e > 0 and cell_key(WORST_CASE, e) in flags
    }
    enough = [e for e, k in counts.items() if k >= min_standing]
    if enough:
        return max(enough)
    most = max(counts.values(), default=0)
    return max(e for e, k in counts.items() if k == most) if most else None


def off_grid(eps: Fraction, grid: int) -> Fraction:
    """The largest eps' <= eps whose multiples of the data's grid step lie between grid points: a
    Square query x +- eps' of an 8-bit image is then off the 1/255 grid, where PGD's random start and
    steps are (a model that behaves differently on the grid is probed on the branch PGD saw)."""
    units, half = eps * grid, Fraction(1, 2)
    if Fraction(1, 4) <= units - math.floor(units) <= Fraction(3, 4) or units < half:
        return eps
    return (math.floor(units - half) + half) / grid


def planned_probes(attacks: list[EvalAttack]) -> list[str]:
    """The probes an evaluation with these attacks runs."""
    names = {a.name for a in attacks}
    return (
        ["square-probe", "gradient-ascends-loss"]
        + (["more-steps"] if "pgd-20" in names else [])
        + (["pgd20-cw-gap"] if "pgd-20" in names and "cw-inf" not in names else [])
    )


def probes_skipped(attacks: list[EvalAttack]) -> list[Skipped]:
    """--no-probes: the probes are shown as skipped (with the command that runs them), never dropped."""
    return [Skipped(name, "--no-probes was passed") for name in planned_probes(attacks)]


@dataclass(frozen=True)
class Standing:
    """The points the sweep left robust at the probe eps, and the subset a probe attacks."""

    eps: Fraction
    robust: torch.Tensor  # (n,) bool
    subset: torch.Tensor  # (n,) bool: the first `budget.subset` of them

    @classmethod
    def of(cls, robust: torch.Tensor, eps: Fraction, size: int) -> Standing:
        subset = torch.zeros_like(robust)
        subset[robust.nonzero().squeeze(1)[:size]] = True
        return cls(eps, robust, subset)

    def where(self) -> str:
        return (
            f"at {fraction_str(self.eps)} on {int(self.subset.sum())} of the {int(self.robust.sum())} "
            f"points the sweep left robust"
        )

    def lower_bound(self, k: int) -> float:
        """95% lower confidence bound of the % of all n points a probe breaking k of the subset would
        break on every survivor (exact binomial, so small k on a small subset is not a verdict)."""
        size = int(self.subset.sum())
        if k == 0 or size == 0:
            return 0.0
        low = binomtest(k, size).proportion_ci(0.95, method="exact").low
        return 100.0 * low * int(self.robust.sum()) / len(self.robust)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: EvalAttack, eps: Fraction | None = None
    ) -> tuple[int, float, AttackOutcome]:
        """(points broken, % of all n extrapolated from the subset, outcome). All n points are passed
        with the subset as candidates: a seeded PGD draws its start per point of the whole set, so
        each point starts where the sweep's PGD-20 did."""
        outcome = attack.robust(model, x, y, self.eps if eps is None else eps, self.subset.clone())
        k = int((self.subset & ~outcome.robust).sum())
        share = int(self.robust.sum()) / len(y)
        return k, 100.0 * k / max(1, int(self.subset.sum())) * share, outcome


@dataclass(frozen=True)
class ProbeResult:
    checks: list[Check]
    skipped: list[Skipped]
    escalations: list[Escalated] = field(default_factory=list)


def masking_probes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    flags: dict[str, np.ndarray],
    attacks: list[EvalAttack],
    eps_list: list[Fraction],
    budget: ProbeBudget,
    t: Thresholds,
    nested: bool = True,
) -> ProbeResult:
    """Run the subset probes (model in eval mode, parameters frozen by the caller). The step-count
    probe runs first: when it escalates, the other probes look for what the escalated worst case
    missed (`nested`: the sweep's nested balls, under which an escalation reaches every larger eps)."""
    by_name = {a.name: a for a in attacks}
    pgd20 = by_name.get("pgd-20")
    eps = probe_eps(flags, eps_list, budget.min_standing)
    if eps is None:
        return _nothing_to_probe(attacks)
    checks, escalations = [], []
    if isinstance(pgd20, PGDAttack):
        step_check, escalations = step_count_probes(model, x, y, flags, eps_list, eps, pgd20, budget, t, nested)
        checks.append(step_check)
    worst = escalated_worst_case(flags, eps_list, escalations, nested)
    standing = Standing.of(torch.from_numpy(worst[eps]).to(x.device), eps, budget.subset)
    attack_step = float(
        step_size(pgd20.step if isinstance(pgd20, PGDAttack) else "eps/4", torch.tensor([float(eps)]))[0]
    )
    ascends = gradient_ascends(model, x[:PROBE_SIZE], y[:PROBE_SIZE], eps, attack_step, budget, _seed(attacks), t)
    square_check, square_broken = square_probe(model, x, y, standing, budget, t, _seed(attacks), _batch(attacks))
    # a stronger gradient attack repairs a weak attack, never a lying gradient: no escalation then
    if not square_check.passed and budget.white_box is not None and ascends.passed:
        square_check, escalations = square_escalation(
            model, x, y, flags, eps_list, standing, square_broken, square_check, escalations, budget, t, nested, attacks
        )
    # the CW probe still asks what PGD's cross-entropy missed: it compares with the standing before APGD
    checks.append(square_check)
    if isinstance(pgd20, PGDAttack) and "cw-inf" not in by_name:
        checks.append(_cw_gap(model, x, y, pgd20, standing, budget, t))
    checks.append(ascends)
    skipped = [] if pgd20 is not None else [Skipped(n, "needs PGD-20 to compare with", ("pgd-20",)) for n in NEED_PGD20]
    return ProbeResult(checks, skipped, escalations)


NEED_PGD20 = ("more-steps", "pgd20-cw-gap")


def _nothing_to_probe(attacks: list[EvalAttack]) -> ProbeResult:
    why = (
        "every point is broken at every eps > 0 (or none is in the sweep): "
        "nothing left that an attack could have missed"
    )
    return ProbeResult([], [Skipped(name, why) for name in planned_probes(attacks)])


def _cw_gap(model, x, y, pgd20: PGDAttack, standing, budget: ProbeBudget, t: Thresholds) -> Check:
    """CW-k on the margin loss (scale-free) on the points PGD-20 left standing: a saturated softmax shows here."""
    cw = replace(pgd20, name=f"cw-{budget.cw_steps}", steps=budget.cw_steps, loss="cw")
    meaning = "the CW margin breaks what cross-entropy PGD cannot (saturated softmax?)"
    return probe_verdict(
        "pgd20-cw-gap", *standing.attack(model, x, y, cw)[:2], cw.name, standing, t.pgd_cw_gap, t, meaning
    )


def probe_verdict(
    name: str,
    k: int,
    estimate: float,
    attack: str,
    standing: Standing,
    limit: float,
    t: Thresholds,
    meaning: str,
    where: str | None = None,
) -> Check:
    """A FAILED is a verdict of masking, so it needs evidence beyond the sampling noise of a 100-point
    subset: the 95% lower confidence bound (Clopper-Pearson) of the % of n broken must exceed the limit.
    An honest model at 0.5% lets an extra attack break 2 of 100 survivors by luck; a masked one, tens."""
    lower = standing.lower_bound(k)
    ok = lower <= limit or k < t.probe_min_points
    return Check(
        name,
        ok,
        _measured(attack, k, estimate, where or standing.where(), limit)[:-1]
        + f", 95% lower bound {lower:.2f}%)"
        + ("" if ok else f": {meaning}"),
    )


def _measured(attack: str, k: int, estimate: float, where: str, limit: float) -> str:
    return f"{attack} breaks {k} {where} (≈{estimate:.2f}% of n, limit {limit:g})"


SQUARE_MEANING = (
    "a gradient-free attack beats the gradient attacks (gradient masking); run AutoAttack before trusting these numbers"
)


def square_probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    standing: Standing,
    budget: ProbeBudget,
    t: Thresholds,
    seed: int,
    batch_size: int,
) -> tuple[Check, torch.Tensor]:
    """Square at the probe eps moved off the data's grid (a point broken there is broken at eps).
    Returns the check and the mask of subset points Square broke."""
    square = QuickSquare(f"square-{budget.square_queries}q", budget.square_queries, seed, batch_size)
    at = off_grid(standing.eps, budget.data_grid)
    k, estimate, outcome = standing.attack(model, x, y, square, at)
    where = standing.where() + (
        f", queries at {fraction_str(at)} (off the 1/{budget.data_grid} grid)" if at != standing.eps else ""
    )
    return (
        probe_verdict("square-probe", k, estimate, square.name, standing, t.square_extra, t, SQUARE_MEANING, where),
        standing.subset & ~outcome.robust,
    )


def square_escalation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    flags: dict[str, np.ndarray],
    eps_list: list[Fraction],
    standing: Standing,
    square_broken: torch.Tensor,
    alarm: Check,
    escalations: list[Escalated],
    budget: ProbeBudget,
    t: Thresholds,
    nested: bool,
    attacks: list[EvalAttack],
) -> tuple[Check, list[Escalated]]:
    """Square broke too many survivors: PGD-20 may just be weak there, or the gradients may be masked.
    A strong white-box attack (APGD-CE, APGD-T) on every point still robust at the probe eps tells
    them apart: its verified breaks count in the worst case, then the same Square breaks are
    re-checked against that worst case. If the white-box attack found them (Square no longer breaks
    beyond the limit), the check passes, saying it escalated; if Square still beats it, that is the
    signature of masked gradients and the check fails."""
    white = escalate_white_box(
        model, x, y, standing.eps, standing.robust, budget.white_box, _seed(attacks), _batch(attacks)
    )
    escalations = escalations + [white]
    worst = torch.from_numpy(escalated_worst_case(flags, eps_list, escalations, nested)[standing.eps]).to(x.device)
    after = Standing(standing.eps, worst, standing.subset & worst)
    k = int((after.subset & square_broken).sum())
    estimate = 100.0 * k / max(1, int(after.subset.sum())) * int(worst.sum()) / len(y)
    recheck = probe_verdict(
        "square-probe",
        k,
        estimate,
        "square (same queries)",
        after,
        t.square_extra,
        t,
        "a strong white-box attack still misses what Square finds: " + SQUARE_MEANING,
        f"beyond the escalated worst case, {after.where().replace('the sweep left', 'the escalation left')}",
    )
    text = (
        f"{alarm.detail.split(': a gradient-free')[0]} | escalated with white-box attacks on every point still "
        f"robust ({white.passes_per_point} passes per point): {white.summary(percent(worst.cpu().numpy()))} | "
        f"re-check: {recheck.detail}"
    )
    return Check("square-probe", recheck.passed, text), escalations


def step_count_probes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    flags: dict[str, np.ndarray],
    eps_list: list[Fraction],
    top: Fraction,
    pgd20: PGDAttack,
    budget: ProbeBudget,
    t: Thresholds,
    nested: bool,
) -> tuple[Check, list[Escalated]]:
    """PGD-100 from PGD-20's start on a subset at the probe eps; where it still breaks too many,
    escalate there (or fail, without an escalation budget) and probe the next smaller eps too, down
    the sweep until the probe passes (what did not converge at one eps may not have at the next)."""
    probe = replace(pgd20, name=f"pgd-{budget.more_steps}", steps=budget.more_steps)
    measured, escalations = [], []
    for eps in sorted((e for e in eps_list if 0 < e <= top), reverse=True):
        standing = Standing.of(torch.from_numpy(flags[cell_key(WORST_CASE, eps)]).to(x.device), eps, budget.subset)
        k, estimate, outcome = standing.attack(model, x, y, probe)
        measured.append(_measured(probe.name, k, estimate, standing.where(), t.more_steps_drop))
        if estimate <= t.more_steps_drop or k < t.probe_min_points:
            break
        if budget.escalation is None:
            return Check("more-steps", False, measured[-1] + NOT_CONVERGED), []
        escalations.append(
            escalate(model, x, y, eps, standing.robust, probe, (standing.subset, outcome), budget.escalation, t)
        )
    return _step_count_check(
        measured, escalations, escalated_worst_case(flags, eps_list, escalations, nested), t
    ), escalations


NOT_CONVERGED = (
    ": robust accuracy still falls with more steps: PGD-20 has not converged (step too small, or a hard "
    "landscape); evaluate with more steps or AutoAttack"
)


def _step_count_check(measured: list[str], escalations: list[Escalated], worst: dict, t: Thresholds) -> Check:
    """What the step-count probe measured at each eps, what each escalation changed, and whether it converged."""
    escalated = ": PGD-20 had not converged, escalated on every point still robust: "
    parts = [
        text + (f"{escalated}{e.summary(percent(worst[e.eps]))}" if e is not None else "")
        for text, e in zip(measured, escalations + [None])
    ]
    converged = all(e.converged for e in escalations)
    tail = (
        ""
        if converged
        else (
            f"; a last round still broke more than {t.more_steps_drop:g}% of n: the escalated "
            f"number is an upper bound, evaluate with AutoAttack"
        )
    )
    return Check("more-steps", converged, " | ".join(parts) + tail)


def gradient_ascends(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Fraction,
    attack_step: float,
    budget: ProbeBudget,
    seed: int,
    t: Thresholds,
) -> Check:
    """A backward pass that lies (noise, zero, the negated gradient, a quantised or shattered forward)
    misleads every gradient attack alike, so PGD cannot reveal it; the loss itself can. From a seeded
    random start in the probe ball (where PGD works), one signed step along the model's own
    margin-loss input gradient must raise that loss on most clean-correct points, at two scales: a
    quarter grid step (first order; a quantised input does not move) and PGD's own step (a shattered
    gradient describes the function only far below that scale)."""
    correct = predict_correct(model, x, y, len(y))
    xs, ys = x[correct], y[correct]
    if len(ys) == 0:
        return Check("gradient-ascends-loss", True, "no clean-correct probe point to test")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.rand(xs.shape, generator=gen, device=x.device, dtype=xs.dtype) * 2 - 1
    start = (xs + noise * float(eps)).clamp(0, 1)
    before, _, grad = input_gradient(model, start, ys, margin)
    steps = {f"1/{4 * budget.data_grid}": 1 / (4 * budget.data_grid), f"{attack_step:.3g}, PGD's": attack_step}
    rises = {name: _rise(model, start, ys, grad, before, h) for name, h in steps.items()}
    ok = min(rises.values()) >= t.gradient_ascent_fraction
    return Check(
        "gradient-ascends-loss",
        ok,
        "a step along the input gradient raises the margin loss by a median "
        + " and ".join(f"{r:.0%} (step {name})" for name, r in rises.items())
        + f" of what the gradient predicts, over {len(ys)} clean-correct probe points (from a random "
        f"start at {fraction_str(eps)}; limit {t.gradient_ascent_fraction:.0%})"
        + (
            ""
            if ok
            else ": the backward pass does not describe the forward one (noise, zero or "
            "negated gradients, quantised or shattered inputs); gradient attacks are "
            "misled, trust only black-box and AutoAttack numbers"
        ),
    )


def _rise(model: nn.Module, start: torch.Tensor, ys: torch.Tensor, grad: torch.Tensor, before, h: float) -> float:
    """Median over points of (margin-loss rise of a signed step h) / (the rise the gradient predicts)."""
    moved = (start + h * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        after = margin(model(moved), ys)
    predicted = (grad * (moved - start)).flatten(1).sum(1)  # first order: what the gradient promises
    ratio = torch.where(predicted > 0, (after - before) / predicted.clamp_min(1e-30), torch.zeros_like(predicted))
    return float(ratio.median())


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: the CW margin without kappa or clamp (a large kappa would round away
    the small changes the gradient check compares), scale-free where cross-entropy saturates."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], float("-inf")).max(1).values - true


def _seed(attacks: list[EvalAttack]) -> int:
    return next((a.seed for a in attacks if hasattr(a, "seed")), 0)


def _batch(attacks: list[EvalAttack]) -> int:
    return next((a.batch_size for a in attacks if hasattr(a, "batch_size")), 500)

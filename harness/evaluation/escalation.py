"""Escalation: where PGD-20 has not converged, attack harder at that eps instead of printing FAILED.

The `more-steps` probe runs PGD-100 from PGD-20's own random start on a subset of the points the
sweep left robust at the probe eps. When it breaks more than `Thresholds.more_steps_drop` % of n
there (extrapolated), the sweep's number is known to be too high, and a verdict of "FAILED" would
leave that number in the table. So the evaluation repairs it, with a stated budget:

1. the probe's PGD-100 (same start as PGD-20) on *every* point still robust at that eps (the probe's
   subset is not attacked twice: its outcome is reused);
2. then each round of `EscalationBudget.rounds` ((steps, restarts), new random starts) on the points
   still robust after the previous round,

stopping at the first round that breaks no more than the probe's own limit (`more_steps_drop` % of n,
or fewer than `probe_min_points` points): the number has converged. The reported robust accuracy at
that eps is the pointwise worst case over everything that ran (a cell `pgd-escalated@<eps>`; with
nested balls, every larger eps too), the record keeps the sweep's PGD-20 number beside it
(`escalations` in evaluation.json) and the `more-steps` check passes, saying what was escalated and by
how much. Only when the rounds run out while the number still falls does the check fail. Cost: at
most (100 + sum(steps x restarts)) forward-backward passes per point still robust at that one eps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from harness.core.config import fraction_str
from harness.core.environment import synchronize
from harness.evaluation.attacks import APGDAttack, AttackOutcome, PGDAttack
from harness.evaluation.checks import Thresholds
from harness.evaluation.flags import WORST_CASE, cell_key, percent

ESCALATED = "pgd-escalated"  # the flags cell of the escalated worst case
WHITEBOX_ESCALATED = "apgd-escalated"  # the flags cell of the white-box escalation after a Square alarm
ESCALATED_CELLS = (ESCALATED, WHITEBOX_ESCALATED)


@dataclass(frozen=True)
class EscalationBudget:
    """Rounds after the probe's PGD-100, each (steps, restarts) with new random starts."""

    rounds: tuple[tuple[int, int], ...] = ((100, 2), (100, 4))

    def passes_per_point(self, probe: PGDAttack) -> int:
        """Most forward-backward passes one still-robust point can cost (the probe's round included)."""
        return probe.steps * probe.restarts + sum(steps * restarts for steps, restarts in self.rounds)


@dataclass(frozen=True)
class Escalated:
    """What the escalation at one eps ran and found (flags over all n points)."""

    eps: Fraction
    robust: torch.Tensor  # (n,) bool: what the rounds left robust at eps
    x_adv: torch.Tensor  # adversarial examples of the points the rounds broke
    before: float  # worst-case robust accuracy (%) at eps from the sweep
    rounds: tuple[dict, ...]  # attack, steps, restarts, seed, attacked, broken, broken_percent
    converged: bool
    passes_per_point: int
    seconds: float  # wall time of the rounds
    cell: str = ESCALATED  # the flags cell that holds what it left robust
    trigger: str = "more-steps"  # the probe whose alarm started it

    def record(self, after: float, verified: dict) -> dict:
        """`after`: the reported worst case at eps once every escalation counted (nested balls)."""
        return {
            "eps": fraction_str(self.eps),
            "escalated": "worst-case",
            "instead_of": "pgd-20",
            "trigger": self.trigger,
            "cell": self.cell,
            "before": self.before,
            "after": after,
            "drop": self.before - after,
            "rounds": list(self.rounds),
            "converged": self.converged,
            "budget_passes_per_point": self.passes_per_point,
            "seconds": self.seconds,
            "verified": verified,
        }

    def summary(self, after: float) -> str:
        """'worst-case@1/5 14.20% -> 12.00% (pgd-100 broke 9 of 71, pgd-100x2 broke 1 of 62; converged)'."""
        rounds = ", ".join(f"{r['attack']} broke {r['broken']} of {r['attacked']}" for r in self.rounds)
        return (
            f"worst-case@{fraction_str(self.eps)} {self.before:.2f}% -> {after:.2f}% ({rounds}; "
            + ("converged" if self.converged else "budget spent, still falling")
            + ")"
        )


def escalated_worst_case(
    flags: dict[str, np.ndarray], eps_list: list[Fraction], escalations: list[Escalated], nested: bool
) -> dict[Fraction, np.ndarray]:
    """The worst case per eps after the escalations: each one counts at its eps and, with nested
    balls, at every larger eps (a point broken in a smaller ball is broken in a larger one)."""
    worst = {e: flags[cell_key(WORST_CASE, e)].copy() for e in eps_list if cell_key(WORST_CASE, e) in flags}
    for escalated in escalations:
        robust = escalated.robust.cpu().numpy()
        for eps in worst:
            if eps == escalated.eps or (nested and eps > escalated.eps):
                worst[eps] &= robust
    return worst


@dataclass
class _Progress:
    """What an escalation keeps while its rounds run: the points still robust, the examples found so far,
    one row per round, and the wall time from its start (device synchronised at both ends)."""

    standing: torch.Tensor
    robust: torch.Tensor
    x_adv: torch.Tensor
    started: float
    rounds: list[dict]

    @classmethod
    def start(cls, standing: torch.Tensor, x: torch.Tensor) -> _Progress:
        synchronize(x.device)
        return cls(standing, standing.clone(), x.clone(), time.perf_counter(), [])

    def add_round(self, fields: dict, broken: torch.Tensor) -> int:
        """Record a round that broke `broken` (its examples already in x_adv); returns how many it broke."""
        attacked, k = int(self.robust.sum()), int(broken.sum())
        self.robust &= ~broken
        share = 100.0 * k / len(self.robust)
        self.rounds.append({**fields, "attacked": attacked, "broken": k, "broken_percent": share})
        return k

    def result(self, eps: Fraction, converged: bool, passes_per_point: int, *kind: str) -> Escalated:
        synchronize(self.x_adv.device)
        before = percent(self.standing.cpu().numpy())
        seconds = time.perf_counter() - self.started
        return Escalated(
            eps, self.robust, self.x_adv, before, tuple(self.rounds), converged, passes_per_point, seconds, *kind
        )


def escalation_plan(probe: PGDAttack, budget: EscalationBudget) -> list[PGDAttack]:
    """The probe's attack first (PGD-20's start), then each round with new starts (its own seed)."""
    return [probe] + [
        replace(probe, name=f"pgd-{steps}x{restarts}", steps=steps, restarts=restarts, seed=probe.seed + i)
        for i, (steps, restarts) in enumerate(budget.rounds, 1)
    ]


def escalate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Fraction,
    standing: torch.Tensor,
    probe: PGDAttack,
    probed: tuple[torch.Tensor, AttackOutcome],
    budget: EscalationBudget,
    t: Thresholds,
) -> Escalated:
    """Run the plan on the points `standing` (robust at eps after the sweep) until a round breaks no
    more than the probe's limit. `probed` = (subset mask, the probe's outcome on it), reused."""
    progress = _Progress.start(standing, x)
    converged = False
    for i, attack in enumerate(escalation_plan(probe, budget)):
        broken = _round(model, x, y, eps, attack, progress.robust, progress.x_adv, probed if i == 0 else None)
        fields = {"attack": attack.name, "steps": attack.steps, "restarts": attack.restarts, "seed": attack.seed}
        k = progress.add_round(fields, broken)
        if 100.0 * k / len(y) <= t.more_steps_drop or k < t.probe_min_points:
            converged = True
            break
    return progress.result(eps, converged, budget.passes_per_point(probe))


def _round(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Fraction,
    attack: PGDAttack,
    robust: torch.Tensor,
    x_adv: torch.Tensor,
    probed: tuple[torch.Tensor, AttackOutcome] | None,
) -> torch.Tensor:
    """One round on the points still robust; writes the examples it finds into x_adv, returns the
    mask of points it broke. With `probed`, the probe's subset takes the probe's outcome instead."""
    done = torch.zeros_like(robust) if probed is None else probed[0] & robust
    candidates = robust & ~done
    outcome = attack.robust(model, x, y, eps, candidates)
    broken = candidates & ~outcome.robust
    x_adv[broken] = outcome.x_adv[broken]
    if probed is not None:
        from_probe = done & ~probed[1].robust
        x_adv[from_probe] = probed[1].x_adv[from_probe]
        broken |= from_probe
    return broken


@dataclass(frozen=True)
class WhiteBoxBudget:
    """The white-box escalation after a Square alarm: APGD-CE, then APGD-T on the points it left robust."""

    iterations: int = 100
    target_classes: int = 9

    def plan(self, seed: int, batch_size: int) -> list[APGDAttack]:
        return [
            APGDAttack(f"apgd-ce-{self.iterations}", False, self.iterations, seed, batch_size),
            APGDAttack(
                f"apgd-t-{self.iterations}x{self.target_classes}",
                True,
                self.iterations,
                seed,
                batch_size,
                self.target_classes,
            ),
        ]

    def passes_per_point(self) -> int:
        """Most forward-backward passes one still-robust point can cost (100 + 9 x 100 by default)."""
        return sum(a.passes_per_point() for a in self.plan(0, 1))


def escalate_white_box(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Fraction,
    standing: torch.Tensor,
    budget: WhiteBoxBudget,
    seed: int,
    batch_size: int,
) -> Escalated:
    """Square broke points beyond the sweep at eps: before calling that masking, attack every point
    still robust there (`standing`) with the strongest white-box attacks. What they break counts
    (verified, like any cell); whether they account for Square's breaks is the Square re-check's call."""
    progress = _Progress.start(standing, x)
    for attack in budget.plan(seed, batch_size):
        outcome = attack.robust(model, x, y, eps, progress.robust.clone())
        broken = progress.robust & ~outcome.robust
        progress.x_adv[broken] = outcome.x_adv[broken]
        fields = {
            "attack": attack.name,
            "iterations": attack.iterations,
            "seed": attack.seed,
            "passes_per_point": attack.passes_per_point(),
        }
        progress.add_round(fields, broken)
    return progress.result(eps, True, budget.passes_per_point(), WHITEBOX_ESCALATED, "square-probe")

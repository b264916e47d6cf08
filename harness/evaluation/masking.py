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
  breaks mean PGD-20 had not converged (a fixed start: it measures steps, not a second restart).
- `square-probe`: Square with a small query budget, gradient-free, against every attack of the sweep.

The probe eps is the largest of the sweep at which the sweep's worst case still leaves points robust
(the most room to find what the attacks missed); the subset is the first `subset` of those points.
A probe reports the % of all n points it breaks beyond the sweep, extrapolated from the subset, and
fails above its threshold (and only on at least `probe_min_points` points, so one lucky point is not a
verdict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from harness.config import fraction_str
from harness.evaluation.attacks import EvalAttack, PGDAttack, QuickSquare
from harness.evaluation.checks import Check, Skipped, Thresholds, ce_gradients_not_vanishing
from harness.evaluation.flags import WORST_CASE, cell_key


@dataclass(frozen=True)
class ProbeBudget:
    """What the probes may spend per target (recorded in the evaluation config)."""

    subset: int = 100  # points attacked by each probe, at one eps
    square_queries: int = 200  # Square's model calls per point
    more_steps: int = 100  # the PGD-k that PGD-20 is compared with
    cw_steps: int = 30  # the CW-inf of the sweep

    def to_dict(self) -> dict:
        return asdict(self)


def uses_cross_entropy(attack: EvalAttack) -> bool:
    config = attack.config()
    if config.get("kind") == "pgd":
        return config.get("loss") == "ce"
    if config.get("kind") == "autoattack":
        return config.get("version") != "custom" or "apgd-ce" in (config.get("attacks") or [])
    return False


def gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack],
                   t: Thresholds) -> tuple[list[Check], list[Skipped]]:
    if any(uses_cross_entropy(a) for a in attacks):
        return [ce_gradients_not_vanishing(model, x, y, t)], []
    return [], [Skipped("ce-gradients-not-vanishing", "no cross-entropy attack ran", ("pgd-20",))]


def probe_eps(flags: dict[str, np.ndarray], eps_list: list[Fraction]) -> Fraction | None:
    """The largest eps > 0 at which the sweep's worst case leaves a point robust."""
    for eps in sorted((e for e in eps_list if e > 0), reverse=True):
        worst = flags.get(cell_key(WORST_CASE, eps))
        if worst is not None and worst.any():
            return eps
    return None


def planned_probes(attacks: list[EvalAttack]) -> list[str]:
    """The probes an evaluation with these attacks runs."""
    names = {a.name for a in attacks}
    return (["square-probe"] + (["more-steps"] if "pgd-20" in names else [])
            + (["pgd20-cw-gap"] if "pgd-20" in names and "cw-inf" not in names else []))


def probes_skipped(attacks: list[EvalAttack]) -> list[Skipped]:
    """--no-probes: the probes are shown as skipped (with the command that runs them), never dropped."""
    return [Skipped(name, "--no-probes was passed") for name in planned_probes(attacks)]


def masking_probes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: dict[str, np.ndarray],
                   attacks: list[EvalAttack], eps_list: list[Fraction], budget: ProbeBudget,
                   t: Thresholds) -> tuple[list[Check], list[Skipped]]:
    """Run the subset probes (model in eval mode, parameters frozen by the caller)."""
    by_name = {a.name: a for a in attacks}
    pgd20 = by_name.get("pgd-20")
    planned = planned_probes(attacks)
    eps = probe_eps(flags, eps_list)
    if eps is None:
        return [], [Skipped(name, "every point is broken at every eps > 0 (or none is in the sweep): "
                                  "nothing left that an attack could have missed") for name in planned]
    n = len(y)
    standing = np.flatnonzero(flags[cell_key(WORST_CASE, eps)])
    subset = torch.as_tensor(standing[:budget.subset], device=x.device)
    where = (f"at {fraction_str(eps)} on {len(subset)} of the {len(standing)} points the sweep left robust")

    def extra_broken(attack: EvalAttack) -> tuple[int, float]:
        # all n points passed, the subset as candidates: a seeded attack draws its random start per
        # point of the whole set, so PGD-k starts each point where the sweep's PGD-20 did (steps alone)
        candidates = torch.zeros(n, dtype=torch.bool, device=x.device)
        candidates[subset] = True
        outcome = attack.robust(model, x, y, eps, candidates)
        k = int((~outcome.robust[subset]).sum())
        return k, 100.0 * k / len(subset) * len(standing) / n  # % of all n, extrapolated

    def verdict(name: str, attack: EvalAttack, limit: float, meaning: str) -> Check:
        k, estimate = extra_broken(attack)
        ok = estimate <= limit or k < t.probe_min_points
        return Check(name, ok, f"{attack.name} breaks {k} {where} (≈{estimate:.2f}% of n, limit {limit:g})"
                     + ("" if ok else f": {meaning}"))

    checks = [verdict("square-probe", QuickSquare(f"square-{budget.square_queries}q", budget.square_queries,
                                                  _seed(attacks), _batch(attacks)), t.square_extra,
                      "a gradient-free attack beats the gradient attacks (gradient masking); run "
                      "AutoAttack before trusting these numbers")]
    if pgd20 is not None and isinstance(pgd20, PGDAttack):
        checks.append(verdict("more-steps", replace(pgd20, name=f"pgd-{budget.more_steps}",
                                                    steps=budget.more_steps), t.more_steps_drop,
                              "robust accuracy still falls with more steps: PGD-20 has not converged "
                              "(step too small, or a hard landscape); evaluate with more steps or AutoAttack"))
        if "cw-inf" not in by_name:
            checks.append(verdict("pgd20-cw-gap", replace(pgd20, name=f"cw-{budget.cw_steps}", steps=budget.cw_steps,
                                                          loss="cw"), t.pgd_cw_gap,
                                  "the CW margin breaks what cross-entropy PGD cannot (saturated softmax?)"))
    skipped = [] if pgd20 is not None else [Skipped(name, "needs PGD-20 to compare with", ("pgd-20",))
                                            for name in ("more-steps", "pgd20-cw-gap")]
    return checks, skipped


def _seed(attacks: list[EvalAttack]) -> int:
    return next((getattr(a, "seed") for a in attacks if hasattr(a, "seed")), 0)


def _batch(attacks: list[EvalAttack]) -> int:
    return next((getattr(a, "batch_size") for a in attacks if hasattr(a, "batch_size")), 500)

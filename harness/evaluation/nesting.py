"""Nested L-inf balls: a point broken at a smaller eps is broken at every larger eps.

The ball of radius eps contains every smaller ball, so an adversarial example found at eps_i is one
at eps_j > eps_i as well. Combining the per-eps flags with a running AND over the sorted sweep turns
independent attack runs into the tighter (and monotone) estimate. The raw per-eps flags are kept
under "raw:<attack>@<eps>" and each result row keeps `raw_robust_accuracy`, so nothing is lost and
the monotonicity check still sees what each run found on its own.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from harness.evaluation.flags import EvaluationStore, cell_key, percent

RAW_PREFIX = "raw:"


def raw_key(attack: str, eps: Fraction) -> str:
    return RAW_PREFIX + cell_key(attack, eps)


def nest_balls(store: EvaluationStore, attacks: list[str], eps_list: list[Fraction]) -> int:
    """Replace each attack's flags by the running AND over increasing eps; returns how many
    (point, cell) flags the combination changed. Idempotent: the raw flags are read back if stored."""
    rows = {cell_key(r["attack"], Fraction(r["eps"])): r for r in store.record["results"]}
    changed = 0
    for attack in attacks:
        robust_below: np.ndarray | None = None  # robust at every smaller eps so far
        for eps in sorted(eps_list):
            key = cell_key(attack, eps)
            if key not in store.flags:
                continue
            raw = store.flags.setdefault(raw_key(attack, eps), store.flags[key].copy())
            nested = raw if robust_below is None else raw & robust_below
            changed += int(np.sum(nested != raw))
            store.flags[key] = nested
            if key in rows:
                rows[key]["robust_accuracy"] = percent(nested)
                rows[key]["raw_robust_accuracy"] = percent(raw)
            robust_below = nested
    return changed

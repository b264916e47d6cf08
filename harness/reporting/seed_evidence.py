"""The evidence behind a verdict: each training seed's number, the difference between two methods over seeds
(paired by seed where both ran the same seeds), Holm's adjustment over a claim's family, and what the seeds can
resolve (docs/report.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.reporting.loading import Results, Run
from harness.reporting.stats import (
    LEVEL,
    MIN_SEEDS,
    SEEDS_CAP,
    Interval,
    SeedComparison,
    compare_seeds,
    holm,
    paired_bootstrap,
    seeds_needed,
    smallest_resolvable,
)
from harness.reporting.tables import AUTOATTACK_PREFERENCE, best_evaluation
from harness.reporting.variant import Variant
from harness.reporting.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED

ATTACK_OF_METRIC = {"clean": ("clean",), "pgd": ("pgd-20",), "autoattack": AUTOATTACK_PREFERENCE}


@dataclass(frozen=True)
class SeedNumber:
    """One training run's number for a metric: from its record, or from the flags of `harness eval`."""

    value: float  # percent
    n: int  # test examples behind it
    flags: np.ndarray | None = None  # per-example correctness over `indices`
    indices: tuple[int, ...] | None = None


def _flags_of(
    results: Results, run: Run, checkpoint: str, metric: str, eps: str
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    for evaluation in results.evaluations_of(run.run_id):
        if evaluation.label != checkpoint or evaluation.indices is None:
            continue
        for attack in ATTACK_OF_METRIC[metric]:
            flags = evaluation.flag(attack, eps)
            if flags is not None and len(flags) == len(evaluation.indices):
                return np.asarray(flags, float), evaluation.indices
    return None


def seed_numbers(results: Results, runs: list[Run], checkpoint: str, metric: str, eps: str) -> dict[int, SeedNumber]:
    """seed -> the run's number (a variant holds one run per seed; the first is kept)."""
    out: dict[int, SeedNumber] = {}
    for run in runs:
        if run.seed in out:
            continue
        flags = _flags_of(results, run, checkpoint, metric, eps)
        if metric == "autoattack":
            hit = best_evaluation(results, run, checkpoint, "autoattack", eps)
            if hit is None:
                continue
            value, n = float(hit[1]["robust_accuracy"]), int(hit[1]["n"])
        else:
            final = run.record["final"].get(checkpoint, {})
            if not isinstance(final.get(metric), (int, float)):
                continue
            value, n = float(final[metric]), int(final.get("n") or 0)
        out[run.seed] = SeedNumber(value, n, *(flags if flags is not None else (None, None)))
    return out


def _common_indices(numbers: list[SeedNumber]) -> list[int]:
    if not numbers or any(x.flags is None for x in numbers):
        return []
    common = set(numbers[0].indices)
    for x in numbers[1:]:
        common &= set(x.indices)
    return sorted(common)


def _on(number: SeedNumber, common: list[int]) -> np.ndarray:
    position = {v: i for i, v in enumerate(number.indices)}
    return number.flags[[position[c] for c in common]] * 100


def _test_variance_from_flags(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> float:
    """Variance of the seed-averaged difference from resampling the (shared) test examples."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        per_example = np.mean([a[s] - b[s] for s in shared], axis=0)
    else:
        per_example = np.mean(list(a.values()), axis=0) - np.mean(list(b.values()), axis=0)
    return float(per_example.var(ddof=1) / len(per_example))


def comparison(
    results: Results, a: list[Run], b: list[Run], checkpoint: str, metric: str, eps: str
) -> SeedComparison | None:
    """metric(a) - metric(b) over training seeds; per-example flags give the test-set term when every
    run of both sides has them, otherwise a binomial term on the records' test subset."""
    na, nb = (seed_numbers(results, side, checkpoint, metric, eps) for side in (a, b))
    if not na or not nb:
        return None
    common = _common_indices(list(na.values()) + list(nb.values()))
    if common:
        fa = {s: _on(x, common) for s, x in na.items()}
        fb = {s: _on(x, common) for s, x in nb.items()}
        return compare_seeds(
            {s: float(f.mean()) for s, f in fa.items()},
            {s: float(f.mean()) for s, f in fb.items()},
            _test_variance_from_flags(fa, fb),
            len(common),
            f"flags of `harness eval`, {len(common)} test examples",
        )
    n = min(x.n for x in list(na.values()) + list(nb.values()))
    if n < 2:
        return None
    pa, pb = (np.mean([x.value for x in side.values()]) / 100 for side in (na, nb))
    test_var = float((pa * (1 - pa) + pb * (1 - pb)) / n * 1e4)
    return compare_seeds(
        {s: x.value for s, x in na.items()},
        {s: x.value for s, x in nb.items()},
        test_var,
        n,
        f"run records, binomial test-set term over {n} examples",
    )


def test_set_only(
    results: Results, a: list[Run], b: list[Run], checkpoint: str, metric: str, eps: str
) -> Interval | None:
    """The paired bootstrap over test examples of one run per side: shown, labelled, never decides."""
    na, nb = (seed_numbers(results, side, checkpoint, metric, eps) for side in (a, b))
    if len(na) != 1 or len(nb) != 1:
        return None
    (xa,), (xb,) = na.values(), nb.values()
    common = _common_indices([xa, xb])
    if not common:
        return None
    interval = paired_bootstrap(_on(xa, common) / 100, _on(xb, common) / 100).interval
    return Interval(interval.low, interval.high, interval.method + "; test-set noise only, training noise not counted")


# ----------------------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class Judged:
    """One comparison of a claim's family, decided after Holm's adjustment over the family."""

    comparison: SeedComparison
    adjusted_p: float
    verdict: str
    reason: str


def decide_seeds(comp: SeedComparison, adjusted_p: float) -> tuple[str, str]:
    """(verdict, reason): at least MIN_SEEDS per side, a non-zero seed spread, Holm-adjusted p < 1 - LEVEL."""
    if comp.seeds < MIN_SEEDS:
        return INCONCLUSIVE, f"{comp.seeds} seed{'s' if comp.seeds != 1 else ''}"
    if not np.isfinite(comp.seed_sd) or comp.seed_sd == 0:
        return INCONCLUSIVE, "zero spread over seeds"
    if adjusted_p >= 1 - LEVEL:
        return INCONCLUSIVE, f"Holm-adjusted p {adjusted_p:.2f}"
    return (SUPPORTED if comp.value > 0 else CONTRADICTED), f"Holm-adjusted p {adjusted_p:.3f}"


def judge_family(comparisons: list[SeedComparison]) -> list[Judged]:
    adjusted = holm([c.p_value for c in comparisons]) if comparisons else []
    return [Judged(c, p, *decide_seeds(c, p)) for c, p in zip(comparisons, adjusted)]


def judged_family(
    results: Results,
    variants: dict[Variant, list[Run]],
    readings: list[Variant],
    opponents: list[Variant],
    metrics: tuple[str, ...],
    checkpoint: str,
    eps: str,
) -> dict[tuple[Variant, str, Variant], Judged]:
    """(reading, metric, opponent) -> judged, Holm-adjusted over every comparison behind one claim (those with
    numbers on both sides), in the order reading, metric, opponent."""
    keys, comps = [], []
    for reading in readings:
        for metric in metrics:
            for opponent in opponents:
                comp = comparison(results, variants[reading], variants[opponent], checkpoint, metric, eps)
                if comp is not None:
                    keys.append((reading, metric, opponent))
                    comps.append(comp)
    return dict(zip(keys, judge_family(comps)))


def family_alpha(size: int) -> float:
    """The level a power statement uses: Holm's most stringent step (Bonferroni), alpha / family size."""
    return (1 - LEVEL) / max(size, 1)


def power_fields(judged: Judged, claimed: float | None, family_size: int) -> dict[str, str]:
    """P(A > B), the smallest resolvable difference and the seeds the claimed difference needs."""
    comp, alpha = judged.comparison, family_alpha(family_size)
    resolvable = smallest_resolvable(comp.seed_sd, comp.test_var, comp.seeds, alpha, comp.test_examples)
    fields = {
        "seeds": f"{comp.seeds_a} vs {comp.seeds_b}" + (", paired by seed" if comp.paired else ", unpaired"),
        "prob": f"{comp.prob_improvement:.2f}",
        "resolvable": f"{resolvable:.2f}" if np.isfinite(resolvable) else "unknown (one seed: no spread)",
        "needed": "—",
        "warning": "",
    }
    if claimed is None:
        return fields
    spread_known = comp.seeds >= 2 and comp.seed_sd > 0
    needed = seeds_needed(claimed, comp.seed_sd, comp.test_var, alpha, comp.test_examples) if spread_known else None
    # with unlimited seeds only the shared test subset's noise is left
    test_floor = smallest_resolvable(0.0, comp.test_var, SEEDS_CAP, alpha, comp.test_examples)
    if needed:
        fields["needed"], advice = (
            f"{needed} per side for {claimed:+.1f}",
            f"about {needed} seeds per side would be needed.",
        )
    elif spread_known and test_floor > abs(claimed):
        fields["needed"] = f"no seed count for {claimed:+.1f}: the test subset alone limits it to {test_floor:.2f}"
        advice = (
            f"no number of seeds suffices: the {comp.test_examples}-example test subset alone limits it to "
            f"{test_floor:.2f} points, so more test examples (`harness eval --n`) are needed."
        )
    elif spread_known:
        fields["needed"], advice = (
            f">{SEEDS_CAP} per side for {claimed:+.1f}",
            f"more than {SEEDS_CAP} seeds per side would be needed.",
        )
    else:
        fields["needed"] = f"unknown for {claimed:+.1f}: the seed spread needs 2 seeds or more"
        advice = "its seed spread is unknown."
    if not abs(claimed) >= resolvable:
        fields["warning"] = (
            f"This run cannot resolve the paper's claimed {claimed:+.1f} points: with {comp.seeds} seed(s) per side "
            f"the smallest difference it detects (80% power, level {alpha:.4f}) is "
            + (f"{resolvable:.2f} points; " if np.isfinite(resolvable) else "unknown (no seed spread); ")
            + advice
        )
    return fields


def interval_field(judged: Judged, fallback: Interval | None) -> str:
    interval = judged.comparison.interval()
    if interval is not None:
        return f"{interval.text()} ({interval.method})"
    if fallback is not None:
        return f"{fallback.text()} ({fallback.method})"
    return f"unavailable: {judged.comparison.seeds_a} vs {judged.comparison.seeds_b} seed(s)"

"""95% intervals: Student-t over seeds, paired bootstrap over test examples, bootstrap over epoch times.

Every interval carries a sentence saying how it was made, which the report prints next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the report is a pure function of the records: fixed resampling


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str

    def text(self, digits: int = 2) -> str:
        return f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


@dataclass(frozen=True)
class Estimate:
    value: float
    interval: Interval | None
    note: str = ""  # why there is no interval, or where the numbers came from


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    data = np.asarray(values, dtype=float)
    return float(data.mean()), (float(data.std(ddof=1)) if len(data) > 1 else None)


def paired_bootstrap(flags_a: np.ndarray, flags_b: np.ndarray) -> Estimate:
    """Accuracy difference (percent) of two models on the same test examples, percentile bootstrap."""
    a, b = np.asarray(flags_a, float), np.asarray(flags_b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired bootstrap needs two flag vectors over the same test examples")
    diff = float((a.mean() - b.mean()) * 100)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
    deltas = (a[draws].mean(1) - b[draws].mean(1)) * 100
    low, high = np.percentile(deltas, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Estimate(diff, Interval(float(low), float(high), f"paired bootstrap, {len(a)} test examples"))


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Estimate:
    """mean(numerator) / mean(denominator), resampling each side's epoch times independently."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    ratio = float(num.mean() / den.mean())
    if len(num) < 2 or len(den) < 2:
        return Estimate(ratio, None, f"{len(num)} vs {len(den)} epoch time(s): an interval needs at least 2 each")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n_draw = num[rng.integers(0, len(num), size=(BOOTSTRAP_RESAMPLES, len(num)))].mean(1)
    d_draw = den[rng.integers(0, len(den), size=(BOOTSTRAP_RESAMPLES, len(den)))].mean(1)
    low, high = np.percentile(n_draw / d_draw, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Estimate(
        ratio, Interval(float(low), float(high), f"bootstrap over epoch times, {len(num)} vs {len(den)} epochs")
    )


def bootstrap_accuracy(flags: np.ndarray) -> Interval:
    """Percentile bootstrap interval of one model's accuracy (percent) over its test examples."""
    a = np.asarray(flags, float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = a[rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))].mean(1) * 100
    low, high = np.percentile(draws, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Interval(float(low), float(high), f"bootstrap, {len(a)} test examples")


def binomial_interval(accuracy: float, n: int) -> Interval:
    """Normal-approximation interval of an accuracy (percent) measured on n examples."""
    p = accuracy / 100
    half = float(scipy_stats.norm.ppf(0.5 + LEVEL / 2)) * math.sqrt(max(p * (1 - p), 0.0) / n) * 100
    return Interval(accuracy - half, accuracy + half, f"binomial, {n} test examples")


# ----------------------------------------------------------------------------------------- seeds

MIN_SEEDS = 3  # per side, before a difference may decide anything
POWER = 0.80
SEEDS_CAP = 50  # "seeds needed" beyond this is reported as ">50"


@dataclass(frozen=True)
class SeedComparison:
    """mean(A) - mean(B) over training seeds, with an interval carrying seed and test-set noise.

    Paired: the per-seed differences d_s of seeds both sides ran (same data order and initialisation
    stream); unpaired (Welch) otherwise. `test_var` is the test-set sampling variance of the
    seed-averaged difference, added to the seed term because every seed is evaluated on the same test
    subset, so seed-to-seed spread cannot see it (conservative: the per-seed d_s already carry some)."""

    value: float
    seeds_a: int
    seeds_b: int
    paired: bool
    seed_sd: float  # SD of the per-seed differences (paired) or sqrt(n * Welch seed variance) (unpaired)
    test_var: float
    se: float
    dof: float
    prob_improvement: float  # P(A > B) over seeds, ties counted half
    source: str  # where the per-seed numbers came from
    test_examples: int = 0  # behind the test-set term

    @property
    def seeds(self) -> int:
        return min(self.seeds_a, self.seeds_b)

    @property
    def p_value(self) -> float:
        """Two-sided p of 'no difference' (t with Satterthwaite degrees of freedom)."""
        if self.se == 0 or not np.isfinite(self.dof):
            return 1.0
        return float(2 * scipy_stats.t.sf(abs(self.value) / self.se, self.dof))

    def interval(self, level: float = LEVEL) -> Interval | None:
        if self.seeds < 2 or self.se == 0:
            return None
        half = float(scipy_stats.t.ppf(0.5 + level / 2, self.dof)) * self.se
        kind = "paired t over per-seed differences" if self.paired else "Welch t over seed means (seeds not shared)"
        return Interval(
            self.value - half,
            self.value + half,
            f"{kind}, {self.seeds_a} vs {self.seeds_b} seeds, + test-set noise ({self.source})",
        )


def _satterthwaite(seed_var: float, seed_dof: float, test_var: float, test_dof: float) -> float:
    total = seed_var + test_var
    denom = (seed_var**2 / seed_dof if seed_dof > 0 else np.inf) + (test_var**2 / test_dof if test_dof > 0 else 0)
    return float(total**2 / denom) if denom > 0 else float("nan")


def compare_seeds(
    a: dict[int, float], b: dict[int, float], test_var: float, test_examples: int, source: str
) -> SeedComparison:
    """Per-seed values of two methods (seed -> percent) -> a SeedComparison; paired when >= 2 seeds are shared."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        return _paired(np.array([a[s] - b[s] for s in shared]), test_var, test_examples, source)
    return _unpaired(
        np.array(list(a.values()), float), np.array(list(b.values()), float), test_var, test_examples, source
    )


def _paired(diffs: np.ndarray, test_var: float, test_examples: int, source: str) -> SeedComparison:
    """A t interval over the per-seed differences, its variance plus the shared test set's."""
    n = len(diffs)
    seed_sd = float(diffs.std(ddof=1))
    seed_var = seed_sd**2 / n
    dof = _satterthwaite(seed_var, n - 1, test_var, test_examples - 1)
    prob = float(np.mean((diffs > 0) + 0.5 * (diffs == 0)))
    return SeedComparison(
        float(diffs.mean()),
        n,
        n,
        True,
        seed_sd,
        test_var,
        math.sqrt(seed_var + test_var),
        dof,
        prob,
        source,
        test_examples,
    )


def _unpaired(va: np.ndarray, vb: np.ndarray, test_var: float, test_examples: int, source: str) -> SeedComparison:
    """No shared seeds: Welch over the seed means (with fewer than 2 seeds a side, the test-set term alone)."""
    value = float(va.mean() - vb.mean())
    prob = float(scipy_stats.mannwhitneyu(va, vb).statistic / (len(va) * len(vb)))
    if len(va) < 2 or len(vb) < 2:
        return SeedComparison(
            value,
            len(va),
            len(vb),
            False,
            float("nan"),
            test_var,
            math.sqrt(test_var),
            float("nan"),
            prob,
            source,
            test_examples,
        )
    wa, wb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    seed_var = wa + wb
    seed_dof = seed_var**2 / (wa**2 / (len(va) - 1) + wb**2 / (len(vb) - 1)) if seed_var > 0 else 0.0
    dof = _satterthwaite(seed_var, seed_dof, test_var, test_examples - 1)
    return SeedComparison(
        value,
        len(va),
        len(vb),
        False,
        math.sqrt(seed_var * min(len(va), len(vb))),
        test_var,
        math.sqrt(seed_var + test_var),
        dof,
        prob,
        source,
        test_examples,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control over one claim's comparisons)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def smallest_resolvable(
    seed_sd: float, test_var: float, seeds: int, alpha: float, test_examples: int = 0, power: float = POWER
) -> float:
    """Minimum detectable difference (two-sided t, level alpha, given power) at `seeds` paired seeds, with
    the interval's own degrees of freedom (Satterthwaite; n - 1 when the test-set term is unknown)."""
    if seeds < 2 or not np.isfinite(seed_sd):
        return float("inf")
    seed_var = seed_sd**2 / seeds
    dof = _satterthwaite(seed_var, seeds - 1, test_var, test_examples - 1) if test_examples > 1 else seeds - 1
    if not np.isfinite(dof):
        dof = seeds - 1
    factor = scipy_stats.t.ppf(1 - alpha / 2, dof) + scipy_stats.t.ppf(power, dof)
    return float(factor * math.sqrt(seed_var + test_var))


def seeds_needed(
    claimed: float, seed_sd: float, test_var: float, alpha: float, test_examples: int = 0, cap: int = SEEDS_CAP
) -> int | None:
    """Smallest seed count whose resolvable difference is <= |claimed| (None: more than `cap`)."""
    for n in range(2, cap + 1):
        if smallest_resolvable(seed_sd, test_var, n, alpha, test_examples) <= abs(claimed):
            return n
    return None

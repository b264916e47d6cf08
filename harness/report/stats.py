"""95% intervals: Student-t over seeds, paired bootstrap over test examples, bootstrap over epoch times.

Every interval carries a sentence saying how it was made, which the report prints next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """mean(a) - mean(b) with a Welch t interval; needs two seeds or more on each side."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    diff = float(a_.mean() - b_.mean())
    if len(a_) < 2 or len(b_) < 2:
        return Estimate(diff, None, f"{len(a_)} vs {len(b_)} seed(s): an interval over seeds needs at least 2 each")
    va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(diff, Interval(diff, diff, f"over seeds ({len(a_)} vs {len(b_)}), zero spread"))
    dof = (va + vb) ** 2 / ((va ** 2 / (len(a_) - 1)) + (vb ** 2 / (len(b_) - 1)))
    half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, dof)) * se
    return Estimate(diff, Interval(diff - half, diff + half, f"Welch t over seeds, {len(a_)} vs {len(b_)}"))


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
    return Estimate(diff, Interval(float(low), float(high),
                                   f"paired bootstrap, {len(a)} test examples"))


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
    return Estimate(ratio, Interval(float(low), float(high),
                                    f"bootstrap over epoch times, {len(num)} vs {len(den)} epochs"))


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

"""Verdicts on the claims listed in docs/paper.md ("Claims worth checking"), each with a 95% interval.

Training seeds are the unit of evidence. A difference between two methods is the mean of per-seed
differences (paired by seed when both sides ran the same seeds; Welch over seed means otherwise) with a
t interval whose variance adds the test-set sampling term to the seed-to-seed term (docs/report.md).
- supported      >= 3 seeds per side, a non-zero seed spread, and Holm-adjusted p < 0.05 over the
                 family of comparisons behind the claim, with the difference on the claim's side;
- contradicted   the same, on the other side;
- inconclusive   anything else, with the reason ("1 seed", "zero spread over seeds", the adjusted p).
Each row also states P(A > B) over seeds, the smallest difference its seeds resolve, and the seeds the
paper's claimed difference would need.

This module holds the verdict type and the decision rules. The claims live by kind: claims_accuracy (ADES beats every
baseline), claims_ablation (learned vs static fusion), claims_cost (the ×1.12 cost and the V100 floor),
claims_published (the paper against official checkpoints), gathered in the docs' order by claims.all_verdicts; the
per-seed comparisons behind them are in seed_evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.reporting.loading import Protocol, Run
from harness.reporting.stats import Estimate

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass
class Verdict:
    claim: str
    test: str  # what was measured
    measured: str
    interval: str
    verdict: str
    scale: str
    details: list[str] = field(default_factory=list)
    reason: str = ""  # why an inconclusive verdict is inconclusive ("1 seed", "zero spread over seeds", ...)
    seeds: str = "—"  # seeds per side and whether they were paired
    prob: str = "—"  # P(A > B) over seeds
    resolvable: str = "—"  # smallest difference the seeds resolve (80% power, Holm's strictest level)
    needed: str = "—"  # seeds per side the paper's claimed difference would need
    warning: str = ""  # the claimed effect is below what this run can resolve

    @property
    def label(self) -> str:
        return f"{self.verdict}: {self.reason}" if self.reason else self.verdict

    @property
    def css(self) -> str:
        return {SUPPORTED: "good", CONTRADICTED: "bad"}.get(self.verdict, "muted")


def decide(estimate: Estimate, threshold: float = 0.0, higher_supports: bool = True) -> str:
    if estimate.interval is None:
        return INCONCLUSIVE
    low, high = estimate.interval.low, estimate.interval.high
    if higher_supports:
        return SUPPORTED if low > threshold else CONTRADICTED if high < threshold else INCONCLUSIVE
    return SUPPORTED if high < threshold else CONTRADICTED if low > threshold else INCONCLUSIVE


def interval_text(estimate: Estimate, digits: int = 2) -> str:
    if estimate.interval is None:
        return f"unavailable: {estimate.note}"
    return f"{estimate.interval.text(digits)} ({estimate.interval.method})"


def scale_text(protocol: Protocol, runs: list[Run], checkpoint: str) -> str:
    seeds = sorted({r.seed for r in runs})
    return (
        f"{protocol.dataset}, {protocol.model}, {protocol.epochs} epoch(s), eps {protocol.eps}, "
        f"{len(seeds)} seed(s), test {protocol.test_indices}, checkpoint {checkpoint}"
    )

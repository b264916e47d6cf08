"""Every claim's verdicts, in the order of docs/paper.md's list ("Claims worth checking")."""

from __future__ import annotations

from harness.reporting import claims_ablation, claims_accuracy, claims_cost, claims_published
from harness.reporting.loading import Results
from harness.reporting.tables import Groups
from harness.reporting.verdicts import Verdict


def all_verdicts(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    return (
        claims_accuracy.beats_baselines(results, groups, checkpoint)
        + claims_ablation.ablation(results, groups, checkpoint)
        + claims_cost.cost(groups)
        + claims_published.published_claims(results)
        + [claims_cost.floor_claim()]
    )

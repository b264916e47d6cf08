"""The paper's ablation claim: the learnable MLP beats the static fusion (its Table 2), judged per ADES reading
against Static-DES, Holm-adjusted over the readings and metrics."""

from __future__ import annotations

from harness.reporting import reference
from harness.reporting.loading import Protocol, Results, Run
from harness.reporting.seed_evidence import (
    Judged,
    interval_field,
    judged_family,
    power_fields,
    test_set_only,
)
from harness.reporting.tables import Groups, variant_label
from harness.reporting.variant import Variant
from harness.reporting.verdicts import INCONCLUSIVE, Verdict, scale_text

_GAIN = reference.paper_ablation_gain()
CLAIM_ABLATION = (
    f"The learnable MLP beats the static fusion (Table 2: {_GAIN['clean']:+.1f} clean, {_GAIN['pgd20']:+.1f} PGD-20)"
)
ABLATION_CLAIMED = {"clean": _GAIN["clean"], "pgd": _GAIN["pgd20"]}  # our metric -> the paper's gain


def ablation(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    verdicts = []
    for protocol, variants in groups.items():
        static = next((v for v in variants if v.defense == "static-des"), None)
        if static is None:
            continue
        readings = [v for v in variants if v.defense in reference.ADES_VARIANTS]
        family = judged_family(results, variants, readings, [static], ("pgd", "clean"), checkpoint, protocol.eps)
        for (ades, metric, _), judged in family.items():
            verdicts.append(
                _ablation_row(results, protocol, variants, static, ades, metric, judged, len(family), checkpoint)
            )
    if not verdicts:
        verdicts.append(
            Verdict(
                CLAIM_ABLATION,
                "ADES vs Static-DES",
                "—",
                "—",
                INCONCLUSIVE,
                "—",
                ["needs ADES and Static-DES runs under the same protocol"],
            )
        )
    return verdicts


def _ablation_row(
    results: Results,
    protocol: Protocol,
    variants: dict[Variant, list[Run]],
    static: Variant,
    ades: Variant,
    metric: str,
    judged: Judged,
    family_size: int,
    checkpoint: str,
) -> Verdict:
    claimed = ABLATION_CLAIMED[metric]
    details = [
        f"claimed (CIFAR-10): {claimed:+.1f}",
        f"Holm's step-down over the {family_size} comparisons of this claim here (readings × metrics)",
    ]
    interval = judged.comparison.interval()
    if interval is not None:
        inside = interval.low <= claimed <= interval.high
        details.append(f"the claimed size is {'inside' if inside else 'outside'} the interval")
    name = f"PGD-{variants[ades][0].pgd_steps}" if metric == "pgd" else "clean"
    return Verdict(
        CLAIM_ABLATION,
        f"{variant_label(ades)} − Static-DES, {name}",
        f"{judged.comparison.value:+.2f} points",
        interval_field(
            judged, test_set_only(results, variants[ades], variants[static], checkpoint, metric, protocol.eps)
        ),
        judged.verdict,
        scale_text(protocol, variants[ades] + variants[static], checkpoint),
        details,
        reason=judged.reason if judged.verdict == INCONCLUSIVE else "",
        **power_fields(judged, claimed, family_size),
    )

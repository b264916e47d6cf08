"""The paper's headline claim: ADES beats every baseline on PGD-20 and AutoAttack, with higher clean accuracy;
judged per ADES reading and metric against its strongest baseline, Holm-adjusted over every comparison behind it."""

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
from harness.reporting.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED, Verdict, scale_text

CLAIM_BEATS = "ADES beats every baseline on PGD-20 and AutoAttack on both data sets, with higher clean accuracy"
METRIC_NAMES = {"clean": "clean", "pgd": "PGD", "autoattack": "AutoAttack"}


def claimed_margin(dataset: str, ades: Variant, baseline: Variant, metric: str) -> tuple[float, str] | None:
    """The paper's Table 1 margin of ADES over `baseline` (its CIFAR-10 numbers off CIFAR)."""
    where = dataset if dataset in ("cifar10", "cifar100") else "cifar10"
    paper_ades, paper_base = reference.paper_claim(where, ades.defense), reference.paper_claim(where, baseline.defense)
    if paper_ades is None or paper_base is None:
        return None
    return paper_ades[metric] - paper_base[metric], where


def smallest_claimed_margin(
    dataset: str, ades: Variant, baselines: list[Variant], metric: str
) -> tuple[float, str, str] | None:
    """The paper's margin of ADES over its strongest baseline (on this metric) among `baselines`: the
    smallest difference the claim asserts, so the one a run must resolve."""
    margins = [
        (m[0], m[1], variant_label(b)) for b in baselines if (m := claimed_margin(dataset, ades, b, metric)) is not None
    ]
    return min(margins) if margins else None


def _beats_family(
    results: Results, variants: dict[Variant, list[Run]], protocol: Protocol, checkpoint: str
) -> dict[tuple[Variant, str, Variant], Judged]:
    """(reading, metric, baseline) -> judged; Holm over every comparison behind the claim here."""
    readings = [v for v in variants if v.defense in reference.ADES_VARIANTS]
    baselines = [v for v in variants if v.defense in reference.PAPER_BASELINES]
    return judged_family(
        results, variants, readings, baselines, ("pgd", "autoattack", "clean"), checkpoint, protocol.eps
    )


def _row_verdict(decisions: dict[Variant, str], baselines: list[Variant]) -> str:
    if any(d == CONTRADICTED for d in decisions.values()):
        return CONTRADICTED
    if len(decisions) == len(baselines) and all(d == SUPPORTED for d in decisions.values()):
        return SUPPORTED
    return INCONCLUSIVE


def _beats_row(
    results: Results,
    protocol: Protocol,
    variants: dict[Variant, list[Run]],
    checkpoint: str,
    ades: Variant,
    metric: str,
    family: dict[tuple[Variant, str, Variant], Judged],
) -> Verdict | None:
    baselines = [v for v in variants if v.defense in reference.PAPER_BASELINES]
    known = {b: family[(ades, metric, b)] for b in baselines if (ades, metric, b) in family}
    if not known:
        return None
    strongest = min(known, key=lambda b: known[b].comparison.value)
    judged = known[strongest]
    name = f"PGD-{variants[ades][0].pgd_steps}" if metric == "pgd" else METRIC_NAMES[metric]
    details = [
        f"{variant_label(ades)} − {variant_label(b)}: {j.comparison.value:+.2f}, 95% "
        f"{interval_field(j, None)}, P(A>B) {j.comparison.prob_improvement:.2f} → {j.verdict} ({j.reason})"
        for b, j in known.items()
    ]
    details.append(
        f"Holm's step-down over the {len(family)} comparisons behind this claim here "
        "(readings × baselines × metrics); a verdict needs ≥ 3 seeds per side and a non-zero seed spread"
    )
    details += _absent_notes(variants, baselines, known)
    claim = smallest_claimed_margin(protocol.dataset, ades, list(known), metric)
    if claim is not None:
        details.append(
            f"the paper's smallest claimed margin here: {claim[0]:+.1f} over {claim[2]} "
            f"(its strongest baseline on this metric among those run, Table 1, {claim[1]})"
        )
    verdict = _row_verdict({b: j.verdict for b, j in known.items()}, baselines)
    return Verdict(
        CLAIM_BEATS,
        f"{variant_label(ades)} − strongest baseline ({variant_label(strongest)}), {name}",
        f"{judged.comparison.value:+.2f} points",
        interval_field(
            judged, test_set_only(results, variants[ades], variants[strongest], checkpoint, metric, protocol.eps)
        ),
        verdict,
        scale_text(protocol, [r for v in variants.values() for r in v], checkpoint),
        details,
        reason=_row_reason(known, strongest) if verdict == INCONCLUSIVE else "",
        **power_fields(judged, claim[0] if claim else None, len(family)),
    )


def _row_reason(known: dict[Variant, Judged], strongest: Variant) -> str:
    """Why a row is inconclusive: its strongest baseline's reason, else the first undecided baseline's."""
    undecided = [b for b, j in known.items() if j.verdict == INCONCLUSIVE]
    if not undecided:
        return "not every baseline has comparable numbers"
    if strongest in undecided:
        return known[strongest].reason
    return f"{known[undecided[0]].reason} against {variant_label(undecided[0])}"


def _absent_notes(
    variants: dict[Variant, list[Run]], baselines: list[Variant], known: dict[Variant, Judged]
) -> list[str]:
    notes = []
    missing = [variant_label(b) for b in baselines if b not in known]
    if missing:
        notes.append("no comparable numbers for: " + ", ".join(missing))
    absent = [reference.method_label(b) for b in reference.PAPER_BASELINES if b not in {x.defense for x in variants}]
    if absent:
        notes.append("baselines not run under this protocol: " + ", ".join(absent))
    return notes


def beats_baselines(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    verdicts = []
    for protocol, variants in groups.items():
        family = _beats_family(results, variants, protocol, checkpoint)
        for ades in (v for v in variants if v.defense in reference.ADES_VARIANTS):
            for metric in ("pgd", "autoattack", "clean"):
                row = _beats_row(results, protocol, variants, checkpoint, ades, metric, family)
                if row is not None:
                    verdicts.append(row)
    if not verdicts:
        verdicts.append(
            Verdict(
                CLAIM_BEATS,
                "ADES vs the baselines",
                "—",
                "—",
                INCONCLUSIVE,
                "—",
                ["needs an ADES run and at least one baseline under the same protocol"],
            )
        )
    datasets = {p.dataset for p in groups}
    untested = [d for d in ("cifar10", "cifar100") if d not in datasets]
    if untested:
        for v in verdicts:
            v.details.append("the paper's data sets not run here: " + ", ".join(untested))
    return verdicts

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.reporting import compute, reference
from harness.reporting.loading import Evaluation, Protocol, Results, Run
from harness.reporting.stats import (
    LEVEL,
    MIN_SEEDS,
    SEEDS_CAP,
    Estimate,
    Interval,
    SeedComparison,
    binomial_interval,
    bootstrap_accuracy,
    bootstrap_ratio,
    compare_seeds,
    holm,
    paired_bootstrap,
    seeds_needed,
    smallest_resolvable,
)
from harness.reporting.tables import AUTOATTACK_PREFERENCE, Groups, best_evaluation, epoch_seconds, variant_label
from harness.reporting.variant import Variant
from harness.training.resources import CONTENTION_CORES, contended

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
COST_CLAIM = reference.paper_text_claim("ades_cost_ratio")
COST_TOLERANCE = 0.10  # relative: timing noise on shared machines; stated in the verdict
ROBUSTBENCH_TEST_EXAMPLES = 10000  # RobustBench evaluates on the full CIFAR test set
PGD_AT = Variant("pgd-at")  # the cost claim's reference: PGD-AT's only configuration
METRIC_NAMES = {"clean": "clean", "pgd": "PGD", "autoattack": "AutoAttack"}


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


# ----------------------------------------------------------------------------------------- per-seed numbers

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


# ----------------------------------------------------------------------------------------- claims

CLAIM_BEATS = "ADES beats every baseline on PGD-20 and AutoAttack on both data sets, with higher clean accuracy"
_GAIN = reference.paper_ablation_gain()
CLAIM_ABLATION = (
    f"The learnable MLP beats the static fusion (Table 2: {_GAIN['clean']:+.1f} clean, {_GAIN['pgd20']:+.1f} PGD-20)"
)
CLAIM_COST = f"ADES costs only ×{COST_CLAIM:.2f} of PGD-AT per epoch (Table 3)"
CLAIM_TRADES = "The paper's TRADES is below the official TRADES checkpoint (Zhang2019Theoretically)"
CLAIM_MMA = "The paper's MMA AutoAttack (50.5) is far above the official MMA checkpoint (Ding2020MMA, WRN-28-4)"
CLAIM_FLOOR = "105 s per PGD-10 epoch of WRN-34-10 is below what a V100 can compute at peak fp16 throughput"
ABLATION_CLAIMED = {"clean": 0.5, "pgd": 2.5}
TABLE1_METRIC = {"clean": "clean", "pgd": "pgd", "autoattack": "autoattack"}


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
    baselines = [v for v in variants if v.defense in reference.PAPER_BASELINES]
    keys, comps = [], []
    for ades in (v for v in variants if v.defense in reference.ADES_VARIANTS):
        for metric in ("pgd", "autoattack", "clean"):
            for base in baselines:
                comp = comparison(results, variants[ades], variants[base], checkpoint, metric, protocol.eps)
                if comp is not None:
                    keys.append((ades, metric, base))
                    comps.append(comp)
    return dict(zip(keys, judge_family(comps)))


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


def ablation(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    verdicts = []
    for protocol, variants in groups.items():
        static = next((v for v in variants if v.defense == "static-des"), None)
        if static is None:
            continue
        keys, comps = [], []
        for ades in (v for v in variants if v.defense in reference.ADES_VARIANTS):
            for metric in ("pgd", "clean"):
                comp = comparison(results, variants[ades], variants[static], checkpoint, metric, protocol.eps)
                if comp is not None:
                    keys.append((ades, metric))
                    comps.append(comp)
        for (ades, metric), judged in zip(keys, judge_family(comps)):
            verdicts.append(
                _ablation_row(results, protocol, variants, static, ades, metric, judged, len(comps), checkpoint)
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


def busy_epochs(runs) -> int:
    """Timed epochs of `runs` taken on a contended machine (records before epoch resources: none known)."""
    return sum(bool(contended(entry.get("resources"))) for r in runs for entry in r.record["epochs"])


def cost(groups: Groups) -> list[Verdict]:
    verdicts = []
    for protocol, variants in groups.items():
        if PGD_AT not in variants:
            continue
        for ades in (v for v in variants if v.defense in reference.ADES_VARIANTS):
            for device in sorted({r.device for r in variants[ades]} & {r.device for r in variants[PGD_AT]}):
                a = [r for r in variants[ades] if r.device == device]
                b = [r for r in variants[PGD_AT] if r.device == device]
                verdicts.append(_cost_verdict(protocol, ades, device, a, b))
    if not verdicts:
        verdicts.append(
            Verdict(
                CLAIM_COST,
                "ADES / PGD-AT seconds per epoch",
                "—",
                "—",
                INCONCLUSIVE,
                "—",
                ["needs ADES and PGD-AT runs under the same protocol and device"],
            )
        )
    return verdicts


def _cost_verdict(protocol, ades: Variant, device: str, a: list, b: list) -> Verdict:
    """One ADES variant's seconds per epoch over PGD-AT's on one device; withheld when the machine was busy."""
    limit = COST_CLAIM * (1 + COST_TOLERANCE)
    estimate = bootstrap_ratio(epoch_seconds(a), epoch_seconds(b))
    interval = (
        f"[{estimate.interval.low:.2f}, {estimate.interval.high:.2f}] ({estimate.interval.method})"
        if estimate.interval
        else f"unavailable: {estimate.note}"
    )
    busy = busy_epochs(a + b)
    notes = [
        f"supported if the interval lies below ×{limit:.3f} (the claim plus "
        f"{COST_TOLERANCE:.0%} for timing noise), contradicted if it lies above",
        "timings from machines shared with other work are noisy; the ratio at small models and on "
        "CPUs need not match a V100 with WRN-34-10",
    ]
    if busy:
        notes.append(
            f"withheld: {busy} timed epoch(s) ran while other processes kept more than "
            f"{CONTENTION_CORES} CPU cores busy (records' load average); rerun on an idle machine"
        )
    return Verdict(
        CLAIM_COST,
        f"{variant_label(ades)} / PGD-AT seconds per epoch on {device}",
        f"×{estimate.value:.2f}",
        interval,
        INCONCLUSIVE if busy else decide(estimate, limit, higher_supports=False),
        scale_text(protocol, a + b, "n/a") + f", device {device}",
        notes,
    )


def _official_vs_paper(results: Results, rb_name: str, paper_method: str, claim: str, official_higher: bool) -> Verdict:
    from harness.reporting.tables import external_match

    rb = reference.robustbench().query("dataset == 'cifar10' and name == @rb_name").iloc[0]
    paper_aa = float(
        reference.paper_table1().query("dataset == 'cifar10' and method == @paper_method").iloc[0]["autoattack"]
    )
    ours: Evaluation | None = external_match(results, "cifar10", rb_name)
    result = (
        next((ours.result(a, rb["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, rb["eps"])), None)
        if ours
        else None
    )
    sign = 1 if official_higher else -1
    if result is not None:
        value = float(result["robust_accuracy"])
        flags = ours.flag(str(result["attack"]), rb["eps"])
        interval = bootstrap_accuracy(flags) if flags is not None else binomial_interval(value, int(result["n"]))
        source = f"our AutoAttack of the official checkpoint ({result['n']} test examples)"
        n = int(result["n"])
    else:
        value = float(rb["autoattack"])
        interval = binomial_interval(value, ROBUSTBENCH_TEST_EXAMPLES)
        source = "RobustBench's published AutoAttack (not re-measured here: run `harness eval` on it)"
        n = ROBUSTBENCH_TEST_EXAMPLES
    delta = sign * (value - paper_aa)
    low, high = sorted((sign * (interval.low - paper_aa), sign * (interval.high - paper_aa)))
    estimate = Estimate(delta, Interval(low, high, interval.method))
    what = "official − paper" if official_higher else "paper − official"
    return Verdict(
        claim,
        f"AutoAttack, {what} ({rb_name} {value:.2f} vs the paper's {paper_aa:.1f})",
        f"{delta:+.2f} points",
        interval_text(estimate),
        decide(estimate),
        f"cifar10, {rb['architecture']}, eps {rb['eps']}, {n} test examples",
        [source, "the paper's number is taken as exact (it gives no interval)"],
    )


def floor_claim() -> Verdict:
    from harness.reporting.table3 import PAPER_SETTING

    flops = compute.forward_flops(PAPER_SETTING["model"], PAPER_SETTING["dataset"])
    peak = compute.device_peak(PAPER_SETTING["device"])
    cost_ = compute.step_cost("pgd-at")
    floor = compute.floor_seconds(flops, cost_.forward_equivalents, PAPER_SETTING["examples"], peak.tensor_tflops)
    claimed = reference.paper_seconds("pgd-at")
    return Verdict(
        CLAIM_FLOOR,
        "compute floor of one PGD-10 epoch (WRN-34-10, CIFAR-10, V100 fp16 tensor peak)",
        f"floor {floor:.0f} s vs claimed {claimed:.0f} s",
        "none needed: an arithmetic bound",
        SUPPORTED if claimed < floor else CONTRADICTED,
        f"WRN-34-10 ({flops / 1e9:.2f} GFLOP per forward, measured), 50,000 examples, "
        f"{cost_.forward_equivalents:.0f} forward-equivalents per example, {peak.tensor_tflops} TFLOP/s",
        [cost_.assumption, "supported means the paper's 105 s is below the floor (not physically possible)"],
    )


def all_verdicts(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    return (
        beats_baselines(results, groups, checkpoint)
        + ablation(results, groups, checkpoint)
        + cost(groups)
        + [
            _official_vs_paper(results, "Zhang2019Theoretically", "TRADES", CLAIM_TRADES, official_higher=True),
            _official_vs_paper(results, "Ding2020MMA", "MMA", CLAIM_MMA, official_higher=False),
            floor_claim(),
        ]
    )

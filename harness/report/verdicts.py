"""Verdicts on the claims listed in PAPER.md ("Claims worth checking"), each with a 95% interval.

A verdict is reached per protocol (data set, model, eps, epochs, test subset) and says so:
- supported      the interval lies entirely on the claim's side (e.g. ADES - baseline > 0);
- contradicted   the interval lies entirely on the other side;
- inconclusive   the interval straddles the threshold, or no interval can be formed at this scale
                 (one seed and no per-example flags from `harness eval`).
Intervals: Welch t over seeds when each side has two seeds or more, otherwise a paired bootstrap over
test examples from the evaluation records' per-example flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.report import compute, reference
from harness.report.loading import Evaluation, Protocol, Results, Run
from harness.report.stats import (Estimate, Interval, binomial_interval, bootstrap_accuracy, bootstrap_ratio,
                                  paired_bootstrap, welch_difference)
from harness.resources import CONTENTION_CORES, contended
from harness.report.tables import AUTOATTACK_PREFERENCE, Groups, autoattack_values, epoch_seconds, final_values, variant_label

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
COST_CLAIM = 1.12
COST_TOLERANCE = 0.10  # relative: timing noise on shared machines; stated in the verdict
ROBUSTBENCH_TEST_EXAMPLES = 10000  # RobustBench evaluates on the full CIFAR test set
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
    return (f"{protocol.dataset}, {protocol.model}, {protocol.epochs} epoch(s), eps {protocol.eps}, "
            f"{len(seeds)} seed(s), test {protocol.test_indices}, checkpoint {checkpoint}")


# ----------------------------------------------------------------------------------------- differences

def _paired_flags(results: Results, a: list[Run], b: list[Run], checkpoint: str, metric: str, eps: str
                  ) -> tuple[np.ndarray, np.ndarray, Run, Run] | None:
    """Per-example flags of one run of each side on their common test examples (first pair that has them)."""
    attack = {"clean": "clean", "pgd": "pgd-20", "autoattack": "autoattack"}[metric]
    for run_a in a:
        for run_b in b:
            for ea in results.evaluations_of(run_a.run_id):
                for eb in results.evaluations_of(run_b.run_id):
                    if ea.label != checkpoint or eb.label != checkpoint:
                        continue
                    fa, fb = ea.flag(attack, eps), eb.flag(attack, eps)
                    ia, ib = ea.indices, eb.indices
                    if fa is None or fb is None or ia is None or ib is None or len(ia) != len(fa) \
                            or len(ib) != len(fb):
                        continue
                    common = sorted(set(ia) & set(ib))
                    if common:
                        pos_a, pos_b = {v: i for i, v in enumerate(ia)}, {v: i for i, v in enumerate(ib)}
                        return fa[[pos_a[c] for c in common]], fb[[pos_b[c] for c in common]], run_a, run_b
    return None


def metric_values(results: Results, runs: list[Run], checkpoint: str, metric: str, eps: str) -> list[float]:
    if metric == "autoattack":
        values = autoattack_values(results, runs, checkpoint, eps)
        return [] if values.mixed else values.values
    return final_values(runs, checkpoint, metric)


def difference(results: Results, a: list[Run], b: list[Run], checkpoint: str, metric: str, eps: str
               ) -> Estimate | None:
    """metric(a) - metric(b): over seeds when possible, else paired bootstrap on flags, else a point."""
    va, vb = metric_values(results, a, checkpoint, metric, eps), metric_values(results, b, checkpoint, metric, eps)
    if len(va) >= 2 and len(vb) >= 2:
        return welch_difference(va, vb)
    flags = _paired_flags(results, a, b, checkpoint, metric, eps)
    if flags is not None:
        flags_a, flags_b, run_a, run_b = flags
        estimate = paired_bootstrap(flags_a, flags_b)
        source = {"pgd": ", PGD-20 flags of the evaluation records"}.get(metric, "")
        if len(a) > 1 or len(b) > 1:
            source += f", seed {run_a.seed} vs seed {run_b.seed} only"
        return Estimate(estimate.value, Interval(estimate.interval.low, estimate.interval.high,
                                                 estimate.interval.method + source))
    if not va or not vb:
        return None
    point = welch_difference(va, vb)
    return Estimate(point.value, None, point.note + "; no per-example flags from `harness eval` for a bootstrap")


# ----------------------------------------------------------------------------------------- claims

CLAIM_BEATS = ("ADES beats every baseline on PGD-20 and AutoAttack on both data sets, with higher clean accuracy")
CLAIM_ABLATION = "The learnable MLP beats the static fusion (Table 2: +0.5 clean, +2.5 PGD-20)"
CLAIM_COST = "ADES costs only ×1.12 of PGD-AT per epoch (Table 3)"
CLAIM_TRADES = "The paper's TRADES is below the official TRADES checkpoint (Zhang2019Theoretically)"
CLAIM_MMA = "The paper's MMA AutoAttack (50.5) is far above the official MMA checkpoint (Ding2020MMA, WRN-28-4)"
CLAIM_FLOOR = "105 s per PGD-10 epoch of WRN-34-10 is below what a V100 can compute at peak fp16 throughput"


def beats_baselines(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    verdicts = []
    for protocol, variants in groups.items():
        baselines = [v for v in variants if v.split("#")[0] in reference.PAPER_BASELINES]
        for ades in (v for v in variants if v.split("#")[0] in reference.ADES_VARIANTS):
            if not baselines:
                continue
            for metric in ("pgd", "autoattack", "clean"):
                per_baseline = {b: difference(results, variants[ades], variants[b], checkpoint, metric, protocol.eps)
                                for b in baselines}
                known = {b: e for b, e in per_baseline.items() if e is not None}
                if not known:
                    continue
                decisions = {b: decide(e) for b, e in known.items()}
                if any(d == CONTRADICTED for d in decisions.values()):
                    verdict = CONTRADICTED
                elif len(known) == len(baselines) and all(d == SUPPORTED for d in decisions.values()):
                    verdict = SUPPORTED
                else:
                    verdict = INCONCLUSIVE
                strongest = min(known, key=lambda b: known[b].value)
                steps = variants[ades][0].pgd_steps
                name = f"PGD-{steps}" if metric == "pgd" else METRIC_NAMES[metric]
                details = [f"{variant_label(ades)} − {variant_label(b)}: {e.value:+.2f}, 95% {interval_text(e)}"
                           f" → {decisions[b]}" for b, e in known.items()]
                missing = [variant_label(b) for b in baselines if b not in known]
                if missing:
                    details.append("no comparable numbers for: " + ", ".join(missing))
                absent = [reference.method_label(b) for b in reference.PAPER_BASELINES if b not in
                          {x.split("#")[0] for x in variants}]
                if absent:
                    details.append("baselines not run under this protocol: " + ", ".join(absent))
                verdicts.append(Verdict(
                    CLAIM_BEATS, f"{variant_label(ades)} − strongest baseline ({variant_label(strongest)}), {name}",
                    f"{known[strongest].value:+.2f} points", interval_text(known[strongest]), verdict,
                    scale_text(protocol, [r for v in variants.values() for r in v], checkpoint), details))
    if not verdicts:
        verdicts.append(Verdict(CLAIM_BEATS, "ADES vs the baselines", "—", "—", INCONCLUSIVE, "—",
                                ["needs an ADES run and at least one baseline under the same protocol"]))
    datasets = {p.dataset for p in groups}
    untested = [d for d in ("cifar10", "cifar100") if d not in datasets]
    if untested:
        for v in verdicts:
            v.details.append("the paper's data sets not run here: " + ", ".join(untested))
    return verdicts


def ablation(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    verdicts = []
    claims = {"clean": 0.5, "pgd": 2.5}
    for protocol, variants in groups.items():
        static = next((v for v in variants if v.split("#")[0] == "static-des"), None)
        if static is None:
            continue
        for ades in (v for v in variants if v.split("#")[0] in reference.ADES_VARIANTS):
            for metric in ("pgd", "clean"):
                estimate = difference(results, variants[ades], variants[static], checkpoint, metric, protocol.eps)
                if estimate is None:
                    continue
                details = [f"claimed (CIFAR-10): {claims[metric]:+.1f}"]
                if estimate.interval is not None:
                    inside = estimate.interval.low <= claims[metric] <= estimate.interval.high
                    details.append(f"the claimed size is {'inside' if inside else 'outside'} the interval")
                name = f"PGD-{variants[ades][0].pgd_steps}" if metric == "pgd" else "clean"
                verdicts.append(Verdict(CLAIM_ABLATION, f"{variant_label(ades)} − Static-DES, {name}",
                                        f"{estimate.value:+.2f} points", interval_text(estimate), decide(estimate),
                                        scale_text(protocol, variants[ades] + variants[static], checkpoint), details))
    if not verdicts:
        verdicts.append(Verdict(CLAIM_ABLATION, "ADES vs Static-DES", "—", "—", INCONCLUSIVE, "—",
                                ["needs ADES and Static-DES runs under the same protocol"]))
    return verdicts


def busy_epochs(runs) -> int:
    """Timed epochs of `runs` taken on a contended machine (records before epoch resources: none known)."""
    return sum(bool(contended(entry.get("resources"))) for r in runs for entry in r.record["epochs"])


def cost(groups: Groups) -> list[Verdict]:
    verdicts = []
    limit = COST_CLAIM * (1 + COST_TOLERANCE)
    for protocol, variants in groups.items():
        if "pgd-at" not in variants:
            continue
        for ades in (v for v in variants if v.split("#")[0] in reference.ADES_VARIANTS):
            for device in sorted({r.device for r in variants[ades]} & {r.device for r in variants["pgd-at"]}):
                a = [r for r in variants[ades] if r.device == device]
                b = [r for r in variants["pgd-at"] if r.device == device]
                estimate = bootstrap_ratio(epoch_seconds(a), epoch_seconds(b))
                interval = (f"[{estimate.interval.low:.2f}, {estimate.interval.high:.2f}] ({estimate.interval.method})"
                            if estimate.interval else f"unavailable: {estimate.note}")
                busy = busy_epochs(a + b)
                verdicts.append(Verdict(
                    CLAIM_COST, f"{variant_label(ades)} / PGD-AT seconds per epoch on {device}",
                    f"×{estimate.value:.2f}", interval,
                    INCONCLUSIVE if busy else decide(estimate, limit, higher_supports=False),
                    scale_text(protocol, a + b, "n/a") + f", device {device}",
                    [f"supported if the interval lies below ×{limit:.3f} (the claim plus {COST_TOLERANCE:.0%} for "
                     f"timing noise), contradicted if it lies above",
                     "timings from machines shared with other work are noisy; the ratio at small models and on "
                     "CPUs need not match a V100 with WRN-34-10"]
                    + ([f"withheld: {busy} timed epoch(s) ran while other processes kept more than "
                        f"{CONTENTION_CORES} CPU cores busy (records' load average); rerun on an idle machine"]
                       if busy else [])))
    if not verdicts:
        verdicts.append(Verdict(CLAIM_COST, "ADES / PGD-AT seconds per epoch", "—", "—", INCONCLUSIVE, "—",
                                ["needs ADES and PGD-AT runs under the same protocol and device"]))
    return verdicts


def _official_vs_paper(results: Results, rb_name: str, paper_method: str, claim: str, official_higher: bool
                       ) -> Verdict:
    from harness.report.tables import external_match

    rb = reference.robustbench().query("dataset == 'cifar10' and name == @rb_name").iloc[0]
    paper_aa = float(reference.paper_table1().query("dataset == 'cifar10' and method == @paper_method")
                     .iloc[0]["autoattack"])
    ours: Evaluation | None = external_match(results, "cifar10", rb_name)
    result = next((ours.result(a, rb["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, rb["eps"])),
                  None) if ours else None
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
    return Verdict(claim, f"AutoAttack, {what} ({rb_name} {value:.2f} vs the paper's {paper_aa:.1f})",
                   f"{delta:+.2f} points", interval_text(estimate), decide(estimate),
                   f"cifar10, {rb['architecture']}, eps {rb['eps']}, {n} test examples",
                   [source, "the paper's number is taken as exact (it gives no interval)"])


def floor_claim() -> Verdict:
    from harness.report.tables import PAPER_SETTING

    flops = compute.forward_flops(PAPER_SETTING["model"], PAPER_SETTING["dataset"])
    peak = compute.device_peak(PAPER_SETTING["device"])
    cost_ = compute.step_cost("pgd-at")
    floor = compute.floor_seconds(flops, cost_.forward_equivalents, PAPER_SETTING["examples"], peak.tensor_tflops)
    claimed = reference.paper_seconds("pgd-at")
    return Verdict(CLAIM_FLOOR, "compute floor of one PGD-10 epoch (WRN-34-10, CIFAR-10, V100 fp16 tensor peak)",
                   f"floor {floor:.0f} s vs claimed {claimed:.0f} s", "none needed: an arithmetic bound",
                   SUPPORTED if claimed < floor else CONTRADICTED,
                   f"WRN-34-10 ({flops / 1e9:.2f} GFLOP per forward, measured), 50,000 examples, "
                   f"{cost_.forward_equivalents:.0f} forward-equivalents per example, {peak.tensor_tflops} TFLOP/s",
                   [cost_.assumption, "supported means the paper's 105 s is below the floor (not physically possible)"])


def all_verdicts(results: Results, groups: Groups, checkpoint: str) -> list[Verdict]:
    return (beats_baselines(results, groups, checkpoint) + ablation(results, groups, checkpoint) + cost(groups)
            + [_official_vs_paper(results, "Zhang2019Theoretically", "TRADES", CLAIM_TRADES, official_higher=True),
               _official_vs_paper(results, "Ding2020MMA", "MMA", CLAIM_MMA, official_higher=False),
               floor_claim()])

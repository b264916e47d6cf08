"""Claims the paper's own numbers settle against official checkpoints, with no training: its TRADES below the
official TRADES checkpoint, its MMA AutoAttack far above the official MMA checkpoint."""

from __future__ import annotations

from harness.reporting import reference
from harness.reporting.loading import Evaluation, Results
from harness.reporting.stats import Estimate, Interval, binomial_interval, bootstrap_accuracy
from harness.reporting.tables import AUTOATTACK_PREFERENCE, external_match
from harness.reporting.verdicts import Verdict, decide, interval_text

ROBUSTBENCH_TEST_EXAMPLES = 10000  # RobustBench evaluates on the full CIFAR test set
CLAIM_TRADES = "The paper's TRADES is below the official TRADES checkpoint (Zhang2019Theoretically)"
CLAIM_MMA = "The paper's MMA AutoAttack (50.5) is far above the official MMA checkpoint (Ding2020MMA, WRN-28-4)"


def published_claims(results: Results) -> list[Verdict]:
    return [
        official_vs_paper(results, "Zhang2019Theoretically", "TRADES", CLAIM_TRADES, official_higher=True),
        official_vs_paper(results, "Ding2020MMA", "MMA", CLAIM_MMA, official_higher=False),
    ]


def official_vs_paper(results: Results, rb_name: str, paper_method: str, claim: str, official_higher: bool) -> Verdict:
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

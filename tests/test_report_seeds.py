"""Verdicts over training seeds (issue 20): a synthetic results store, records and flags written
directly (no training). Each test names the rule it guards; reverting that rule makes it fail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import report_fixture as fx
from markupsafe import escape
from scipy import stats as scipy_stats

from harness.reporting import (
    build,
    claims_ablation,
    claims_accuracy,
    load_results,
    make_report,
    seed_evidence,
    stats,
    verdicts,
)
from harness.reporting.tables import group_runs


def _beats(tmp_path, runs, metric="PGD-20"):
    fx.build_results(tmp_path, runs=tuple(runs), corrupt=False)
    result = build(load_results(tmp_path))
    return [v for v in result.verdicts if v.claim == claims_accuracy.CLAIM_BEATS and v.test.endswith(metric)], result


def _seeds(defense, seeds, clean, pgd, aa, n_test=500):
    return [fx.FakeRun(defense, s, c, p, a, n_test=n_test) for s, c, p, a in zip(seeds, clean, pgd, aa)]


def test_one_seed_per_side_is_inconclusive_however_large_the_test_set_difference(tmp_path):
    rows, _ = _beats(
        tmp_path, _seeds("pgd-at", [0], [70], [35], [30]) + _seeds("ades", [0], [88], [62], [58]), metric=""
    )
    assert rows and {v.label for v in rows} == {"inconclusive: 1 seed"}
    assert all("test-set noise only" in v.interval for v in rows)  # shown, labelled, not deciding
    assert all("unknown" in v.resolvable for v in rows)


def test_three_consistent_seeds_with_a_large_difference_are_supported(tmp_path):
    rows, _ = _beats(
        tmp_path,
        _seeds("pgd-at", [0, 1, 2], [80, 80.6, 79.2], [40, 41.6, 39.2], [37, 38.4, 36.2])
        + _seeds("ades", [0, 1, 2], [88, 89.2, 87.4], [56, 57.8, 55.2], [52, 53.6, 51.4]),
        metric="",
    )
    assert len(rows) == 3 and {v.verdict for v in rows} == {verdicts.SUPPORTED}
    pgd = next(v for v in rows if v.test.endswith("PGD-20"))
    assert pgd.seeds == "3 vs 3, paired by seed" and pgd.prob == "1.00"
    assert "paired t over per-seed differences" in pgd.interval and "test-set noise" in pgd.interval


def test_three_seeds_whose_differences_change_sign_are_inconclusive(tmp_path):
    rows, _ = _beats(
        tmp_path,
        _seeds("pgd-at", [0, 1, 2], [80, 80, 80], [40, 46, 40], [37, 37, 37])
        + _seeds("ades", [0, 1, 2], [80, 80, 80], [47, 38, 47], [37, 37, 37]),
    )
    [pgd] = rows
    assert pgd.verdict == verdicts.INCONCLUSIVE and "Holm-adjusted p" in pgd.reason
    assert pgd.prob == "0.67"


@pytest.mark.parametrize("seeds, reason", [([0, 1], "2 seeds"), ([0, 1, 2], "zero spread over seeds")])
def test_identical_seeds_never_decide(tmp_path, seeds, reason):
    k = len(seeds)
    rows, _ = _beats(
        tmp_path,
        _seeds("pgd-at", seeds, [80] * k, [40] * k, [37] * k)
        + _seeds(
            "ades",
            seeds,
            [90] * k,
            [60] * k,
            [55] * k,
        ),
        metric="",
    )
    assert rows and {v.label for v in rows} == {f"inconclusive: {reason}"}


def _width(row: verdicts.Verdict) -> float:
    low, high = row.interval.split("]")[0].strip("[").split(",")
    return float(high) - float(low)


def test_pairing_by_seed_narrows_the_interval_under_a_large_common_seed_effect(tmp_path):
    base = [30.0, 45.0, 60.0]  # the seed moves both methods by 15 points
    ades_pgd = [b + d for b, d in zip(base, (6.0, 7.0, 5.5))]
    paired, _ = _beats(
        tmp_path / "paired",
        _seeds("pgd-at", [0, 1, 2], [80] * 3, base, [30] * 3, n_test=2000)
        + _seeds("ades", [0, 1, 2], [80] * 3, ades_pgd, [30] * 3, n_test=2000),
    )
    unpaired, _ = _beats(
        tmp_path / "unpaired",
        _seeds("pgd-at", [0, 1, 2], [80] * 3, base, [30] * 3, n_test=2000)
        + _seeds("ades", [10, 11, 12], [80] * 3, ades_pgd, [30] * 3, n_test=2000),
    )
    assert "paired t" in paired[0].interval and "Welch" in unpaired[0].interval
    assert _width(paired[0]) < _width(unpaired[0]) / 3
    assert paired[0].verdict == verdicts.SUPPORTED and unpaired[0].verdict == verdicts.INCONCLUSIVE


def test_the_interval_carries_test_set_noise_on_top_of_seed_noise():
    a, b = {0: 60.0, 1: 62.0, 2: 61.0}, {0: 55.0, 1: 56.0, 2: 56.5}
    seed_only = stats.compare_seeds(a, b, 0.0, 500, "x").interval()
    both = stats.compare_seeds(a, b, 1.5, 500, "x").interval()
    diffs = [a[s] - b[s] for s in a]
    ci = scipy_stats.ttest_1samp(diffs, 0).confidence_interval(0.95)
    assert seed_only.low == pytest.approx(ci.low) and seed_only.high == pytest.approx(ci.high)
    assert both.high - both.low > seed_only.high - seed_only.low
    assert both.low < seed_only.low and both.high > seed_only.high


def test_holm_matches_hand_computation():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_power_statements():
    sd, n, alpha = 2.0, 3, 0.05 / 6
    factor = scipy_stats.t.ppf(1 - alpha / 2, n - 1) + scipy_stats.t.ppf(0.8, n - 1)
    assert stats.smallest_resolvable(sd, 0.0, n, alpha) == pytest.approx(factor * sd / np.sqrt(n))
    needed = stats.seeds_needed(2.5, sd, 0.0, alpha)
    assert (
        stats.smallest_resolvable(sd, 0.0, needed, alpha) <= 2.5 < stats.smallest_resolvable(sd, 0.0, needed - 1, alpha)
    )
    assert stats.seeds_needed(0.5, sd, 1.0, alpha) is None  # the test-set term alone exceeds the claim


def test_claimed_effect_below_resolution_is_said_in_one_sentence(tmp_path):
    runs = _seeds("static-des", [0, 1, 2], [80, 82, 79], [40, 43, 39], [37, 38, 36]) + _seeds(
        "ades", [0, 1, 2], [81, 81.5, 80], [41, 44.5, 40], [37, 38, 36]
    )
    fx.build_results(tmp_path, runs=tuple(runs), corrupt=False)
    result = build(load_results(tmp_path))
    clean = next(v for v in result.verdicts if v.claim == claims_ablation.CLAIM_ABLATION and v.test.endswith("clean"))
    assert clean.warning.startswith("This run cannot resolve the paper's claimed +0.5 points")
    # the fixture's flags are independent per model, so its 500-example test subset alone is too noisy
    assert clean.needed.startswith("no seed count for +0.5: the test subset alone limits it to")
    assert "no number of seeds suffices: the 500-example test subset alone" in clean.warning
    html_path, _ = make_report(tmp_path, tmp_path / "out")
    assert (
        'data-role="resolution-warnings"' in html_path.read_text()
        and str(escape(clean.warning)) in html_path.read_text()
    )
    table = pd.read_csv(tmp_path / "out" / "tables" / "verdicts.csv")
    row = table[table["measured"] == clean.test].iloc[0]
    assert row["seeds"] == "3 vs 3, paired by seed" and row["warning"] == clean.warning


def test_holm_controls_the_family_behind_one_claim():
    """Three comparisons each at p ~ 0.03 would each decide alone; as one claim's family they do not."""
    comps = [stats.SeedComparison(3.0, 3, 3, True, 1.0, 0.0, 3.0 / scipy_stats.t.isf(0.015, 2), 2.0, 1.0, "x")] * 3
    assert all(0.02 < c.p_value < 0.04 for c in comps)
    judged = seed_evidence.judge_family(comps)
    assert {j.verdict for j in judged} == {verdicts.INCONCLUSIVE}
    assert seed_evidence.judge_family(comps[:1])[0].verdict == verdicts.SUPPORTED


def test_probability_of_improvement_counts_ties_half():
    assert stats.compare_seeds(
        {0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 1.0, 2: 4.0}, 0.0, 100, "x"
    ).prob_improvement == pytest.approx(0.5)
    unpaired = stats.compare_seeds({0: 1.0, 1: 2.0}, {5: 1.5, 6: 2.0}, 0.0, 100, "x")
    assert not unpaired.paired and unpaired.prob_improvement == pytest.approx(0.125 + 0.25)


def test_eps_curve_draws_every_seed_and_the_seed_range(tmp_path):
    from matplotlib.figure import Figure

    from harness.reporting import figures

    ax = Figure().add_subplot()
    figures.seed_spread(ax, [0.0, 1.0], [[50.0, 52.0, 55.0], [30.0, 31.0, 36.0]], "#000000")
    points = np.concatenate([c.get_offsets() for c in ax.collections[:2]])
    assert sorted(points[:, 1]) == [30.0, 31.0, 36.0, 50.0, 52.0, 55.0]
    assert len(ax.collections) == 3  # two seed scatters and one min-max band
    fx.build_results(tmp_path, runs=tuple(_seeds("pgd-at", [0, 1, 2], [80] * 3, [40, 42, 44], [37] * 3)), corrupt=False)
    drawn = build(load_results(tmp_path)).figures
    curves = [f for f in drawn if f.key.startswith(("eps_curve", "training"))]
    assert len(curves) == 2 and all("points: each seed" in f.caption for f in curves)


def test_tables_show_mean_std_and_seed_count_and_mark_fewer_than_three(tmp_path):
    runs = (
        _seeds("pgd-at", [0, 1, 2], [80, 82, 84], [40, 42, 44], [37, 38, 39])
        + _seeds("static-des", [0], [81], [41], [38])
        + _seeds("ades", [0, 1], [81, 83], [41, 43], [38, 39])
    )
    fx.build_results(tmp_path, runs=tuple(runs), corrupt=False)
    result = build(load_results(tmp_path))
    rows = {(r["Method"].text, r["Checkpoint"]): r for r in result.table1[0].display}
    three, one = rows[("PGD-AT", "last")], rows[("Static-DES", "last")]
    assert three["Clean"].text.startswith("82.00 ± 2.00 (n=3)") and "‡" not in three["Clean"].text
    assert one["Clean"].text.startswith("81.00 (n=1) ‡") and "fewer than 3" in one["Clean"].title
    assert "‡" in one["Seeds"].text and "‡" not in three["Seeds"].text
    table2 = {r["Method"].text: r for r in result.table2[0].display}
    assert "(n=2) ‡" in table2["ADES"]["Clean"].text
    table3 = {r["Method"].text: r for r in result.table3[0].display}
    assert table3["PGD-AT"]["Seeds"].text == "3" and table3["ADES"]["Seeds"].text == "2 ‡"


def test_every_curve_hands_each_seed_to_the_spread(tmp_path, monkeypatch):
    from harness.reporting import figures

    calls = []
    monkeypatch.setattr(figures, "seed_spread", lambda ax, x, values, color: calls.append(values))
    fx.build_results(tmp_path, runs=tuple(_seeds("pgd-at", [0, 1, 2], [80] * 3, [40, 42, 44], [37] * 3)), corrupt=False)
    build(load_results(tmp_path))
    assert len(calls) == 1 + 4  # the eps curve and the four training panels
    assert all(len(per_x) == 3 for values in calls for per_x in values)


def test_seeds_needed_uses_the_papers_smallest_claimed_margin(tmp_path):
    """Against PGD-AT the paper claims +8.8 PGD-20, against Static-DES +2.5: the claim must resolve +2.5."""
    runs = (
        _seeds("pgd-at", [0, 1, 2], [80, 81, 79], [40, 42, 41], [37] * 3)
        + _seeds("static-des", [0, 1, 2], [80, 81, 79], [41, 43, 42], [37] * 3)
        + _seeds("ades", [0, 1, 2], [81, 82, 80], [42, 44, 42], [37] * 3)
    )
    rows, _ = _beats(tmp_path, runs)
    [pgd] = rows
    assert "for +2.5" in pgd.needed
    assert any("smallest claimed margin here: +2.5 over Static-DES" in d for d in pgd.details)


def test_unpaired_fallback_is_welch_and_power_uses_the_intervals_degrees_of_freedom():
    a, b = {0: 50.0, 1: 52.0, 2: 51.0}, {7: 47.0, 8: 49.5, 9: 48.0, 10: 46.0}
    unpaired = stats.compare_seeds(a, b, 0.0, 500, "x")
    ci = scipy_stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    assert not unpaired.paired and unpaired.interval().low == pytest.approx(ci.low)
    assert unpaired.interval().high == pytest.approx(ci.high) and "Welch" in unpaired.interval().method
    # the test-set term has ~500 degrees of freedom: counting them resolves a smaller difference than n - 1 would
    assert stats.smallest_resolvable(1.0, 4.0, 3, 0.01, 500) < stats.smallest_resolvable(1.0, 4.0, 3, 0.01)


def test_a_claims_comparisons_are_adjusted_together_not_one_by_one(tmp_path):
    """Three metrics against one baseline, each consistent over 3 seeds (p about 0.03 alone): Holm over the claim's
    family of three leaves none of them decided. Judged one by one, each would be 'supported'."""
    gains = (1.5, 3.0, 2.5)
    base_clean, base_pgd, base_aa = [80.0, 81.0, 79.0], [40.0, 41.0, 39.0], [37.0, 38.0, 36.0]
    rows, _ = _beats(
        tmp_path,
        _seeds("pgd-at", [0, 1, 2], base_clean, base_pgd, base_aa, n_test=100_000)
        + _seeds(
            "ades",
            [0, 1, 2],
            [c + g for c, g in zip(base_clean, gains)],
            [p + g for p, g in zip(base_pgd, gains)],
            [a + g for a, g in zip(base_aa, gains)],
            n_test=100_000,
        ),
        metric="",
    )
    assert len(rows) == 3
    assert {v.verdict for v in rows} == {verdicts.INCONCLUSIVE}
    assert all("Holm-adjusted p" in v.reason for v in rows)
    alone = [seed_evidence.judge_family([j.comparison])[0].verdict for j in _family_of(tmp_path)]
    assert alone == [verdicts.SUPPORTED] * 3  # the same comparisons, each in a family of its own


def _family_of(tmp_path):
    results = load_results(tmp_path)
    ((_, variants),) = group_runs(results.runs).items()
    readings = [v for v in variants if v.defense == "ades"]
    opponents = [v for v in variants if v.defense == "pgd-at"]
    family = seed_evidence.judged_family(
        results, variants, readings, opponents, ("pgd", "autoattack", "clean"), "last", "8/255"
    )
    return list(family.values())

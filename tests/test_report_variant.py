"""The typed report variant ("defense#digest" spelled in one place) and the paper numbers read from harness/data."""

from __future__ import annotations

import pytest

from harness.reporting import claims_ablation, claims_cost, reference, tables
from harness.reporting.variant import Variant


@pytest.mark.parametrize("key, defense, digest", [("ades", "ades", ""), ("pgd-at#1a2b3c", "pgd-at", "1a2b3c")])
def test_variant_format_and_slug(key, defense, digest):
    variant = Variant(defense, digest)
    assert variant.format() == key
    assert variant.slug() == key.replace("#", "_")


def test_variant_label_names_the_configuration():
    assert tables.variant_label(Variant("pgd-at", "1a2b3c")) == "PGD-AT (config 1a2b3c)"
    assert tables.variant_label(Variant("pgd-at")) == "PGD-AT"


def test_groups_are_keyed_by_typed_variants_in_the_paper_order(tmp_path):
    """Groups hold Variant objects (parsed once), ordered by the paper's method order, not by the text."""
    import report_fixture as fx

    from harness.reporting import load_results

    fx.build_results(tmp_path, corrupt=False)
    groups = tables.group_runs(load_results(tmp_path).runs)
    for variants in groups.values():
        assert variants and all(type(v) is Variant for v in variants)
        order = [reference.METHOD_ORDER.index(v.defense) for v in variants]
        assert order == sorted(order)
    assert all(v.digest == "" for variants in groups.values() for v in variants)  # one config per defense


def test_ablation_gain_and_cost_ratio_come_from_the_data_files():
    table2 = reference.paper_table2().set_index("scheduler")
    learned, static = table2.loc["Learnable MLP (ADES)"], table2.loc["Static Weighted Fusion"]
    assert reference.paper_ablation_gain() == {
        "clean": round(learned["clean"] - static["clean"], 1),
        "pgd20": round(learned["pgd20"] - static["pgd20"], 1),
    }
    assert reference.paper_ablation_gain() == {"clean": 0.5, "pgd20": 2.5}  # the paper's text: +0.5 / +2.5
    assert claims_cost.COST_CLAIM == 1.12
    assert "+0.5 clean, +2.5 PGD-20" in claims_ablation.CLAIM_ABLATION and "×1.12" in claims_cost.CLAIM_COST


def test_table2_gain_row_follows_the_data_file(monkeypatch, tmp_path):
    """The wired-up Table 2: change the paper's static row and the claimed gain in the report changes with it."""
    import report_fixture as fx

    from harness.reporting import build, load_results

    fx.build_results(tmp_path, corrupt=False)
    edited = reference.paper_table2()
    edited.loc[edited["scheduler"] == "Static Weighted Fusion", ["clean", "pgd20"]] = [84.0, 50.0]
    monkeypatch.setattr(reference, "paper_table2", lambda: edited.copy())
    table = build(load_results(tmp_path)).table2[0]
    gains = table.export[table.export["method"] == "ADES - Static-DES"]
    assert gains["paper_clean"].tolist() == [1.0] and gains["paper_pgd20"].tolist() == [5.9]
    (shown,) = [row for row in table.display if row["Method"].text == "ADES − Static-DES"]
    assert (shown["Paper clean (CIFAR-10)"].text, shown["Paper PGD-20 (CIFAR-10)"].text) == ("+1.0", "+5.9")


def test_verdicts_come_in_the_order_of_the_papers_claims(tmp_path):
    """The report, verdicts.csv and the HTML list the claims as docs/paper.md does."""
    import report_fixture as fx

    from harness.reporting import build, claims_accuracy, claims_published, load_results

    fx.build_results(tmp_path, corrupt=False)
    seen = list(dict.fromkeys(v.claim for v in build(load_results(tmp_path)).verdicts))
    assert seen == [
        claims_accuracy.CLAIM_BEATS,
        claims_ablation.CLAIM_ABLATION,
        claims_cost.CLAIM_COST,
        claims_published.CLAIM_TRADES,
        claims_published.CLAIM_MMA,
        claims_cost.CLAIM_FLOOR,
    ]

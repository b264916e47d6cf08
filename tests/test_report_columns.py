"""A table declared by a column spec: its CSV export and its HTML display both come from the one spec."""

from __future__ import annotations

import pandas as pd
import pytest
from report_fixture import build_results

from harness.reporting import build, compute, load_results, make_report
from harness.reporting.protocol_cards import MARK
from harness.reporting.table3 import FLOOR_COLUMNS, PAPER_SETTING, floor_rows, paper_floor_table


def test_paper_floor_csv_follows_its_column_spec(tmp_path):
    build_results(tmp_path / "res")
    make_report(tmp_path / "res", tmp_path / "out")
    exported = pd.read_csv(tmp_path / "out" / "tables" / "table3_paper_floor.csv")
    assert list(exported.columns) == [
        "method",
        "paper_seconds",
        "forward_equivalents",
        "floor_seconds_fp32",
        "floor_seconds_tensor",
        "possible",
    ]
    assert [c.key for c in FLOOR_COLUMNS] == list(exported.columns)
    pgd = exported.set_index("method").loc["PGD-AT"]
    assert pgd["paper_seconds"] == 105.0  # harness/data/paper_table3.csv
    assert pgd["forward_equivalents"] == compute.step_cost("pgd-at").forward_equivalents == 23
    assert pgd["floor_seconds_tensor"] > 105.0 and bool(pgd["possible"]) is False  # the paper is below the floor


def test_paper_floor_display_and_export_agree_cell_by_cell():
    table = paper_floor_table()
    assert table.columns == [c.header for c in FLOOR_COLUMNS]
    flops = compute.forward_flops(PAPER_SETTING["model"], PAPER_SETTING["dataset"])
    rows = floor_rows(flops, compute.device_peak(PAPER_SETTING["device"]))
    for exported, shown, row in zip(table.export.to_dict("records"), table.display, rows):
        assert shown["Method"].text == exported["method"] == row.method
        assert shown["Paper s / epoch"].text == f"{exported['paper_seconds']:.0f}"
        assert shown["Fwd-equiv / example"].text == f"{exported['forward_equivalents']:.0f}"
        assert shown["Floor s (fp32, 15.7 TFLOP/s)"] == f"{exported['floor_seconds_fp32']:.0f}"
        assert shown["Floor s (fp16 tensor, 125 TFLOP/s)"] == f"{exported['floor_seconds_tensor']:.0f}"
        assert shown["Physically possible?"].text == ("yes" if exported["possible"] else "no: below the floor")
        assert exported["possible"] == (exported["paper_seconds"] >= exported["floor_seconds_tensor"])


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    build_results(root)
    return build(load_results(root))


def test_every_table_is_derived_from_its_declared_columns(fixture_report):
    """Each table's CSV columns are the keys of its declared columns and its HTML headers their headers, in order:
    one declaration, two forms, nothing added beside the spec."""
    checked = 0
    for table in fixture_report.all_tables:
        if not table.display:
            continue
        assert table.spec, f"{table.key} has no declared columns"
        assert list(table.export.columns) == [c.key for c in table.spec if c.key is not None], table.key
        assert table.columns == [c.header for c in table.spec if c.header is not None], table.key
        assert all(list(row) == table.columns for row in table.display), table.key
        checked += 1
    assert checked >= 7  # Tables 1 (two protocols), 2, 3 (two devices), 3b, RobustBench, evaluations


def test_table1_display_shows_the_exported_numbers(fixture_report):
    """The HTML cell of a number is the exported number, formatted: the two forms cannot drift apart."""
    for table in fixture_report.table1:
        pgd = next(h for h in table.columns if h.startswith("PGD-"))
        for exported, shown in zip(table.export.to_dict("records"), table.display):
            assert shown["Method"].text == exported["method"]
            assert shown["Seeds"].text.split()[0] == str(exported["seeds"])
            assert shown["Test n"] == exported["test_examples"].replace(",", ", ")
            assert shown["Clean"].text.startswith(f"{exported['clean_mean']:.2f}")
            for header, key in ((pgd, "pgd_mean"), ("AutoAttack", "autoattack_mean")):
                if pd.notna(exported[key]):
                    assert shown[header].text.startswith(f"{exported[key]:.2f}"), (header, shown[header])
            if exported["protocol_departures"]:  # the numbers say so, and in what, on hover
                departs = "departs from the authors' protocol in: " + exported["protocol_departures"]
                assert shown["Clean"].text.endswith(MARK) and shown["Clean"].title == departs
                assert shown["Authors' protocol"].title == departs
            if "Paper clean" in shown:
                assert shown["Paper clean"].text == f"{exported['paper_clean']:.1f}"
                delta = float(shown["Δ clean"].text)
                assert delta == pytest.approx(exported["clean_mean"] - exported["paper_clean"], abs=0.006)


def test_table1_column_order_is_the_published_one(fixture_report):
    """The CSV's column order is a contract with users' scripts; the HTML keeps the paper's reading order."""
    table = next(t for t in fixture_report.table1 if "cifar10" in t.key)
    assert list(table.export.columns) == [
        "method",
        "defense",
        "checkpoint",
        "seeds",
        "test_examples",
        "clean_mean",
        "clean_std",
        "pgd_mean",
        "pgd_std",
        "autoattack_mean",
        "autoattack_std",
        "autoattack_seeds",
        "autoattack_n",
        "autoattack_version",
        "paper_clean",
        "paper_pgd20",
        "paper_autoattack",
        "protocol_departures",
        "robustbench",
    ]
    pgd = next(h for h in table.columns if h.startswith("PGD-"))
    assert table.columns == [
        "Method",
        "Checkpoint",
        "Seeds",
        "Test n",
        "Clean",
        "Paper clean",
        "Δ clean",
        pgd,
        "Paper PGD-20",
        "Δ PGD",
        "AutoAttack",
        "AA n",
        "Paper AA",
        "Δ AA",
        "Authors' protocol",
        "Reliability",
        "RobustBench official (clean / AA)",
    ]


TABLE3_KEYS = [
    "method",
    "seconds_per_epoch",
    "seconds_std",
    "epochs_timed",
    "seeds",
    "ratio_to_pgd_at",
    "ratio_low",
    "ratio_high",
    "paper_seconds",
    "paper_ratio",
    "device",
    "forward_equivalents",
    "forward_flops",
    "floor_seconds_fp32",
    "floor_seconds_tensor",
]
TABLE3_HEADERS = [
    "Method",
    "s / epoch",
    "Seeds",
    "Epochs timed",
    "× PGD-AT [95%]",
    "Paper s / epoch (V100)",
    "Paper ×",
    "Fwd-equiv / example",
    "Floor s (fp32 peak)",
    "Floor s (fp16 tensor peak)",
]


def test_table3_columns_and_cells_follow_the_export(fixture_report):
    tables = [t for t in fixture_report.table3 if t.display]
    assert tables
    for table in tables:
        assert list(table.export.columns) == TABLE3_KEYS and table.columns == TABLE3_HEADERS
        for exported, shown in zip(table.export.to_dict("records"), table.display):
            assert shown["Method"].text == exported["method"]
            assert shown["s / epoch"].startswith(f"{exported['seconds_per_epoch']:.2f}")
            assert shown["Epochs timed"] == str(exported["epochs_timed"])
            assert shown["Seeds"].text.split()[0] == str(exported["seeds"])
            if pd.notna(exported["ratio_to_pgd_at"]):
                low, high = exported["ratio_low"], exported["ratio_high"]
                assert shown["× PGD-AT [95%]"].text == f"×{exported['ratio_to_pgd_at']:.2f} [{low:.2f}, {high:.2f}]"
            if pd.notna(exported["floor_seconds_fp32"]):
                assert shown["Floor s (fp32 peak)"] == f"{exported['floor_seconds_fp32']:.2f}"
                assert shown["Floor s (fp16 tensor peak)"] == f"{exported['floor_seconds_tensor']:.2f}"


def test_table2_columns_and_cells_follow_the_export(fixture_report):
    """Scheduler rows and the gain rows under them share one column list; each HTML number is its export, formatted."""
    (table,) = fixture_report.table2
    assert list(table.export.columns) == [
        "method",
        "seeds",
        "clean_mean",
        "clean_std",
        "pgd_mean",
        "pgd_std",
        "paper_clean",
        "paper_pgd20",
        "eps_std_rel_last_pass",
    ]
    pgd = table.columns[6]
    assert table.columns == [
        "Method",
        "Paper's row",
        "Seeds",
        "Clean",
        "Paper clean (CIFAR-10)",
        "Δ clean",
        pgd,
        "Paper PGD-20 (CIFAR-10)",
        "Δ PGD",
        "eps spread (last pass)",
        "r(eps, cue) within batch",
    ]
    gains = 0
    for exported, shown in zip(table.export.to_dict("records"), table.display):
        gain = " - " in exported["method"]
        assert shown["Method"].text == exported["method"].replace(" - ", " − ")
        if gain:  # learned minus static: signed differences, no per-seed cells
            gains += 1
            assert shown["Clean"] == f"{exported['clean_mean']:+.2f}" and shown[pgd] == f"{exported['pgd_mean']:+.2f}"
            assert pd.isna(exported["seeds"]) and shown["Seeds"] == "" and shown["Δ PGD"] == ""
            paper_gain = pd.notna(exported["paper_clean"])  # the paper claims learned minus static only
            assert (shown["Paper's row"] == "MLP − static") == paper_gain
            assert paper_gain or shown["Paper's row"].text == "per-sample − curriculum"
        else:
            assert shown["Seeds"].text.split()[0] == str(int(exported["seeds"]))
            assert shown["Clean"].text.startswith(f"{exported['clean_mean']:.2f}")
        if pd.notna(exported["paper_clean"]):
            fmt = "{:+.1f}" if gain else "{:.1f}"
            assert shown["Paper clean (CIFAR-10)"].text == fmt.format(exported["paper_clean"])
            assert shown["Paper PGD-20 (CIFAR-10)"].text == fmt.format(exported["paper_pgd20"])
    assert gains >= 1


def test_robustbench_cells_follow_the_export(fixture_report):
    table = fixture_report.robustbench
    assert list(table.export.columns)[:5] == ["dataset", "name", "architecture", "eps", "harness_method"]
    assert table.columns[:5] == ["Data set", "RobustBench model", "Method", "Architecture", "eps"]
    ours = 0
    for exported, shown in zip(table.export.to_dict("records"), table.display):
        assert shown["RobustBench model"].text == exported["name"] and shown["eps"] == exported["eps"]
        assert shown["Published AA"].text == f"{exported['published_autoattack']:.2f}"
        if pd.notna(exported["ours_autoattack"]):
            ours += 1
            assert shown["Our AA"] == f"{exported['ours_autoattack']:.2f} (n={int(exported['ours_n'])})"
            delta = exported["ours_autoattack"] - exported["published_autoattack"]
            assert shown["Δ AA (ours − published)"].text == f"{delta:+.2f}"
    assert ours >= 1


def test_robustbench_ours_are_the_evaluation_record(fixture_report):
    """'Our' numbers are the `harness eval` record of the official checkpoint, as written on disk."""
    (ev,) = [e for e in fixture_report.results.external if e.name.endswith("Zhang2019Theoretically")]
    (aa,) = [r for r in ev.data["results"] if r["attack"].startswith("autoattack") and r["eps"] == "0.031"]
    row = fixture_report.robustbench.export.set_index("name").loc["Zhang2019Theoretically"]
    assert row["ours_autoattack"] == pytest.approx(aa["robust_accuracy"]) and row["ours_n"] == aa["n"]
    assert row["ours_clean"] == pytest.approx(ev.data["clean_accuracy"])


def test_evaluations_cells_follow_the_export(fixture_report):
    table = fixture_report.evaluations
    assert table is not None and len(table.display) == len(fixture_report.results.evaluations)
    for exported, shown in zip(table.export.to_dict("records"), table.display):
        assert shown["Checkpoint"].text == f"{exported['name']} [{exported['label']}]"
        assert shown["Checkpoint"].title == exported["path"] and shown["Source"] == exported["source"]
        assert shown["Data set / model"] == f"{exported['dataset']} / {exported['model']}"
        assert shown["n"] == str(exported["n"]) and shown["Clean"] == f"{exported['clean']:.2f}"
        not_run = shown["Not run"].text
        assert (not_run == "—") == (exported["skipped_checks"] == 0)
        assert not_run == "—" or len(not_run.split(", ")) == exported["skipped_checks"]
        assert shown["Per-example flags"].text == ("present" if exported["flags"] == "present" else "missing")
        assert bool(exported["escalated"]) == shown["Results"].startswith("escalated ")


def test_evaluations_and_robustbench_column_orders(fixture_report):
    """The CSV column order is a contract with users' scripts."""
    evaluations, robustbench = fixture_report.evaluations, fixture_report.robustbench
    assert list(evaluations.export.columns) == (
        "path source name label dataset model n clean checks failed_checks skipped_checks nested_balls escalated "
        "flags".split()
    )
    assert evaluations.columns == [
        "Checkpoint",
        "Source",
        "Data set / model",
        "n",
        "Clean",
        "Results",
        "Reliability",
        "Not run",
        "Per-example flags",
    ]
    assert list(robustbench.export.columns) == (
        "dataset name architecture eps harness_method published_clean published_autoattack ours_clean "
        "ours_autoattack ours_n".split()
    )
    assert robustbench.columns[5:] == [
        "Published clean",
        "Published AA",
        "Our clean",
        "Our AA",
        "Δ AA (ours − published)",
        "Reliability",
    ]

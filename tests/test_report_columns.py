"""A table declared by a column spec: its CSV export and its HTML display both come from the one spec."""

from __future__ import annotations

import pandas as pd
from report_fixture import build_results

from harness.reporting import compute, make_report
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
